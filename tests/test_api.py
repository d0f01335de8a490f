"""The public Python API (``import ckptlab``): the exported names are a curated, documented list; importing
the package loads neither torch nor httpx; and each call does on real-layout sample files what the
command does, checked against an independent oracle (hashlib/zlib/blake3, torch, safetensors' own
loader, or the CLI's output for the same operation)."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from conftest import SRC
from fakes.civitai_server import FakeCivitai
from fakes.models import lora_bytes
from fakes.sample_files import make_model
from safetensors.torch import load_file

import ckptlab
from ckptlab.jsonable import dumps

#: the public API, written out by hand: a name added to or dropped from ``ckptlab.__all__`` fails here
EXPECTED = [
    "__version__",
    "open_model", "identify", "check", "hash_file",
    "convert", "prune", "precision", "extract", "replace", "to_diffusers", "from_diffusers", "merge",
    "lora_bake", "lora_extract", "lora_resize", "lora_merge", "lora_convert", "lora_info",
    "generate", "grid", "images", "preview",
    "Catalog", "scan", "show", "dupes",
    "link", "download",
    "TensorSource", "SafetensorsWriter", "ModelInfo", "CheckResult", "Hashes", "TransformResult",
    "FolderResult", "MergeResult", "GenerateResult", "GridResult", "ImageReport", "PreviewResult", "FileRecord", "ScanSummary", "DupesResult", "BakeResult", "ExtractResult",
    "ResizeResult", "LoraMergeResult", "LoraConvertResult", "LoraInfo", "LinkReport", "DownloadResult",
    "CkptlabError",
]

ROOT = Path(__file__).resolve().parents[1]


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def same_json(obj) -> object:
    """``obj`` as ``--json`` would print it (the CLI's serialiser), parsed back."""
    return json.loads(dumps(obj))


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------- the names


def test_exported_names_are_the_curated_list():
    assert ckptlab.__all__ == EXPECTED


@pytest.mark.parametrize("name", EXPECTED[1:])
def test_each_name_resolves_and_has_a_written_docstring(name):
    obj = getattr(ckptlab, name)
    doc = inspect.getdoc(obj) or ""
    assert doc.strip(), f"{name} has no docstring"
    assert not doc.startswith(f"{obj.__name__}("), f"{name}: only the dataclass's generated signature"
    if inspect.isfunction(obj):
        summary = doc.splitlines()[0]
        assert summary.endswith(".") or doc.splitlines()[1].strip(), f"{name}: a one-line summary first"
        for section in ("Args:", "Returns:", "Raises:"):
            assert section in doc, f"{name}'s docstring has no {section} section"
        for param in inspect.signature(obj).parameters:
            assert re.search(rf"\b{param}\b", doc.split("Args:", 1)[1]), f"{name}: argument {param} not documented"


def test_public_function_names_are_not_also_submodules():
    """``ckptlab.identify`` and ``ckptlab.merge`` are functions and nothing else: no submodule shares a public name,
    so ``mock.patch("ckptlab.merging.engine.X")`` and ``import ckptlab.arch.identify`` reach modules as usual."""
    import importlib
    import pkgutil

    submodules = {m.name for m in pkgutil.iter_modules(ckptlab.__path__)}
    assert submodules & set(ckptlab.__all__) == set()
    from ckptlab import identify, merge

    assert inspect.isfunction(identify) and inspect.isfunction(merge)
    assert importlib.import_module("ckptlab.merging.engine").__name__ == "ckptlab.merging.engine"
    from ckptlab.arch.identify import ModelInfo

    assert ModelInfo is ckptlab.ModelInfo


def _modules_after(code: str) -> set[str]:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, env=env, check=True, timeout=120).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_import_ckptlab_loads_neither_torch_nor_httpx():
    mods = _modules_after("import ckptlab\ndir(ckptlab)\nckptlab.__version__")
    assert "ckptlab" in mods
    assert not {m for m in mods if m.split(".")[0] in ("torch", "httpx")}


def test_submodules_and_functions_in_a_fresh_interpreter():
    """``import ckptlab.merging.graph as graph`` first thing (the merge tests do), then the public ``merge``:
    the module and the function are different names."""
    mods = _modules_after("import ckptlab.merging.graph as graph\nassert graph.__name__ == 'ckptlab.merging.graph'\n"
                          "import ckptlab, inspect\nassert inspect.isfunction(ckptlab.merge)\n"
                          "assert inspect.isfunction(ckptlab.identify)")
    assert "ckptlab.merging.graph" in mods


def test_resolving_every_name_loads_neither_torch_nor_httpx():
    mods = _modules_after("import ckptlab\nfor n in ckptlab.__all__: getattr(ckptlab, n)")
    assert "ckptlab.api" in mods
    assert not {m for m in mods if m.split(".")[0] in ("torch", "httpx")}


# ----------------------------------------------------------------------------------------- files


class _Samples(dict):
    """Sample files (small real layouts), each written on first use."""

    SPECS = {
        "sd1": ("sd1.safetensors", "sd1_checkpoint", {}),
        "sd1_ema": ("sd1-ema.safetensors", "sd1_checkpoint", {"ema": True, "dtype": "F16"}),
        "sd1_b": ("sd1-b.safetensors", "sd1_checkpoint", {"seed": 1}),
        "vae": ("vae.safetensors", "sd1_vae", {"seed": 5}),
        "ckpt": ("sd1.ckpt", "sd1_checkpoint", {"fmt": "ckpt", "ema": True, "dtype": "F16"}),
    }

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder

    def __missing__(self, key: str) -> Path:
        name, spec, kw = self.SPECS[key]
        self[key] = make_model(self.folder / name, spec, **kw)
        return self[key]


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return _Samples(tmp_path_factory.mktemp("samples"))


class _Work(dict):
    """Copies of the samples in a test's own folder, made on first use (outputs land next to their inputs)."""

    def __init__(self, folder: Path, samples: dict):
        super().__init__()
        self.folder, self.samples = folder, samples

    def __missing__(self, key: str) -> Path:
        self[key] = self.folder / self.samples[key].name
        shutil.copyfile(self.samples[key], self[key])
        return self[key]


@pytest.fixture
def work(tmp_path, samples):
    return _Work(tmp_path, samples)


def test_open_model_reads_what_safetensors_reads(samples):
    from safetensors import safe_open

    with ckptlab.open_model(samples["sd1"]) as src, safe_open(str(samples["sd1"]), "pt") as ref:
        assert sorted(src.keys()) == sorted(ref.keys())
        key = "first_stage_model.decoder.conv_in.weight"
        assert torch.equal(torch.as_tensor(src.get(key)), ref.get_tensor(key))


def test_identify_and_check_agree_with_the_commands(samples, tmp_path, cli):
    from hostile.corpus import os_system, p2

    from ckptlab.sample.build import SPECS

    info = ckptlab.identify(samples["sd1"])
    assert (info.kind, info.family) == (SPECS["sd1_checkpoint"].kind, SPECS["sd1_checkpoint"].family)
    shown = jsonl(cli("inspect", samples["sd1"], "--json").stdout)[0]
    assert same_json(info) == shown

    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(p2(os_system(tmp_path / "canary")))
    verdicts = {p.name: ckptlab.check(p).verdict for p in (samples["ckpt"], evil)}
    assert verdicts == {"sd1.ckpt": "safe", "evil.ckpt": "malicious"}
    assert not (tmp_path / "canary").exists()
    r = cli("check", samples["ckpt"], evil, "--json")
    assert {Path(d["path"]).name: d["verdict"] for d in jsonl(r.stdout)} == verdicts


def test_hash_file_matches_hashlib_zlib_and_blake3(samples, tmp_path, cli):
    blake3 = pytest.importorskip("blake3")
    data = samples["sd1"].read_bytes()
    n = int.from_bytes(data[:8], "little")
    want = {"sha256": hashlib.sha256(data).hexdigest().upper(),
            "autov1": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8].upper(),
            "autov2": hashlib.sha256(data).hexdigest()[:10].upper(),
            "autov3": hashlib.sha256(data[8 + n:]).hexdigest()[:12].upper(),
            "crc32": f"{zlib.crc32(data) & 0xFFFFFFFF:08X}",
            "blake3": blake3.blake3(data).hexdigest().upper(), "size": len(data)}
    h = ckptlab.hash_file(samples["sd1"])
    assert {k: getattr(h, k) for k in want} == want

    db = tmp_path / "cache.db"
    assert ckptlab.hash_file(samples["sd1"], db=db) == h  # computed, then stored in the catalog
    st = samples["sd1"].stat()
    with ckptlab.Catalog(db) as cat:
        assert cat.content((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))["hashes"] == h
    r = jsonl(cli("hash", samples["sd1"], "--db", db, "--json").stdout)[0]
    assert r["cached"] is True and r["sha256"] == want["sha256"]
    assert ckptlab.hash_file(samples["sd1"], db=db) == h  # from the cache


# ----------------------------------------------------------------------------------------- transforms


def test_convert_writes_what_torch_load_reads(work):
    from safetensors.torch import load_file

    want = torch.load(work["ckpt"], weights_only=True)["state_dict"]
    want = {k: v for k, v in want.items() if isinstance(v, torch.Tensor) and not k.startswith("model_ema.")}
    out_dir = work["ckpt"].parent / "converted"
    planned = ckptlab.convert(work["ckpt"], out_dir=out_dir, dry_run=True, drop_ema=True)
    assert not planned[0].output.exists()
    (res,) = ckptlab.convert([work["ckpt"]], out_dir=out_dir, drop_ema=True)
    assert res.output == out_dir / "sd1.safetensors" and res.dry_run is False
    assert same_tensors(load_file(res.output), want)
    with pytest.raises(ckptlab.CkptlabError) as err:  # an existing output is refused, as by the command
        ckptlab.convert(work["ckpt"], out_dir=out_dir, drop_ema=True)
    assert err.value.exit_code == 1


def test_prune_drops_exactly_the_ema_weights(work):
    src = load_file(work["sd1_ema"])
    (res,) = ckptlab.prune(work["sd1_ema"], out_dir=work["sd1_ema"].parent / "pruned")
    assert res.output.parent.name == "pruned"
    assert same_tensors(load_file(res.output), {k: v for k, v in src.items() if not k.startswith("model_ema.")})
    assert any(k.startswith("model_ema.") for k in src)
    before = sorted(work["sd1"].parent.iterdir())
    (same,) = ckptlab.prune(work["sd1"])  # nothing to prune: nothing written, and said why
    assert same.unchanged and sorted(work["sd1"].parent.iterdir()) == before


def test_precision_casts_like_torch_and_keeps_the_vae(work):
    src = load_file(work["sd1"])
    (res,) = ckptlab.precision(work["sd1"], "fp16")
    out = load_file(res.output)
    unet = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(out[unet], src[unet].to(torch.float16))
    assert all(v.dtype == torch.float32 for k, v in out.items() if k.startswith("first_stage_model."))


def test_extract_and_replace_move_the_vae_tensors(work, cli):
    src, vae = load_file(work["sd1"]), load_file(work["vae"])
    (ex,) = ckptlab.extract(work["sd1"], "vae", out=work["sd1"].parent / "api-vae.safetensors")
    out = load_file(ex.output)
    assert out and all(torch.equal(v, src["first_stage_model." + k]) for k, v in out.items())
    r = cli("extract", work["sd1"], "--component", "vae", "-o", work["sd1"].parent / "cli-vae.safetensors")
    assert r.returncode == 0, r.stderr
    assert same_tensors(load_file(work["sd1"].parent / "cli-vae.safetensors"), out)

    (rep,) = ckptlab.replace([work["sd1"]], vae=work["vae"])
    baked = load_file(rep.output)
    assert baked.keys() == src.keys()
    for k, v in baked.items():
        inner = k.removeprefix("first_stage_model.")
        assert torch.equal(v, vae[inner] if inner != k else src[k])


def test_to_and_from_diffusers_write_what_the_commands_write(work, cli):
    folder = ckptlab.to_diffusers(work["sd1"], work["sd1"].parent / "api-diffusers")
    assert folder.family == "sd1" and (folder.output / "model_index.json").is_file()
    assert cli("to-diffusers", work["sd1"], "-o", work["sd1"].parent / "cli-diffusers").returncode == 0
    api_files = sorted(p.relative_to(folder.output) for p in folder.output.rglob("*.safetensors"))
    cli_root = work["sd1"].parent / "cli-diffusers"
    assert api_files == sorted(p.relative_to(cli_root) for p in cli_root.rglob("*.safetensors")) and api_files
    for rel in api_files:
        assert same_tensors(load_file(folder.output / rel), load_file(cli_root / rel))

    back = ckptlab.from_diffusers(folder.output, work["sd1"].parent / "api-back.safetensors")
    assert cli("from-diffusers", cli_root, "-o", work["sd1"].parent / "cli-back.safetensors").returncode == 0
    assert same_tensors(load_file(back.output), load_file(work["sd1"].parent / "cli-back.safetensors"))


def test_merge_weighted_sum_is_the_weighted_sum(work):
    a, b = load_file(work["sd1"]), load_file(work["sd1_b"])
    res = ckptlab.merge("weighted_sum", [work["sd1"], work["sd1_b"]], work["sd1"].parent / "m.safetensors", alpha=0.3)
    out = load_file(res.output)
    assert res.family == "sd1" and out.keys() == a.keys()
    for k in ("model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.conv_in.weight",
              "cond_stage_model.transformer.text_model.final_layer_norm.weight"):
        assert torch.allclose(out[k], a[k] * 0.7 + b[k] * 0.3, rtol=1e-6, atol=1e-6), k


# ----------------------------------------------------------------------------------------- the catalog


@pytest.fixture
def library(tmp_path, samples):
    root = tmp_path / "models"
    (root / "Stable-diffusion").mkdir(parents=True)
    shutil.copyfile(samples["sd1"], root / "Stable-diffusion" / "a.safetensors")
    shutil.copyfile(samples["sd1"], root / "Stable-diffusion" / "a-copy.safetensors")
    (root / "Lora").mkdir()
    (root / "Lora" / "detail.safetensors").write_bytes(lora_bytes(seed=1))
    return root


def test_scan_catalog_show_and_dupes_agree_with_the_commands(library, tmp_path, cli):
    db = tmp_path / "lib.db"
    s = ckptlab.scan(library, db=db, hash=True)
    files = sorted(p for p in library.rglob("*.safetensors"))
    assert (s.files, s.new, s.errors) == (3, 3, 0)
    with ckptlab.Catalog(db) as cat:
        assert sorted(Path(r.path) for r in cat.files()) == files
        ckpts = cat.files(kind="checkpoint", family="sd1", sort="path")
    assert [Path(r.path).name for r in ckpts] == ["a-copy.safetensors", "a.safetensors"]
    listed = jsonl(cli("ls", "--db", db, "--json", "--kind", "checkpoint").stdout)
    assert sorted(d["path"] for d in listed) == [r.path for r in ckpts]

    target = library / "Stable-diffusion" / "a.safetensors"
    shown = ckptlab.show(target, db=db)
    assert same_json(shown) == jsonl(cli("show", target, "--db", db, "--json").stdout)
    assert shown[0]["hashes"]["SHA256"] == hashlib.sha256(target.read_bytes()).hexdigest().upper()

    res = ckptlab.dupes(db=db)
    assert [sorted(Path(c.path).name for c in g.copies) for g in res.groups] == [["a-copy.safetensors",
                                                                                  "a.safetensors"]]
    assert same_json(res.groups) == jsonl(cli("dupes", "--db", db, "--json").stdout)
    with ckptlab.Catalog(db) as cat:  # an open catalog is used as it is
        assert ckptlab.dupes(db=cat).groups == res.groups
        assert cat.files()  # and left open


def test_catalog_commands_raise_ckptlab_errors(tmp_path):
    with pytest.raises(ckptlab.CkptlabError):
        ckptlab.dupes(db=tmp_path / "none.db")  # no catalog there: never created by a read
    assert not (tmp_path / "none.db").exists()
    with pytest.raises(ckptlab.CkptlabError) as err:
        ckptlab.show("0123456789abcdef", db=ckptlab.Catalog(tmp_path / "empty.db"))
    assert err.value.exit_code == 1  # not in the catalog: a refused input (errors.EXIT_CODES)


# ----------------------------------------------------------------------------------------- CivitAI


@pytest.fixture
def civitai(monkeypatch):
    fake = FakeCivitai().start()
    fake.add_model(100, "Detail Tweaker", "LORA")
    fake.lora = lora_bytes(seed=1)
    fake.add_version(1000, 100, [(5000, "detail_tweaker.safetensors", fake.lora)], trained_words=["detailed"])
    monkeypatch.setenv("CIVITAI_API_TOKEN", fake.token)
    monkeypatch.setenv("CKPTLAB_HTTP_BACKOFF", "0")
    yield fake
    fake.stop()


def test_link_stores_the_versions_the_server_has(civitai, library, tmp_path, cli):
    db = tmp_path / "lib.db"
    rep = ckptlab.link(library, db=db, base_url=civitai.api_url)
    by_name = {Path(o.path).name: o for o in rep.outcomes}
    assert set(by_name) == {"a.safetensors", "a-copy.safetensors", "detail.safetensors"}
    lora = by_name["detail.safetensors"]
    assert (lora.status, lora.version_id, lora.model_id, lora.model_name) == ("linked", 1000, 100, "Detail Tweaker")
    assert {by_name[n].status for n in ("a.safetensors", "a-copy.safetensors")} == {"not_found"}
    shown = jsonl(cli("civitai", "show", library / "Lora" / "detail.safetensors", "--db", db, "--json").stdout)[0]
    assert shown["link"]["version_id"] == 1000 and shown["link"]["sha256"] == hashlib.sha256(
        (library / "Lora" / "detail.safetensors").read_bytes()).hexdigest().upper()
    # and `show` composes the stored link into the catalog record, as `ckptlab show` does
    (d,) = ckptlab.show(library / "Lora" / "detail.safetensors", db=db)
    assert d["civitai"]["version_id"] == 1000 and d["civitai"]["trigger_words"] == ["detailed"]


def test_download_verifies_and_catalogues(civitai, tmp_path):
    db = tmp_path / "lib.db"
    res = ckptlab.download("civitai:1000", dest=tmp_path / "webui", layout="a1111", db=db,
                           base_url=civitai.api_url)
    assert res.path == tmp_path / "webui" / "models" / "Lora" / "detail_tweaker.safetensors"
    assert res.path.read_bytes() == civitai.lora
    assert res.sha256 == hashlib.sha256(civitai.lora).hexdigest()
    with ckptlab.Catalog(db) as cat:
        assert cat.get_by_path(res.path).sha256 == res.sha256.upper()


# ----------------------------------------------------------------------------------------- docs/api.md


def test_the_worked_example_in_docs_api_md_runs(tmp_path, samples):
    """The ``python`` block of docs/api.md, run as a script against a sample library."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1, "docs/api.md has one runnable example"
    script = tmp_path / "manager.py"
    script.write_text(blocks[0], encoding="utf-8")
    lib = tmp_path / "models"
    (lib / "Stable-diffusion").mkdir(parents=True)
    ckpt = lib / "Stable-diffusion" / "old.ckpt"
    shutil.copyfile(samples["ckpt"], ckpt)
    shutil.copyfile(samples["sd1_b"], lib / "Stable-diffusion" / "b.safetensors")
    shutil.copyfile(samples["sd1_b"], lib / "Stable-diffusion" / "b-copy.safetensors")
    (lib / "Lora").mkdir()
    (lib / "Lora" / "detail.safetensors").write_bytes(lora_bytes(seed=1))
    env = dict(os.environ, PYTHONPATH=str(SRC))
    r = subprocess.run([sys.executable, str(script), str(lib), str(tmp_path / "catalog.db")], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "scanned 4 files: 4 new, 0 errors"
    assert "sd1: b-copy.safetensors, b.safetensors, old.ckpt" in lines
    assert any(line.startswith("converted old.ckpt -> old.safetensors") for line in lines)
    want = torch.load(samples["ckpt"], weights_only=True)["state_dict"]
    assert same_tensors(load_file(ckpt.with_suffix(".safetensors")),
                        {k: v for k, v in want.items() if isinstance(v, torch.Tensor)})
    assert "scanned 5 files: 1 new, 0 errors" in lines
    assert "duplicate (exact): keep b-copy.safetensors, also held as b.safetensors" in lines or \
        "duplicate (exact): keep b.safetensors, also held as b-copy.safetensors" in lines
    assert "duplicate (same_weights): keep old.safetensors, also held as old.ckpt" in lines
    assert not Path(os.environ["CKPTLAB_DB"]).exists()  # only the catalog it was given
