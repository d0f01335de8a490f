"""What an input is (kind and family) for the merge checks and the block layout; header-only.

``identify_input`` asks ``ckptlab.arch.identify`` (the one detector: transforms, merges and ``inspect`` agree on
every file's family); the family's record (``arch.families``) then gives its merge blocks and VAE latent
group. ``check_mergeable`` refuses
inputs that are not full models (a LoRA, a VAE, a text encoder...): merging one with a checkpoint
used to report "0 merged, 1143 kept from A" and write a copy of A.
"""

from __future__ import annotations

from ckptlab.errors import MismatchError
from ckptlab.formats.base import TensorSource

#: kinds ``merge`` takes: full single-file/diffusers checkpoints, or UNet/DiT-only files
MERGEABLE_KINDS = ("checkpoint", "unet")

KIND_NAMES = {
    "checkpoint": "a full checkpoint",
    "unet": "a UNet/DiT-only file",
    "lora": "a LoRA",
    "lycoris": "a LyCORIS adapter (LoHa/LoKr...)",
    "vae": "a VAE",
    "text_encoder": "a text encoder",
    "controlnet": "a ControlNet",
    "ipadapter": "an IP-Adapter",
    "ip_adapter": "an IP-Adapter",
    "t2i_adapter": "a T2I-Adapter",
    "embedding": "a textual-inversion embedding",
    "hypernetwork": "a hypernetwork",
    "upscaler": "an upscaler",
    "unknown": "a file of no known model layout",
}

_HINTS = {
    "lora": "LoRAs are baked into a checkpoint with `ckptlab lora bake` (or a 'lora' step of a merge recipe), "
            "not by merge",
    "lycoris": "LyCORIS adapters are baked into a checkpoint with `ckptlab lora bake` (or a 'lora' step of a "
               "merge recipe), not by merge",
    "vae": "bake a VAE into the output with --vae",
}


def identify_input(source: TensorSource) -> tuple[str | None, str | None]:
    """``(kind, family)`` of an opened input, as ``ckptlab.arch.identify`` says: kind ``checkpoint`` / ``unet`` /
    ``lora`` / ``vae`` ... (None when identification failed), family id (None when unknown)."""
    from ckptlab.arch.identify import identify

    try:
        info = identify(source)
    except Exception:  # noqa: BLE001 - not fatal here: the merge's own key and shape checks remain
        return None, None
    return info.kind or None, info.family if info.family and info.family != "unknown" else None


def check_mergeable(name: str, path: str | None, kind: str | None) -> None:
    """Refuse an input that is not a full model (checkpoint or UNet/DiT-only file)."""
    if kind is None or kind in MERGEABLE_KINDS:
        return
    where = f"{name} ({path})" if path else name
    hint = _HINTS.get(kind, "merge takes full checkpoints or UNet/DiT-only files")
    if kind == "unknown":
        raise MismatchError(f"cannot merge {where}: no known model layout matches its tensor names; {hint}")
    raise MismatchError(f"cannot merge {where}: it is {KIND_NAMES.get(kind, 'a ' + kind)}, not a full model; {hint}")


def check_same_kind(nodes) -> None:
    """All inputs of one step hold the same kind of model (a full checkpoint and a UNet-only file have no
    tensor names in common: merging them would copy A)."""
    a = nodes[0]
    for other in nodes[1:]:
        ka, kb = getattr(a, "model_kind", None), getattr(other, "model_kind", None)
        if ka and kb and ka != kb:
            raise MismatchError(f"cannot merge different kinds of model: {a.name} is {KIND_NAMES.get(ka, ka)}, "
                                f"{other.name} is {KIND_NAMES.get(kb, kb)} (extract or convert one first, e.g. "
                                f"`ckptlab extract --component unet`)")
