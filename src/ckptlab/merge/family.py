"""Which model family an input is (for the refusal check and the block layout); header-only.

One function, ``family_of``: it asks ``ckptlab.identify`` when that module is present and falls
back to a key-name probe otherwise, so the merge engine does not care which one answered.
"""

from __future__ import annotations

from ckptlab.formats.base import TensorSource

_DM = "model.diffusion_model."


def _probe(keys: set[str], infos) -> str | None:
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        return "sdxl_refiner"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    # UNet-only files: SDXL has label_emb and 9 input blocks; SD1/SD2 tell apart by the context width
    if f"{_DM}label_emb.0.0.weight" in keys:
        return "sdxl"
    k = f"{_DM}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if k in keys:
        width = infos[k].shape[-1]
        return {768: "sd1", 1024: "sd2"}.get(width)
    if any(k.startswith(("double_blocks.", f"{_DM}double_blocks.")) for k in keys):
        return "flux"
    if any(k.startswith(("joint_blocks.", f"{_DM}joint_blocks.")) for k in keys):
        return "sd3"
    return None


def family_of(source: TensorSource) -> str | None:
    """``sd1`` / ``sd2`` / ``sdxl`` / ``sdxl_refiner`` / ``sd3`` / ``flux`` ..., or None when unknown."""
    try:  # the identification module, when it has landed
        from ckptlab.identify import identify  # type: ignore[import-not-found]
    except ImportError:
        identify = None
    if identify is not None:
        try:
            fam = getattr(identify(source), "family", None)
            if fam and fam != "unknown":
                return str(fam)
        except Exception:  # noqa: BLE001 - fall back to the probe; identification problems are not fatal here
            pass
    infos = source.infos()
    return _probe(set(infos), infos)
