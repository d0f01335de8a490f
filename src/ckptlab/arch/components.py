"""Which component each key of a model file belongs to.

Stable API (other modules build on it; keep the signatures):

``COMPONENTS``
    The component names, in report order: ``unet``, ``dit``, ``vae``, ``clip_l``, ``clip_g``, ``openclip_h``,
    ``t5xxl``, ``ema``, ``training`` (optimizer / Lightning state), ``other`` (schedule buffers, marker keys,
    depth models, adapter keys, anything unrecognised).

``COMPONENT_PREFIXES[layout][component] -> tuple[str, ...]``
    The key prefixes each component lives under, per layout: one per family with a single-file
    (LDM/SGM/ComfyUI) layout, from its record's ``prefixes`` (``sd1``, ``sd2``, ``sdxl``, ``sdxl_refiner``,
    ``sd3``, ``flux``, ``svd``), ``diffusers`` (``DiffusersSource`` key space,
    component folder name + ``.``), ``kohya`` (kohya sd-scripts / sd-mecha ``sd1-kohya``/``sdxl-kohya`` names:
    ``unet.``, ``vae.``, ``te.`` or ``te1.`` + ``te2.``) and ``standalone`` (a file holding one component: empty
    prefix; ComfyUI-saved text encoders may keep their ``transformer.`` wrapper, see ``split_components``).
    ``unet``/``dit`` map to the diffusion-model prefix. Example: ``COMPONENT_PREFIXES["sdxl"]["clip_g"] ==
    ("conditioner.embedders.1.model.",)``.

``split_components(keys) -> dict[str, list[str]]``
    Map every key of a single-file checkpoint, a standalone component file or a diffusers folder to one
    component. Returns only components that have keys; each key appears exactly once; key order is preserved.
    Header-only: looks at key names only (the CLIP flavour is decided by the number of layers in the group).
    A ``transformer.`` group is a diffusers DiT folder, unless it holds a text encoder and no DiT root:
    ``transformer.text_model.*`` (CLIP) or ``transformer.encoder.block.*`` / ``transformer.shared.weight`` (T5),
    the ``transformer`` attribute of ComfyUI's ``SDClipModel``, as in ``text_encoders.clip_l.transformer.*`` with
    the encoder prefix stripped.

``component_prefix(key) -> str``
    The group prefix a key sits under (``"model.diffusion_model."``, ``"first_stage_model."``, ``""``...).

``SCHEDULE_KEYS`` / ``MARKER_KEYS``
    Top-level keys that are neither weights nor unknown: LDM schedule buffers (``betas``, ``alphas_cumprod``...,
    ``logvar``, ``model_ema.decay``/``num_updates``) and marker tensors (``v_pred``, ``ztsnr``, ``edm_mean``...).

``ema_key`` / ``ema_pairs`` / ``is_ema`` / ``is_schedule`` / ``is_position_ids``
    How LDM EMA keys (``model_ema.`` + the UNet key without ``model.`` and without dots) relate to the UNet's,
    and the key classes the transforms treat specially.

Nothing here imports torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ckptlab.arch.families import FAMILIES
from ckptlab.formats.base import TensorSource

COMPONENTS = ("unet", "dit", "vae", "clip_l", "clip_g", "openclip_h", "t5xxl", "ema", "training", "other")

_DM = ("model.diffusion_model.",)

#: the key styles that are not one family's: diffusers folders, kohya names, standalone component files
KEY_STYLES: dict[str, dict[str, tuple[str, ...]]] = {
    "diffusers": {"unet": ("unet.",), "dit": ("transformer.",), "vae": ("vae.",),
                  "clip_l": ("text_encoder.",), "clip_g": ("text_encoder_2.",), "openclip_h": ("text_encoder.",),
                  "t5xxl": ("text_encoder_2.", "text_encoder_3.")},
    "kohya": {"unet": ("unet.",), "vae": ("vae.",), "clip_l": ("te.", "te1."), "openclip_h": ("te.",),
              "clip_g": ("te2.",)},
    "standalone": {c: ("",) for c in ("unet", "dit", "vae", "clip_l", "clip_g", "openclip_h", "t5xxl")},
}

#: single-file layouts (from each family record's ``prefixes``) and the other key styles
COMPONENT_PREFIXES: dict[str, dict[str, tuple[str, ...]]] = {
    **{f.id: f.component_prefixes for f in FAMILIES if f.prefixes}, **KEY_STYLES}

# Group prefixes, longest first. Value: a fixed component, "dm" (UNet or DiT, decided by content) or None
# (decided by content: which text encoder, VAE...).
_GROUPS: tuple[tuple[str, str | None], ...] = (
    ("model.diffusion_model.", "dm"),
    ("model_ema.", "ema"),
    ("first_stage_model.", "vae"),
    ("cond_stage_model.transformer.", "clip_l"),
    ("cond_stage_model.model.", "openclip_h"),
    ("conditioner.embedders.0.transformer.", "clip_l"),
    ("conditioner.embedders.1.model.", "clip_g"),
    ("conditioner.embedders.0.model.", None),  # SDXL refiner: OpenCLIP-G; SD2.1-Turbo: OpenCLIP-H
    ("text_encoders.clip_l.", "clip_l"),
    ("text_encoders.clip_g.", "clip_g"),
    ("text_encoders.t5xxl.", "t5xxl"),
    ("text_encoders.", None),
    ("cond_stage_model.", None),
    ("vae.", "vae"),
    ("taesd_decoder.", "vae"),
    ("taesd_encoder.", "vae"),
    ("unet.", "unet"),
    ("transformer.", "dit"),
    ("text_encoder.", None),
    ("text_encoder_2.", None),
    ("text_encoder_3.", None),
    ("text_encoder_4.", None),
    ("te.", None),  # kohya sd-scripts / sd-mecha sd1-kohya: CLIP-L (SD1) or OpenCLIP-H in HF naming (SD2)
    ("te1.", None),  # sdxl-kohya: CLIP-L
    ("te2.", None),  # sdxl-kohya: OpenCLIP-bigG in HF naming
    ("depth_model.", "other"),
    ("control_model.", "other"),
    ("model.model_sampling.", "other"),
    ("optimizer_states", "training"),
    ("lr_schedulers", "training"),
    ("callbacks", "training"),
    ("loops", "training"),
    ("loss.", "training"),
)

#: top-level keys that are neither weights nor unknown: LDM schedule buffers and marker tensors
SCHEDULE_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "model_ema.decay", "model_ema.num_updates",
})
MARKER_KEYS = frozenset({"v_pred", "ztsnr", "edm_mean", "edm_std", "edm_vpred.sigma_max", "edm_vpred.sigma_min",
                         "scaled_fp8"})

_UNET_ROOTS = frozenset({
    "input_blocks", "middle_block", "output_blocks", "time_embed", "out", "label_emb",  # LDM/SGM
    "down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
    "add_embedding", "class_embedding", "encoder_hid_proj",  # diffusers
})
_VAE_ROOTS = frozenset({"encoder", "decoder", "quant_conv", "post_quant_conv"})
_CLIP_HF_ROOTS = frozenset({"text_model", "text_projection", "logit_scale", "embeddings", "final_layer_norm"})
_OPENCLIP_ROOTS = frozenset({"transformer", "token_embedding", "positional_embedding", "ln_final",
                             "text_projection", "logit_scale", "attn_mask"})
#: first key segments that only transformer (DiT/MMDiT) diffusion models use
DIT_ROOTS = frozenset({
    "joint_blocks", "x_embedder", "context_embedder", "t_embedder", "y_embedder", "pos_embed", "final_layer",
    "double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in", "guidance_in",
    "distilled_guidance_layer", "nerf_blocks", "double_stream_modulation_img", "double_stream_modulation_txt",
    "single_stream_modulation", "clf", "clip_txt_mapper", "clip_mapper", "clip_txt_pooled_mapper", "clip_norm",
    "t_block", "ar_embedder", "csize_embedder", "double_layers", "single_layers", "cond_seq_linear",
    "positional_encoding", "register_tokens", "init_x_linear", "modF", "mlp_t5", "extra_embedder", "text_embedding_padding",
    "pooler", "style_embedder", "cap_embedder", "noise_refiner", "context_refiner", "double_stream_blocks",
    "single_stream_blocks", "head", "patch_embedding", "text_embedding", "time_projection", "t5_yproj",
    "t5_y_embedder", "patchify_proj", "adaln_single", "caption_projection", "transformer_blocks",
    "single_transformer_blocks", "time_text_embed", "x_pos_embedder", "down_blocks_c", "blocks",
})
# a DiT group is recognised by one of these (plain "blocks"/"transformer_blocks" alone are too generic)
_DIT_PROOF = DIT_ROOTS - {"blocks", "transformer_blocks", "head", "pooler", "text_embedding", "pos_embed"}

_LAYER_RE = re.compile(r"(?:encoder\.layers|transformer\.resblocks)\.(\d+)\.")


# ``component_prefix`` runs once per key of every scanned file, so the ``_GROUPS`` scan is indexed: a prefix
# with a dot can only match keys whose first segment is the part before its first dot; the few prefixes
# without a dot ("loops"...) are tried on every key, in ``_GROUPS`` order.
_UNDOTTED = tuple(p for p, _ in _GROUPS if "." not in p)
_BY_SEGMENT: dict[str, tuple[str, ...]] = {}
for _p, _ in _GROUPS:
    if "." in _p:
        _seg = _p.split(".", 1)[0]
        _BY_SEGMENT[_seg] = tuple(q for q, _ in _GROUPS if q.split(".", 1)[0] == _seg or
                                  ("." not in q and _seg.startswith(q)))
del _p, _seg


def component_prefix(key: str) -> str:
    """The group prefix ``key`` sits under, or ``""`` for top-level / standalone keys."""
    dot = key.find(".")
    candidates = _BY_SEGMENT.get(key[:dot]) if dot > 0 else None
    if candidates is None:
        return next((p for p in _UNDOTTED if key.startswith(p)), "") if key.startswith(_UNDOTTED) else ""
    for prefix in candidates:
        if key.startswith(prefix):
            if prefix == "transformer." and key.startswith("transformer.resblocks."):
                continue  # a standalone OpenCLIP text encoder, not a diffusers transformer folder
            return prefix
    return ""


def _clip_flavour(keys: Iterable[str]) -> str:
    """CLIP-L (12 layers), OpenCLIP-H (24) or OpenCLIP-bigG (32), from the highest layer index present.

    Thresholds tolerate files that drop the last layer(s) (SD2 "WD" files, SDXL penultimate-only files)."""
    top = -1
    for k in keys:
        m = _LAYER_RE.search(k)
        if m:
            top = max(top, int(m.group(1)))
    if top < 0:
        return "clip_l"
    if top <= 11:
        return "clip_l"
    if top <= 23:
        return "openclip_h"
    return "clip_g"


_TRAINING_ROOTS = frozenset({"optimizer_states", "lr_schedulers", "callbacks", "loops", "loss", "optimizer"})
_DIT_MEMBER_ROOTS = DIT_ROOTS | _UNET_ROOTS | {"norm_out", "proj_out", "norm", "final_layer", "model_sampling",
                                               "layers", "blocks"}
_T5_ROOTS = frozenset({"encoder", "decoder", "shared", "lm_head"})
_NOT_WEIGHT_KEYS = SCHEDULE_KEYS | MARKER_KEYS


def _classify_group(keys: list[str], forced: str | None) -> dict[str, str]:
    """Component per key of one group (keys already stripped of the group prefix)."""
    if forced in COMPONENTS:
        return dict.fromkeys(keys, forced)
    roots = [k.split(".", 1)[0] for k in keys]
    root_set = set(roots)
    is_dit = forced == "dit" or not _DIT_PROOF.isdisjoint(root_set)
    # each whole-group test below can only hold when a matching root is present: skip the key pass otherwise
    is_t5 = not root_set.isdisjoint(("encoder", "decoder", "shared")) and any(
        k.startswith(("encoder.block.", "decoder.block.")) or k == "shared.weight" for k in keys)
    hf_clip = [k for k, r in zip(keys, roots, strict=True) if r in _CLIP_HF_ROOTS or k.startswith("encoder.layers.")] \
        if not root_set.isdisjoint(_CLIP_HF_ROOTS) or "encoder" in root_set else []
    oc_clip = [k for k in keys if k.startswith("transformer.resblocks.")] if "transformer" in root_set else []
    clip_kind = _clip_flavour(hf_clip + oc_clip) if (hf_clip or oc_clip) else None
    dm = forced == "dm" or forced == "unet"
    out: dict[str, str] = {}
    for k, r in zip(keys, roots, strict=True):
        if k in _NOT_WEIGHT_KEYS or k.endswith("scaled_fp8"):
            out[k] = "other"
        elif r in _TRAINING_ROOTS:
            out[k] = "training"
        elif dm:
            out[k] = "dit" if is_dit else "unet"
        elif is_dit and r in _DIT_MEMBER_ROOTS:
            out[k] = "dit"
        elif is_t5 and r in _T5_ROOTS:
            out[k] = "t5xxl"
        elif clip_kind and (r in _CLIP_HF_ROOTS or k.startswith("encoder.layers.")
                            or (oc_clip and r in _OPENCLIP_ROOTS)):
            out[k] = clip_kind
        elif r in _VAE_ROOTS:
            out[k] = "vae"
        elif r in _UNET_ROOTS and not is_dit:
            out[k] = "unet"
        else:
            out[k] = "other"
    return out


_FORCED = dict(_GROUPS)
_TE_IN_TRANSFORMER = ("text_model.", "encoder.block.", "shared.weight")


def _transformer_group_is_text_encoder(stripped: list[str]) -> bool:
    """A ``transformer.`` group holding a CLIP (``text_model.*``) or T5 (``encoder.block.*``, ``shared.weight``)
    text encoder and no DiT root: ComfyUI's ``SDClipModel.transformer`` saved on its own."""
    if not any(k.startswith(_TE_IN_TRANSFORMER) for k in stripped):
        return False
    return _DIT_PROOF.isdisjoint({k.split(".", 1)[0] for k in stripped})


def split_components(keys: Iterable[str]) -> dict[str, list[str]]:
    """Map each key to its component (see module docstring). Only non-empty components are returned."""
    keys = list(keys)
    groups: dict[str, list[str]] = {}
    by_segment = _BY_SEGMENT.get
    for k in keys:
        dot = k.find(".")
        # component_prefix(k), with its commonest answer (no group: "") decided inline
        if (dot <= 0 or by_segment(k[:dot]) is None) and not k.startswith(_UNDOTTED):
            groups.setdefault("", []).append(k)
        else:
            groups.setdefault(component_prefix(k), []).append(k)
    comp_of: dict[str, str] = {}
    for prefix, members in groups.items():
        n = len(prefix)
        stripped = [k[n:] for k in members] if n else members
        forced = _FORCED.get(prefix) if prefix else None
        if prefix == "transformer." and _transformer_group_is_text_encoder(stripped):
            forced = None  # decided by content: CLIP flavour by layer count, T5 by encoder.block
        classified = _classify_group(stripped, forced)
        if not n:  # keys are their own stripped form
            comp_of.update(classified)
            continue
        for full, short in zip(members, stripped, strict=True):
            comp_of[full] = classified[short]
    out: dict[str, list[str]] = {}
    for k in keys:
        out.setdefault(comp_of[k], []).append(k)
    return {c: out[c] for c in COMPONENTS if c in out}


# ---- LDM EMA copies and special keys (prune, extract --component ema, to-diffusers --ema use) ---------------

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
POSITION_IDS_SUFFIX = "embeddings.position_ids"


def ema_key(unet_key: str) -> str:
    """LDM EMA name of a UNet key: ``model_ema.`` + the key after ``model.`` with every dot removed."""
    return EMA_PREFIX + "".join(unet_key.split(".")[1:])


def ema_pairs(src: TensorSource) -> tuple[dict[str, str], list[str]]:
    """``{unet_key: ema_key}`` for UNet keys with an EMA copy, and the UNet keys without one."""
    keys = set(src.keys())
    pairs: dict[str, str] = {}
    missing: list[str] = []
    for key in src.keys():
        if key.startswith(UNET_PREFIX):
            e = ema_key(key)
            if e in keys:
                pairs[key] = e
            else:
                missing.append(key)
    return pairs, missing


def is_ema(key: str) -> bool:
    return key.startswith(EMA_PREFIX)


def is_schedule(key: str) -> bool:
    return key in SCHEDULE_KEYS and not is_ema(key)


def is_position_ids(key: str) -> bool:
    return key.endswith(POSITION_IDS_SUFFIX)
