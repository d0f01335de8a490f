"""``LoraFile``: every key grammar of the file docstring parsed into modules, alphas (tensor and PEFT metadata),
rank per algorithm, scale rules, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from fakes.sample_files import make_model
from safetensors.torch import save_file

from ckptlab.errors import MismatchError
from ckptlab.lora.file import LoraFile

U = "lora_unet_down_blocks_0_attentions_0_proj_in"
T = "transformer.transformer_blocks.0.attn.to_q"


def _write(tmp_path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, name="l"):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _r(*shape):
    return torch.randn(*shape)


# (module name, {suffix: tensor}, expected algo, expected roles)
GRAMMARS = [
    (U, {".lora_down.weight": _r(4, 8), ".lora_up.weight": _r(8, 4), ".alpha": torch.tensor(2.0)},
     "lora", {"down", "up", "alpha"}),
    ("lora_unet_conv_in", {".lora_down.weight": _r(4, 8, 3, 3), ".lora_mid.weight": _r(4, 4, 3, 3),
                           ".lora_up.weight": _r(8, 4, 1, 1), ".alpha": torch.tensor(4.0)},
     "lora", {"down", "mid", "up", "alpha"}),
    ("lora_unet_mid_block_attentions_0_proj_out", {".lora_down.weight": _r(4, 8), ".lora_up.weight": _r(8, 4),
                                                    ".dora_scale": _r(8, 1)}, "lora", {"down", "up", "dora"}),
    (T, {".lora_A.weight": _r(4, 8), ".lora_B.weight": _r(8, 4), ".lora_B.bias": _r(8),
         ".lora_magnitude_vector": _r(8)}, "lora", {"down", "up", "up_bias", "dora"}),
    ("base_model.model.down_blocks.0.attentions.0.proj_out", {".lora_A.default.weight": _r(4, 8),
                                                              ".lora_B.default.weight": _r(8, 4)},
     "lora", {"down", "up"}),
    ("unet.mid_block.attentions.0.proj_in", {".lora.down.weight": _r(4, 8), ".lora.up.weight": _r(8, 4)},
     "lora", {"down", "up"}),
    ("text_encoder.text_model.encoder.layers.0.mlp.fc1", {".lora_linear_layer.down.weight": _r(4, 8),
                                                          ".lora_linear_layer.up.weight": _r(8, 4)},
     "lora", {"down", "up"}),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q",
     {"_lora.down.weight": _r(4, 8), "_lora.up.weight": _r(8, 4)}, "lora", {"down", "up"}),
    ("double_blocks.0.processor.qkv_lora1", {".down.weight": _r(4, 8), ".up.weight": _r(24, 4)},
     "lora", {"down", "up"}),
    ("lora_unet_a", {".hada_w1_a": _r(8, 4), ".hada_w1_b": _r(4, 8), ".hada_w2_a": _r(8, 4), ".hada_w2_b": _r(4, 8),
                     ".alpha": torch.tensor(4.0)}, "loha", {"w1a", "w1b", "w2a", "w2b", "alpha"}),
    ("lora_unet_b", {".hada_w1_a": _r(4, 8), ".hada_w1_b": _r(4, 8), ".hada_w2_a": _r(4, 8), ".hada_w2_b": _r(4, 8),
                     ".hada_t1": _r(4, 4, 3, 3), ".hada_t2": _r(4, 4, 3, 3)},
     "loha", {"w1a", "w1b", "w2a", "w2b", "t1", "t2"}),
    ("lora_unet_c", {".lokr_w1": _r(2, 2), ".lokr_w2": _r(4, 4)}, "lokr", {"k1", "k2"}),
    ("lora_unet_d", {".lokr_w1_a": _r(2, 1), ".lokr_w1_b": _r(1, 2), ".lokr_w2_a": _r(4, 2), ".lokr_w2_b": _r(2, 4),
                     ".lokr_t2": _r(2, 2, 3, 3), ".alpha": torch.tensor(1.0)},
     "lokr", {"k1a", "k1b", "k2a", "k2b", "kt2", "alpha"}),
    ("lora_unet_e", {".diff": _r(8, 8), ".diff_b": _r(8)}, "full", {"diff", "diff_b"}),
    ("lora_unet_f", {".w_norm": _r(8), ".b_norm": _r(8)}, "norm", {"w_norm", "b_norm"}),
    ("lora_unet_g", {".oft_blocks": _r(2, 4, 4), ".rescale": _r(8, 1), ".alpha": torch.tensor(0.0)},
     "oft", {"oft", "rescale", "alpha"}),
    ("lora_unet_h", {".oft_blocks": _r(2, 2, 4, 4)}, "boft", {"oft"}),
    ("lora_unet_i", {".a1.weight": _r(8, 2), ".a2.weight": _r(2, 8), ".b1.weight": _r(8, 2), ".b2.weight": _r(2, 8),
                     ".bm.weight": _r(8)}, "glora", {"a1", "a2", "b1", "b2", "bm"}),
    ("lora_unet_j", {".weight": _r(8), ".on_input": torch.tensor(0)}, "ia3", {"ia3", "on_input"}),
]


def test_every_key_grammar(tmp_path):
    tensors = {name + sfx: t for name, params, _, _ in GRAMMARS for sfx, t in params.items()}
    tensors["bundle_emb.myemb.string_to_param.*"] = _r(2, 8)
    tensors["some_unknown_key"] = _r(2)
    tensors["lora_unet_orphan.alpha"] = torch.tensor(1.0)  # an alpha alone: nothing to apply
    with LoraFile.open(_write(tmp_path, tensors)) as lf:
        assert set(lf.modules) == {g[0] for g in GRAMMARS}
        for name, params, algo, roles in GRAMMARS:
            mod = lf.modules[name]
            assert mod.algo == algo, name
            assert set(mod.params) == roles, name
            for sfx in params:
                assert name + sfx in mod.params.values()
        assert set(lf.extras) == {"bundle_emb.myemb.string_to_param.*", "some_unknown_key",
                                  "lora_unet_orphan.alpha"}


def test_rank_per_algorithm(tmp_path):
    tensors = {name + sfx: t for name, params, _, _ in GRAMMARS for sfx, t in params.items()}
    with LoraFile.open(_write(tmp_path, tensors)) as lf:
        m = lf.modules
        assert lf.rank(m[U]) == 4                # lora_down.shape[0]
        assert lf.rank(m[T]) == 4                # lora_A.shape[0]
        assert lf.rank(m["lora_unet_a"]) == 4    # hada_w1_b.shape[0]
        assert lf.rank(m["lora_unet_d"]) == 2    # lokr_w2_b.shape[0] first
        assert lf.rank(m["lora_unet_c"]) is None  # both LoKr factors full
        assert lf.scale(m["lora_unet_c"]) == 1.0
        assert lf.scale(m[U]) == 2.0 / 4
        assert lf.scale(m["lora_unet_a"]) == 1.0  # alpha 4, rank 4
        assert lf.scale(m["lora_unet_d"]) == 0.5


def test_alpha_zero_gives_scale_zero(tmp_path):
    """Documented decision: a stored alpha of 0 disables the module (A1111, ComfyUI, kohya's merge)."""
    p = _write(tmp_path, {U + ".lora_down.weight": _r(4, 8), U + ".lora_up.weight": _r(8, 4),
                          U + ".alpha": torch.tensor(0.0)})
    with LoraFile.open(p) as lf:
        assert lf.alpha(lf.modules[U]) == 0.0 and lf.scale(lf.modules[U]) == 0.0


def test_no_alpha_means_scale_one(tmp_path):
    p = _write(tmp_path, {U + ".lora_down.weight": _r(4, 8), U + ".lora_up.weight": _r(8, 4)})
    with LoraFile.open(p) as lf:
        assert lf.alpha(lf.modules[U]) is None and lf.scale(lf.modules[U]) == 1.0


def _peft(tmp_path, cfg, names=("unet.down_blocks.0.attentions.0.proj_in", "unet.mid_block.attentions.0.proj_in",
                                "text_encoder.text_model.encoder.layers.0.mlp.fc1")):
    t = {}
    for n in names:
        t[n + ".lora_A.weight"] = _r(4, 8)
        t[n + ".lora_B.weight"] = _r(8, 4)
    return _write(tmp_path, t, {"lora_adapter_metadata": json.dumps(cfg)}, name="peft")


def test_peft_alphas_from_prefixed_metadata(tmp_path):
    """diffusers' ``write_lora_layers`` packs each component's LoraConfig with a ``<component>.`` prefix."""
    cfg = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"mid_block.attentions.0.proj_in": 2},
           "text_encoder.r": 4, "text_encoder.lora_alpha": 1, "text_encoder.alpha_pattern": {}}
    with LoraFile.open(_peft(tmp_path, cfg)) as lf:
        m = lf.modules
        assert lf.alpha(m["unet.down_blocks.0.attentions.0.proj_in"]) == 8
        assert lf.alpha(m["unet.mid_block.attentions.0.proj_in"]) == 2
        assert lf.alpha(m["text_encoder.text_model.encoder.layers.0.mlp.fc1"]) == 1
        assert lf.scale(m["unet.down_blocks.0.attentions.0.proj_in"]) == 2.0


def test_peft_alphas_unprefixed_and_regex_patterns(tmp_path):
    """``save_lora_adapter`` writes one unprefixed config; PEFT matches ``alpha_pattern`` keys as regexes at the end
    of the module name (``get_pattern_key``), first match wins."""
    from peft.utils.other import get_pattern_key

    pattern = {r"down_blocks\.\d+\.attentions\.0\.proj_in": 3, "proj_in": 5}
    cfg = {"r": 4, "lora_alpha": 7, "alpha_pattern": pattern}
    names = ("unet.down_blocks.0.attentions.0.proj_in", "unet.mid_block.attentions.0.proj_in",
             "text_encoder.text_model.encoder.layers.0.mlp.fc1")
    with LoraFile.open(_peft(tmp_path, cfg, names)) as lf:
        for n in names:
            inner = n.split(".", 1)[1]
            key = get_pattern_key(pattern.keys(), inner)
            assert lf.alpha(lf.modules[n]) == pattern.get(key, 7), n


def test_peft_without_metadata_has_no_alpha(tmp_path):
    with LoraFile.open(make_model(tmp_path / "p.safetensors", "sd1_peft_lora")) as lf:
        mod = next(iter(lf.modules.values()))
        assert lf.alpha(mod) is None and lf.scale(mod) == 1.0


@pytest.mark.parametrize(("alpha", "match"), [(torch.tensor([1.0, 2.0]), "2 values"),
                                               (torch.tensor(float("nan")), "not a finite"),
                                               (torch.tensor(float("inf")), "not a finite")])
def test_hostile_alpha_tensor_is_a_clear_error(tmp_path, alpha, match):
    p = _write(tmp_path, {U + ".lora_down.weight": _r(4, 8), U + ".lora_up.weight": _r(8, 4), U + ".alpha": alpha})
    with LoraFile.open(p) as lf, pytest.raises(MismatchError, match=match):
        lf.scale(lf.modules[U])


def test_hostile_alpha_in_metadata_is_a_clear_error(tmp_path):
    p = _peft(tmp_path, {"unet.lora_alpha": float("nan")})  # json.dumps writes NaN, json.loads reads it
    with LoraFile.open(p) as lf, pytest.raises(MismatchError, match="not a finite"):
        lf.alpha(lf.modules["unet.down_blocks.0.attentions.0.proj_in"])


def test_deeply_nested_peft_metadata_is_ignored_not_a_crash(tmp_path):
    """A hostile ``lora_adapter_metadata`` nested 200,000 deep: plain ``json.loads`` raises RecursionError."""
    t = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": _r(4, 8),
         "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": _r(8, 4)}
    p = _write(tmp_path, t, {"lora_adapter_metadata": "[" * 200_000}, name="deep")
    with LoraFile.open(p) as lf:
        assert lf.alpha(next(iter(lf.modules.values()))) is None


def test_non_lora_file_is_refused(tmp_path):
    with pytest.raises(MismatchError, match="not a LoRA"):
        LoraFile.open(make_model(tmp_path / "u.safetensors", "sd1_unet"))


def test_non_lora_file_is_one_line_on_the_cli(tmp_path, cli):
    r = cli("lora", "convert", make_model(tmp_path / "u.safetensors", "sd1_unet"), "--to", "peft", "-o",
            tmp_path / "o.safetensors")
    assert r.returncode not in (0, 70)
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "not a LoRA" in r.stderr


def test_sample_files_parse(tmp_path):
    for spec, algo in (("sd1_kohya_lora", "lora"), ("sd1_loha", "loha"), ("sd1_lokr", "lokr"),
                       ("sd1_oft", "oft"), ("sd1_glora", "glora"), ("flux_xlabs_lora", "lora")):
        with LoraFile.open(make_model(tmp_path / f"{spec}.safetensors", spec)) as lf:
            assert {m.algo for m in lf.modules.values()} == {algo}, spec
