"""End-to-end matrix of issue 14's "Done when": every ``ckptlab lora`` command, through the CLI, on kohya, PEFT,
LoHa and LoKr files for SD1, SD2, SDXL and Flux.

The LoRA files (``tests/fakes/lora_files.py``) carry seeded random factors under module names written out by hand
with the checkpoint key each adapts; the oracle is the loaders' formula re-implemented there with torch
(LoRA α/r·up@down, LoHa (w1a@w1b)⊙(w2a@w2b)·α/r, LoKr kron(w1, w2)·α/r). Files are built once per module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import run_cli
from tests.conftest import (
    run_cli_in_process as in_process,  # ~250 commands: a torch import each would take minutes
)
from tests.fakes import lora_files as lf
from tests.fakes.sample_files import make_model

FAMILIES = lf.FAMILIES
FORMATS = lf.FORMATS
STRENGTH = 0.75
#: what ``lora info`` calls each family
FAMILY_WORD = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "flux": "Flux"}


def ok(*args, subprocess: bool = False):
    r = run_cli(*map(str, args)) if subprocess else in_process(*args)
    assert r.returncode == 0, f"{' '.join(map(str, args[:2]))}: rc {r.returncode}\n{r.stderr}"
    return r


def refused(*args, code: int = 1):
    """A refusal as a user sees it (a fresh ``python -m ckptlab``): exit ``code`` (1: refused input, 2: usage) and
    one line ``ckptlab: error: …``, no traceback."""
    r = run_cli(*map(str, args))
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptlab: error:"), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


class Files:
    """The session's files: a base checkpoint (and a second one, for the recipe) per family, a LoRA per (family,
    format), and the outputs of the commands, each run once and cached."""

    def __init__(self, root: Path):
        self.root = root
        self.base: dict[str, Path] = {}
        self.other: dict[str, Path] = {}
        self.shapes: dict[str, dict] = {}
        self.lora: dict[tuple[str, str], Path] = {}
        self._baked: dict = {}
        for fam in FAMILIES:
            self.base[fam] = make_model(root / f"{fam}.safetensors", lf.CHECKPOINT[fam])
            self.shapes[fam] = lf.checkpoint_shapes(self.base[fam])
            for fmt in FORMATS:
                self.lora[fam, fmt] = lf.build(root / f"{fam}_{fmt}.safetensors", fam, fmt, self.base[fam])

    def other_model(self, fam: str) -> Path:
        if fam not in self.other:
            self.other[fam] = make_model(self.root / f"{fam}_b.safetensors", lf.CHECKPOINT[fam], seed=1)
        return self.other[fam]

    def baked(self, fam: str, fmt: str) -> Path:
        if (fam, fmt) not in self._baked:
            out = self.root / f"baked_{fam}_{fmt}.safetensors"
            # the kohya bakes run as a user runs them, in a fresh interpreter
            ok("lora", "bake", self.base[fam], self.lora[fam, fmt], "--strength", STRENGTH, "-o", out,
               subprocess=fmt == "kohya")
            self._baked[fam, fmt] = out
        return self._baked[fam, fmt]

    def deltas(self, fam: str, path: Path) -> dict[str, torch.Tensor]:
        return lf.deltas(path, fam, self.shapes[fam])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    # one torch thread: the SVDs of many small matrices run ~6× slower with threads fighting over 2 shared cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lora-matrix")
    yield Files(root)
    torch.set_num_threads(threads)
    shutil.rmtree(root, ignore_errors=True)  # some 2 GB of baked checkpoints: not left for pytest's last-3 retention


@pytest.fixture(autouse=True)
def _drop_big_outputs(tmp_path):
    """Baked / merged checkpoints (up to 140 MB each) are removed after each test; the small LoRAs stay."""
    yield
    for f in tmp_path.glob("*.safetensors"):
        if f.stat().st_size > (1 << 20):
            f.unlink()


def assert_deltas_equal(got: dict, want: dict, *, rtol=1e-5, atol=1e-6):
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def rel_err(got: dict, want: dict) -> float:
    num = sum(float(((got.get(k, torch.zeros_like(w)) - w) ** 2).sum()) for k, w in want.items())
    return (num / sum(float((w ** 2).sum()) for w in want.values())) ** 0.5


# --- bake ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fam", FAMILIES)
def test_bake_is_base_plus_strength_times_formula(files, fam, fmt):
    base, baked = load_file(files.base[fam]), load_file(files.baked(fam, fmt))
    want = files.deltas(fam, files.lora[fam, fmt])
    # every hand-chosen module is one of the file's modules, and changes its key
    assert set(want) == {m.key for m in lf.modules(fam, fmt)}
    assert list(baked) == list(base)
    for k, w in base.items():
        if k in want:
            expect = w.float() + STRENGTH * want[k]
            assert baked[k].dtype == w.dtype
            torch.testing.assert_close(baked[k].float(), expect, rtol=1e-6, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
            assert not torch.equal(baked[k], w)
        else:
            assert baked[k].dtype == w.dtype and torch.equal(baked[k], w), k


@pytest.mark.parametrize("fam", ("sd1", "sd2", "sdxl"))
def test_bake_te_strength_apart(files, fam, tmp_path):
    """``--te-strength`` scales the text-encoder modules only (the UNet ones keep ``--strength``)."""
    out = tmp_path / "te.safetensors"
    ok("lora", "bake", files.base[fam], files.lora[fam, "peft"], "-s", "0.5", "--te-strength", "-1.25", "-o", out)
    base, baked = load_file(files.base[fam]), load_file(out)
    want = files.deltas(fam, files.lora[fam, "peft"])
    te_keys = {m.key for m in lf.PEFT[fam] if m.te}
    assert te_keys and te_keys != set(want)
    for k, d in want.items():
        expect = base[k] + (-1.25 if k in te_keys else 0.5) * d
        torch.testing.assert_close(baked[k], expect, rtol=1e-6, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


# --- info ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fam", FAMILIES)
def test_info_names_family_and_format(files, fam, fmt):
    r = json.loads(ok("lora", "info", files.lora[fam, fmt], "--json").stdout)
    # SD1 and SD2 PEFT files carry no metadata, and the small layout's widths are not the real 768 / 1024 that
    # tell SD1 from SD2 by the keys alone: no family there (bake checks the base's layout instead)
    assert r["family"] == (None if fmt == "peft" and fam in ("sd1", "sd2") else fam)
    assert r["kind"] == ("lycoris" if fmt in ("loha", "lokr") else "lora")
    mods = lf.modules(fam, fmt)
    convs = sum(len(files.shapes[fam][m.key]) == 4 and files.shapes[fam][m.key][2] > 1 for m in mods)
    # info calls a 3×3 LoRA module "locon" (LyCORIS' name for it)
    want = {"lora": len(mods) - convs, "locon": convs} if fmt in ("kohya", "peft") else {fmt: len(mods)}
    assert r["algos"] == {k: v for k, v in want.items() if v}
    assert set(r["styles"]) == {"peft" if fmt == "peft" else "kohya"}
    assert r["unmatched_total"] == 0
    assert r["rank"] == lf.RANK
    human = ok("lora", "info", files.lora[fam, fmt]).stdout
    if r["family"]:
        assert FAMILY_WORD[fam] in human.split("family:")[1].splitlines()[0]


# --- convert -------------------------------------------------------------------------------------------------------

_LORA_STYLES = ("kohya", "peft", "diffusers", "comfy")


def _convert_cases():
    for fam in FAMILIES:
        for fmt in FORMATS:
            for style in _LORA_STYLES:
                yield pytest.param(fam, fmt, style, id=f"{fam}-{fmt}-{style}")


@pytest.mark.parametrize(("fam", "fmt", "style"), list(_convert_cases()))
def test_convert_there_and_back(files, fam, fmt, style, tmp_path):
    src = files.lora[fam, fmt]
    want = files.deltas(fam, src)
    there = tmp_path / f"to_{style}.safetensors"
    # SD1 / SD2 PEFT names are the same and the small widths tell nothing: convert asks for --family
    fam_opt = ("--family", fam) if fmt == "peft" and fam in ("sd1", "sd2") else ()
    if fmt in ("loha", "lokr") and style in ("peft", "diffusers"):
        line = in_process("lora", "convert", src, "--to", style, "-o", there)
        assert line.returncode == 1 and line.stderr.startswith("ckptlab: error:"), line.stderr
        assert len(line.stderr.strip().splitlines()) == 1
        line = line.stderr
        assert not there.exists()
        assert style in line.lower() or "lycoris" in line.lower() or fmt in line.lower(), line
        return
    ok("lora", "convert", src, "--to", style, "-o", there, *fam_opt)
    if style != "comfy":  # comfy names are not in the hand tables; the round trip below covers them
        assert_deltas_equal(files.deltas(fam, there), want)
    back_style = "peft" if fmt == "peft" else "kohya"
    back = tmp_path / "back.safetensors"
    ok("lora", "convert", there, "--to", back_style, "-o", back, *fam_opt)
    assert_deltas_equal(files.deltas(fam, back), want)
    if style == back_style or (style in _LORA_STYLES and fam != "flux"):
        # no fused/split step: the round trip copies the tensors raw, same names
        a, b = load_file(src), load_file(back)
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k].float(), b[k].float()), k


@pytest.mark.parametrize("style", ("peft", "diffusers", "comfy"))
@pytest.mark.parametrize("fam", FAMILIES)
def test_converted_file_bakes_like_the_original(files, fam, style, tmp_path):
    """ckptlab reads what it writes: each style's file bakes to the kohya original's tensors."""
    conv = tmp_path / f"{style}.safetensors"
    ok("lora", "convert", files.lora[fam, "kohya"], "--to", style, "-o", conv)
    out = tmp_path / "baked.safetensors"
    ok("lora", "bake", files.base[fam], conv, "--strength", STRENGTH, "-o", out)
    want, got = load_file(files.baked(fam, "kohya")), load_file(out)
    assert list(got) == list(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


# --- resize --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fam", FAMILIES)
def test_resize_same_rank_exact_lower_rank_monotone(files, fam, fmt, tmp_path):
    src = files.lora[fam, fmt]
    want = files.deltas(fam, src)
    full = lf.RANK if fmt in ("kohya", "peft") else lf.RANK * lf.RANK  # LoHa / LoKr ΔW reach rank r²
    errs = {}
    for rank in sorted({full, 3, 2, 1}, reverse=True):
        out = tmp_path / f"r{rank}.safetensors"
        ok("lora", "resize", src, "--rank", rank, "-o", out)
        got = files.deltas(fam, out)
        errs[rank] = rel_err(got, want)
        if rank == full:
            assert_deltas_equal(got, want, rtol=1e-4, atol=1e-5)
    ranks = sorted(errs, reverse=True)
    assert errs[ranks[0]] < 1e-5
    for hi, lo in zip(ranks, ranks[1:], strict=False):
        assert errs[lo] > errs[hi], errs


# --- merge ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fam", FAMILIES)
def test_merge_is_weighted_sum_of_deltas(files, fam, tmp_path):
    names = ("kohya", "peft", "loha", "lokr")
    strengths = (0.7, -0.4, 0.5, 1.25)
    out = tmp_path / "merged.safetensors"
    ok("lora", "merge", *[files.lora[fam, f] for f in names], *[x for s in strengths for x in ("-s", s)],
       "-o", out)
    want: dict[str, torch.Tensor] = {}
    for f, s in zip(names, strengths, strict=True):
        for k, d in files.deltas(fam, files.lora[fam, f]).items():
            want[k] = want.get(k, torch.zeros_like(d)) + s * d
    assert_deltas_equal(files.deltas(fam, out), want, rtol=1e-4, atol=1e-5)
    # --rank re-factors the exact sum by SVD: at the sum's full rank (4 + 4 + 16 + 16) it is the same sum
    refac = tmp_path / "refactored.safetensors"
    ok("lora", "merge", *[files.lora[fam, f] for f in names], *[x for s in strengths for x in ("-s", s)],
       "--rank", 40, "-o", refac)
    assert_deltas_equal(files.deltas(fam, refac), want, rtol=1e-4, atol=1e-5)


# --- extract -------------------------------------------------------------------------------------------------------

def _extract_cases():
    for fam in FAMILIES:
        for fmt in FORMATS:
            yield pytest.param(fam, fmt, id=f"{fam}-{fmt}")


@pytest.mark.parametrize(("fam", "fmt"), list(_extract_cases()))
def test_extract_rebakes_to_tuned(files, fam, fmt, tmp_path):
    tuned = files.baked(fam, fmt)
    # LoHa/LoKr updates reach rank r²; PEFT's separate Flux q/k/v/proj_mlp pieces stack into one fused linear1
    # module of up to 4r (kohya names the fused weight)
    rank = lf.RANK if fmt == "kohya" or (fmt == "peft" and fam != "flux") else lf.RANK * lf.RANK
    ex = tmp_path / "extracted.safetensors"
    ok("lora", "extract", tuned, files.base[fam], "--rank", rank, "--conv-rank", rank, "--min-diff", "0", "-o", ex)
    rebaked = tmp_path / "rebaked.safetensors"
    ok("lora", "bake", files.base[fam], ex, "-o", rebaked)
    t, b = load_file(tuned), load_file(rebaked)
    assert list(t) == list(b)
    for k in t:
        torch.testing.assert_close(b[k], t[k], rtol=1e-5, atol=2e-6, msg=lambda m, k=k: f"{k}: {m}")


# --- refusals ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("lora_fam", "fmt", "base_fam"), [
    ("sdxl", "kohya", "sd1"), ("sd1", "kohya", "flux"), ("flux", "peft", "sdxl"), ("sd1", "lokr", "sdxl"),
    ("sdxl", "loha", "flux"), ("sd2", "kohya", "sd1"), ("sd1", "loha", "sd2")])
def test_bake_refuses_another_family(files, lora_fam, fmt, base_fam, tmp_path):
    out = tmp_path / "x.safetensors"
    line = refused("lora", "bake", files.base[base_fam], files.lora[lora_fam, fmt], "-o", out)
    assert f"this LoRA is for {FAMILY_WORD[lora_fam]}; the model is {FAMILY_WORD[base_fam]}" in line, line
    assert not out.exists()


def test_bake_refuses_sd1_peft_into_sd2_by_shape(files, tmp_path):
    """SD1 and SD2 PEFT files have the same names and no metadata: the shapes tell them apart."""
    out = tmp_path / "x.safetensors"
    line = refused("lora", "bake", files.base["sd2"], files.lora["sd1", "peft"], "-o", out)
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k" in line and "[64, 48]" in line, line
    assert not out.exists()


@pytest.mark.parametrize("fam", FAMILIES)
def test_bake_partial_match_names_the_rest_and_no_match_is_refused(files, fam, tmp_path):
    bogus = {"sd1": "lora_unet_down_blocks_9_attentions_0_proj_in", "sd2": "lora_te_text_model_encoder_layers_77_mlp_fc1",
             "sdxl": "lora_unet_input_blocks_42_1_proj_in", "flux": "lora_unet_double_blocks_99_img_attn_qkv"}[fam]
    tensors = load_file(files.lora[fam, "kohya"])
    extra = {bogus + ".lora_down.weight": torch.ones(4, 8), bogus + ".lora_up.weight": torch.ones(8, 4),
             bogus + ".alpha": torch.tensor(4.0)}
    partial = tmp_path / "partial.safetensors"
    save_file({**tensors, **extra}, str(partial), metadata={"ss_base_model_version": lf.BASE_VERSION[fam]})
    out = tmp_path / "out.safetensors"
    r = ok("lora", "bake", files.base[fam], partial, "--strength", STRENGTH, "-o", out)
    assert bogus in r.stderr and r.stderr.startswith("ckptlab: warning:"), r.stderr
    want, got = load_file(files.baked(fam, "kohya")), load_file(out)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    nothing = tmp_path / "nothing.safetensors"
    save_file(extra, str(nothing), metadata={"ss_base_model_version": lf.BASE_VERSION[fam]})
    r = in_process("lora", "bake", files.base[fam], nothing, "-o", tmp_path / "x.safetensors")
    assert r.returncode == 1 and r.stderr.startswith("ckptlab: error:") and len(r.stderr.splitlines()) == 1, r.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_merge_refuses_mixed_families(files, tmp_path):
    out = tmp_path / "x.safetensors"
    line = refused("lora", "merge", files.lora["sd1", "kohya"], files.lora["sdxl", "kohya"], "-o", out)
    assert "SD1" in line and "SDXL" in line, line
    line = refused("lora", "merge", files.lora["flux", "peft"], files.lora["sd2", "loha"], "-o", out)
    assert "Flux" in line and "SD2" in line, line
    assert not out.exists()


def test_extract_refuses_models_of_two_families(files, tmp_path):
    out = tmp_path / "x.safetensors"
    line = refused("lora", "extract", files.base["sdxl"], files.base["sd1"], "--rank", "4", "-o", out)
    assert "SD1" in line and "SDXL" in line, line
    assert not out.exists()


def test_recipe_refuses_a_lora_of_another_family(files, tmp_path):
    rf = tmp_path / "recipe.toml"
    rf.write_text(f"""version = 1
[inputs.A]
path = "{files.base['flux']}"
[inputs.L]
path = "{files.lora['sdxl', 'lokr']}"

[[steps]]
name = "styled"
method = "lora"
inputs = ["A", "L"]
""")
    out = tmp_path / "x.safetensors"
    line = refused("merge", "--recipe", rf, "-o", out)
    assert "SDXL" in line and "Flux" in line, line
    assert not out.exists()


# --- base + LoRAs + merge as one recipe ----------------------------------------------------------------------------

@pytest.mark.parametrize("fam", FAMILIES)
def test_recipe_equals_commands_one_by_one(files, fam, tmp_path):
    a, b = files.base[fam], files.other_model(fam)
    l1, l2 = files.lora[fam, "kohya"], files.lora[fam, "loha"]
    rf = tmp_path / "recipe.toml"
    rf.write_text(f"""version = 1
[inputs.A]
path = "{a}"
[inputs.B]
path = "{b}"
[inputs.L1]
path = "{l1}"
[inputs.L2]
path = "{l2}"

[[steps]]
name = "styled"
method = "lora"
inputs = ["A", "L1", "L2"]
strengths = [0.8, -0.5]

[[steps]]
name = "mix"
method = "weighted_sum"
inputs = ["styled", "B"]
alpha = 0.3
""")
    one = tmp_path / "recipe.safetensors"
    ok("merge", "--recipe", rf, "-o", one)
    baked = tmp_path / "baked.safetensors"
    ok("lora", "bake", a, l1, l2, "-s", "0.8", "-s", "-0.5", "-o", baked)
    two = tmp_path / "two.safetensors"
    ok("merge", "weighted_sum", baked, b, "--alpha", "0.3", "-o", two)
    x, y, base = load_file(one), load_file(two), load_file(a)
    assert list(x) == list(y)
    for k in x:
        assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k
    bk = load_file(baked)
    changed = {k for k in base if not torch.equal(bk[k], base[k])}
    assert changed == {m.key for m in lf.modules(fam, "kohya")}


@pytest.mark.parametrize(("fam", "width"), [("sd1", 768), ("sd2", 1024)])
def test_sd1_sd2_peft_told_apart_by_real_widths(fam, width, tmp_path):
    """The matrix's small SD1/SD2 PEFT files need --family (their widths are not real); at the real cross-attention /
    CLIP widths (768 SD1, 1024 SD2) info and convert tell the family from the keys alone."""
    g = torch.Generator().manual_seed(5)
    sd = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.randn(4, width, generator=g),
          "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.randn(640, 4, generator=g),
          "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, width, generator=g),
          "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(width, 4, generator=g)}
    src = tmp_path / "real.safetensors"
    save_file(sd, str(src))
    assert json.loads(ok("lora", "info", src, "--json").stdout)["family"] == fam
    out = tmp_path / "kohya.safetensors"
    ok("lora", "convert", src, "--to", "kohya", "-o", out)
    got = load_file(out)
    assert torch.equal(got["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"],
                       sd["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"])
    assert torch.equal(got["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight"],
                       sd["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight"])


@pytest.mark.parametrize(("fam", "sample"), [("sd1", "sd1_kohya_lora"), ("sd2", "sd2_kohya_lora"),
                                             ("sdxl", "sdxl_kohya_lora"), ("flux", "flux_kohya_lora")])
def test_full_layout_kohya_samples(files, fam, sample, tmp_path):
    """The samples cover every module kohya trains for the family: all of them match the checkpoint, info names
    the family, and kohya → diffusers → kohya (Flux: → comfy →, its diffusers names split q/k/v) is raw-exact."""
    src = make_model(tmp_path / f"{sample}.safetensors", sample)
    info = json.loads(ok("lora", "info", src, "--json").stdout)
    assert info["family"] == fam and info["unmatched_total"] == 0
    r = json.loads(ok("lora", "bake", files.base[fam], src, "-o", tmp_path / "b.safetensors", "--json").stdout)
    assert r["loras"][0]["matched"] == r["loras"][0]["modules"] == info["modules"] > 100
    via = "comfy" if fam == "flux" else "diffusers"
    ok("lora", "convert", src, "--to", via, "-o", tmp_path / "via.safetensors")
    ok("lora", "convert", tmp_path / "via.safetensors", "--to", "kohya", "-o", tmp_path / "back.safetensors")
    a, b = load_file(src), load_file(tmp_path / "back.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
