"""LoRA files of any family and format with known random values, and an independent ΔW oracle for them.

The module names are written out by hand from the real namings (kohya's ``lora_unet_…`` / ``lora_te…_``;
diffusers' module paths for PEFT ``unet.`` / ``transformer.`` / ``text_encoder(_2).``), each with the key of the
weight it adapts in the small sample checkpoints (``tests/fakes/sample_files.make_model``) and, for a fused weight,
the rows it covers. Nothing here is taken from ``ckptlab.lora.naming``, so the tests that use it check ckptlab's
tables against an independent list.

Formulas (what the loaders apply, issue 14):

- LoRA:  ΔW = (α / r) · up @ down (3×3 conv: up [out, r, 1, 1] composed with down [r, in, 3, 3]);
- LoHa:  ΔW = (α / r) · (w1a @ w1b) ⊙ (w2a @ w2b), r = w1b's rows;
- LoKr:  ΔW = (α / r) · kron(w1, w2), w2 = w2a @ w2b factored, r = w2b's rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FAMILIES = ("sd1", "sd2", "sdxl", "flux")
FORMATS = ("kohya", "peft", "loha", "lokr")
#: the small sample checkpoint of each family
CHECKPOINT = {"sd1": "sd1_checkpoint", "sd2": "sd2_checkpoint", "sdxl": "sdxl_checkpoint", "flux": "flux_dev"}
RANK = 4
#: alphas ≠ rank, different for the UNet/DiT and the text encoders
#: ``ss_base_model_version`` as kohya's trainers write it (kohya and LyCORIS files; diffusers' PEFT files have none)
BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "flux": "flux1"}
ALPHA = {"kohya": {"unet": 2.0, "te": 6.0}, "peft": {"unet": 2.0, "te": 6.0},
         "loha": {"unet": 3.0, "te": 5.0}, "lokr": {"unet": 2.0, "te": 8.0}}

_U = "model.diffusion_model."
_TE_SD1 = "cond_stage_model.transformer.text_model.encoder.layers."
_TE_SD2 = "cond_stage_model.model.transformer.resblocks."
_TE1_XL = "conditioner.embedders.0.transformer.text_model.encoder.layers."
_TE2_XL = "conditioner.embedders.1.model.transformer.resblocks."


@dataclass(frozen=True)
class Mod:
    """One adapted module: its name in the LoRA file, the checkpoint key it changes, the rows of that key it
    covers (``("q", 3)`` = the first third of a fused q/k/v weight; ``(a, b)`` ints = rows a:b; None = all)."""
    name: str
    key: str
    rows: tuple | None = None

    @property
    def te(self) -> bool:
        return self.name.startswith(("lora_te", "text_encoder"))


# kohya names (also LoHa / LoKr): SD1/SD2 UNet paths in diffusers names, SDXL in SGM names; text encoders in HF
# CLIP names (kohya converts OpenCLIP's fused in_proj into q/k/v rows)
KOHYA = {
    "sd1": [
        Mod("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            _U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"),
        Mod("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
            _U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"),
        Mod("lora_unet_down_blocks_0_resnets_0_conv1", _U + "input_blocks.1.0.in_layers.2.weight"),  # 3×3 conv
        Mod("lora_unet_mid_block_attentions_0_proj_in", _U + "middle_block.1.proj_in.weight"),  # 1×1 conv
        Mod("lora_te_text_model_encoder_layers_0_self_attn_q_proj", _TE_SD1 + "0.self_attn.q_proj.weight"),
        Mod("lora_te_text_model_encoder_layers_0_mlp_fc1", _TE_SD1 + "0.mlp.fc1.weight"),
    ],
    "sd2": [
        Mod("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            _U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"),
        Mod("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
            _U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"),
        Mod("lora_unet_down_blocks_0_resnets_0_conv1", _U + "input_blocks.1.0.in_layers.2.weight"),
        Mod("lora_unet_mid_block_attentions_0_proj_in", _U + "middle_block.1.proj_in.weight"),
        Mod("lora_te_text_model_encoder_layers_0_self_attn_k_proj", _TE_SD2 + "0.attn.in_proj_weight", ("k", 3)),
        Mod("lora_te_text_model_encoder_layers_0_mlp_fc1", _TE_SD2 + "0.mlp.c_fc.weight"),
        Mod("lora_te_text_model_encoder_layers_1_self_attn_out_proj", _TE_SD2 + "1.attn.out_proj.weight"),
    ],
    "sdxl": [
        Mod("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            _U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"),
        Mod("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
            _U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"),
        Mod("lora_unet_input_blocks_1_0_in_layers_2", _U + "input_blocks.1.0.in_layers.2.weight"),  # 3×3 conv
        Mod("lora_unet_middle_block_1_proj_in", _U + "middle_block.1.proj_in.weight"),
        Mod("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", _TE1_XL + "0.self_attn.q_proj.weight"),
        Mod("lora_te2_text_model_encoder_layers_0_self_attn_v_proj", _TE2_XL + "0.attn.in_proj_weight", ("v", 3)),
        Mod("lora_te2_text_model_encoder_layers_0_mlp_fc2", _TE2_XL + "0.mlp.c_proj.weight"),
    ],
    "flux": [
        Mod("lora_unet_double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv.weight"),
        Mod("lora_unet_double_blocks_0_img_mlp_0", "double_blocks.0.img_mlp.0.weight"),
        Mod("lora_unet_double_blocks_0_txt_attn_proj", "double_blocks.0.txt_attn.proj.weight"),
        Mod("lora_unet_single_blocks_0_linear1", "single_blocks.0.linear1.weight"),
        Mod("lora_unet_single_blocks_0_linear2", "single_blocks.0.linear2.weight"),
    ],
}

# PEFT / diffusers module paths (diffusers' UNet2DConditionModel, CLIPTextModel(WithProjection),
# FluxTransformer2DModel), prefixed by the pipeline component
PEFT = {
    "sd1": [
        Mod("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            _U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"),
        Mod("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
            _U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"),
        Mod("unet.down_blocks.0.resnets.0.conv1", _U + "input_blocks.1.0.in_layers.2.weight"),
        Mod("unet.mid_block.attentions.0.proj_in", _U + "middle_block.1.proj_in.weight"),
        Mod("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", _TE_SD1 + "0.self_attn.q_proj.weight"),
        Mod("text_encoder.text_model.encoder.layers.0.mlp.fc1", _TE_SD1 + "0.mlp.fc1.weight"),
    ],
    "sd2": [
        Mod("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            _U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"),
        Mod("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
            _U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"),
        Mod("unet.down_blocks.0.resnets.0.conv1", _U + "input_blocks.1.0.in_layers.2.weight"),
        Mod("unet.mid_block.attentions.0.proj_in", _U + "middle_block.1.proj_in.weight"),
        Mod("text_encoder.text_model.encoder.layers.0.self_attn.k_proj", _TE_SD2 + "0.attn.in_proj_weight",
            ("k", 3)),
        Mod("text_encoder.text_model.encoder.layers.0.mlp.fc1", _TE_SD2 + "0.mlp.c_fc.weight"),
        Mod("text_encoder.text_model.encoder.layers.1.self_attn.out_proj", _TE_SD2 + "1.attn.out_proj.weight"),
    ],
    "sdxl": [
        Mod("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            _U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"),
        Mod("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
            _U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"),
        Mod("unet.down_blocks.0.resnets.0.conv1", _U + "input_blocks.1.0.in_layers.2.weight"),
        Mod("unet.mid_block.attentions.0.proj_in", _U + "middle_block.1.proj_in.weight"),
        Mod("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", _TE1_XL + "0.self_attn.q_proj.weight"),
        Mod("text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj", _TE2_XL + "0.attn.in_proj_weight",
            ("v", 3)),
        Mod("text_encoder_2.text_model.encoder.layers.0.mlp.fc2", _TE2_XL + "0.mlp.c_proj.weight"),
    ],
    "flux": [
        Mod("transformer.transformer_blocks.0.attn.to_k", "double_blocks.0.img_attn.qkv.weight", ("k", 3)),
        Mod("transformer.transformer_blocks.0.ff.net.0.proj", "double_blocks.0.img_mlp.0.weight"),
        Mod("transformer.transformer_blocks.0.attn.to_add_out", "double_blocks.0.txt_attn.proj.weight"),
        # single block linear1 = [q; k; v; mlp] rows (hidden 64 in the small layout)
        Mod("transformer.single_transformer_blocks.0.attn.to_q", "single_blocks.0.linear1.weight", (0, 64)),
        Mod("transformer.single_transformer_blocks.0.proj_mlp", "single_blocks.0.linear1.weight", (192, 448)),
        Mod("transformer.single_transformer_blocks.0.proj_out", "single_blocks.0.linear2.weight"),
    ],
}


#: names the converter may write for parts of a fused Flux weight (split q/k/v, linear1 parts), read by the oracle only
ALIASES = {
    "flux": [
        Mod("transformer.transformer_blocks.0.attn.to_q", "double_blocks.0.img_attn.qkv.weight", ("q", 3)),
        Mod("transformer.transformer_blocks.0.attn.to_v", "double_blocks.0.img_attn.qkv.weight", ("v", 3)),
        Mod("transformer.single_transformer_blocks.0.attn.to_k", "single_blocks.0.linear1.weight", (64, 128)),
        Mod("transformer.single_transformer_blocks.0.attn.to_v", "single_blocks.0.linear1.weight", (128, 192)),
    ],
}


def modules(family: str, fmt: str) -> list[Mod]:
    return PEFT[family] if fmt == "peft" else KOHYA[family]


def row_slice(mod: Mod, rows_total: int) -> slice:
    if mod.rows is None:
        return slice(0, rows_total)
    if isinstance(mod.rows[0], str):
        part, n = mod.rows
        size = rows_total // n
        i = "qkv".index(part)
        return slice(i * size, (i + 1) * size)
    return slice(*mod.rows)


def _shapes(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(checkpoint), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _divisor(n: int) -> int:
    return next(d for d in (4, 2, 1) if n % d == 0)


def build(path: Path, family: str, fmt: str, checkpoint: Path, *, seed: int = 0,
          metadata: dict | None = None) -> Path:
    """Write a ``fmt`` LoRA (kohya / peft / loha / lokr) for ``family`` with seeded random factors, its shapes taken
    from ``checkpoint``'s weights (rows of a fused weight for a slice), rank ``RANK`` and the alphas of ``ALPHA``."""
    shapes = _shapes(checkpoint)
    g = torch.Generator().manual_seed(seed * 1000 + FAMILIES.index(family) * 10 + FORMATS.index(fmt))
    out: dict[str, torch.Tensor] = {}

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32) * 0.2

    r = RANK
    for m in modules(family, fmt):
        full = shapes[m.key]
        sl = row_slice(m, full[0])
        o, i, k = sl.stop - sl.start, full[1], tuple(full[2:])
        alpha = ALPHA[fmt]["te" if m.te else "unet"]
        if fmt == "kohya":
            out[m.name + ".lora_down.weight"] = rnd(r, i, *k)
            out[m.name + ".lora_up.weight"] = rnd(o, r, *((1, 1) if k else ()))
            out[m.name + ".alpha"] = torch.tensor(alpha)
        elif fmt == "peft":
            out[m.name + ".lora_A.weight"] = rnd(r, i, *k)
            out[m.name + ".lora_B.weight"] = rnd(o, r, *((1, 1) if k else ()))
        elif fmt == "loha":
            kk = int(torch.tensor(k).prod()) if k else 1
            out[m.name + ".hada_w1_a"] = rnd(o, r)
            out[m.name + ".hada_w1_b"] = rnd(r, i * kk)
            out[m.name + ".hada_w2_a"] = rnd(o, r)
            out[m.name + ".hada_w2_b"] = rnd(r, i * kk)
            out[m.name + ".alpha"] = torch.tensor(alpha)
        elif fmt == "lokr":
            kk = int(torch.tensor(k).prod()) if k else 1
            a, b = _divisor(o), _divisor(i)
            out[m.name + ".lokr_w1"] = rnd(a, b)
            out[m.name + ".lokr_w2_a"] = rnd(o // a, r)
            out[m.name + ".lokr_w2_b"] = rnd(r, (i // b) * kk)
            out[m.name + ".alpha"] = torch.tensor(alpha)
        else:
            raise ValueError(fmt)
    md = dict(metadata or {})
    if fmt != "peft":
        md.setdefault("ss_base_model_version", BASE_VERSION[family])
        md.setdefault("ss_network_module", "networks.lora" if fmt == "kohya" else "lycoris.kohya")
    if fmt == "peft":
        comps = sorted({m.name.split(".")[0] for m in modules(family, fmt)})
        cfg = {}
        for c in comps:
            cfg[f"{c}.r"] = r
            cfg[f"{c}.lora_alpha"] = ALPHA[fmt]["te" if c.startswith("text_encoder") else "unet"]
        md["lora_adapter_metadata"] = json.dumps(cfg)
    save_file(out, str(path), metadata=md)
    return Path(path)


# --- the oracle ----------------------------------------------------------------------------------------------------

_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".lora.down.weight",
             ".lora.up.weight", ".alpha", ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".lokr_w1",
             ".lokr_w2_a", ".lokr_w2_b", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b")


def read_modules(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """The file's tensors grouped by module name (suffix → tensor) and its header metadata."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), "pt") as f:
        md = f.metadata() or {}
        for key in f.keys():
            suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
            assert suffix is not None, f"unexpected key {key}"
            groups.setdefault(key[: -len(suffix)], {})[suffix] = f.get_tensor(key).float()
    return groups, md


def _peft_alpha(md: dict, name: str) -> float | None:
    raw = md.get("lora_adapter_metadata")
    if not raw:
        return None
    cfg = json.loads(raw)
    comp, _, inner = name.partition(".")
    for pat, v in (cfg.get(f"{comp}.alpha_pattern") or {}).items():
        if inner == pat or inner.endswith("." + pat):
            return float(v)
    a = cfg.get(f"{comp}.lora_alpha")
    return None if a is None else float(a)


def module_delta(p: dict[str, torch.Tensor], shape: tuple[int, ...], alpha_md: float | None = None) -> torch.Tensor:
    """ΔW of one module by the formulas above, shaped ``shape`` (the rows it covers)."""
    alpha = float(p[".alpha"]) if ".alpha" in p else alpha_md
    if ".hada_w1_a" in p:
        r = p[".hada_w1_b"].shape[0]
        d = (p[".hada_w1_a"] @ p[".hada_w1_b"]) * (p[".hada_w2_a"] @ p[".hada_w2_b"])
    elif ".lokr_w1" in p:
        r = p[".lokr_w2_b"].shape[0]
        w2 = p[".lokr_w2_a"] @ p[".lokr_w2_b"]
        if len(shape) == 4:
            w2 = w2.reshape(shape[0] // p[".lokr_w1"].shape[0], shape[1] // p[".lokr_w1"].shape[1], *shape[2:])
            d = torch.kron(p[".lokr_w1"][:, :, None, None], w2)
        else:
            d = torch.kron(p[".lokr_w1"], w2)
    else:
        down = next(p[s] for s in (".lora_down.weight", ".lora_A.weight", ".lora.down.weight") if s in p)
        up = next(p[s] for s in (".lora_up.weight", ".lora_B.weight", ".lora.up.weight") if s in p)
        r = down.shape[0]
        d = up.reshape(up.shape[0], -1) @ down.reshape(r, -1)
    scale = 1.0 if alpha is None else alpha / r
    return (d * scale).reshape(shape)


def deltas(path: Path, family: str, checkpoint_shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """ΔW per checkpoint key (full shape, zeros outside the rows covered) of a LoRA file whose modules carry the
    kohya or PEFT names of this module (any other name is an error)."""
    by_name = {m.name: m for m in KOHYA[family] + PEFT[family] + ALIASES.get(family, [])}
    groups, md = read_modules(path)
    out: dict[str, torch.Tensor] = {}
    for name, p in groups.items():
        if set(p) == {".alpha"}:
            continue
        assert name in by_name, f"{path.name}: module {name!r} not in the hand-written tables"
        m = by_name[name]
        full = checkpoint_shapes[m.key]
        sl = row_slice(m, full[0])
        d = module_delta(p, (sl.stop - sl.start, *full[1:]), _peft_alpha(md, name))
        acc = out.setdefault(m.key, torch.zeros(full))
        acc[sl] += d
    return out


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return _shapes(path)
