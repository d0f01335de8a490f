"""Does a VAE fit a checkpoint's latent space? The one family check ``replace --vae`` and ``merge --vae`` share.

VAE files of the 4-channel KL-f8 families share one key layout and shapes (an SD1 VAE and the SDXL VAE
differ only in their weights), so a shape check accepts the wrong one and the model then decodes
garbage. The family comes from ``ckptlab.arch.identify`` (metadata, then the file name where the keys
cannot tell); interchangeable families share a latent space group (``Family.vae_group``).
"""

from __future__ import annotations

from pathlib import Path

from ckptlab.arch.families import display_name, get
from ckptlab.errors import CkptlabError, MismatchError
from ckptlab.formats.base import TensorSource


def latent_group(family_id: str | None) -> str | None:
    """The latent-space group of a family's VAEs (``None`` when the family's record names none)."""
    fam = get(family_id)
    return fam.vae_group if fam else None


def vae_family(vae: str | Path | TensorSource) -> str | None:
    """The family ``ckptlab.arch.identify`` gives a VAE file (or an opened one), None when it cannot tell."""
    from ckptlab.arch.identify import identify

    try:
        fam = identify(vae).family
    except CkptlabError:
        return None
    return fam if fam and fam != "unknown" else None


#: ``vae_family_known`` not given (None is an answer: the caller's identify found no family)
_UNSET = object()


def check_vae_fits(vae: str | Path | TensorSource, target_family: str | None, *, name: str | None = None,
                   path: str | Path | None = None, vae_family_known=_UNSET) -> str | None:
    """Refuse (``MismatchError``) a VAE whose family has another latent space than ``target_family``'s.
    Returns a warning line when the VAE's family cannot be told (keys and shapes are the caller's check),
    else None. ``name``: how to call the VAE in messages (default: its file name); ``path``: the checkpoint
    the error is about; ``vae_family_known``: the VAE's family (or None) when the caller identified it
    already, so it is not identified twice."""
    if name is None:
        p = vae if isinstance(vae, (str, Path)) else vae.path
        name = Path(p).name
    fam = vae_family(vae) if vae_family_known is _UNSET else vae_family_known
    if fam is None:
        return f"{name}: VAE family unknown (keys and shapes match)"
    mine = latent_group(target_family)
    if mine is not None and (latent_group(fam) or fam) != mine:
        raise MismatchError(f"{name} is a {display_name(fam)} VAE; it does not fit a "
                            f"{display_name(target_family)} checkpoint (different latent space)", path)
    return None
