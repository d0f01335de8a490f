"""Input pins and output metadata: sha256 of inputs, the embedded recipe, A1111's ``sd_merge_recipe`` /
``sd_merge_models`` and the inputs' ``modelspec.*`` entries."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ckptlab.errors import FormatError
from ckptlab.hashes import NO_CACHE, HashCache, HashCancelled, sha256_file

__all__ = ["HashCancelled", "a1111_legacy_hash", "a1111_metadata", "merge_models_entry", "modelspec_of", "sha256_many",
           "sha256_path"]

_CACHE: dict[tuple[str, int, int], str] = {}


def _sha256_one(path: Path, cancel=None, cache: HashCache = NO_CACHE) -> str:
    try:
        st = path.stat()
    except OSError as e:  # e.g. deleted while the merge ran: one line, not a traceback
        raise FormatError(f"cannot read to hash: {e.strerror or e}", path) from None
    cached = cache.known_sha256(path, st)  # the given cache first (not memoised: it depends on the cache)
    if cached:
        return cached
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)  # hashes this process computed
    if key in _CACHE:
        return _CACHE[key]
    try:
        _CACHE[key] = sha256_file(path, cancel)
    except OSError as e:
        raise FormatError(f"cannot read to hash: {e.strerror or e}", path) from None
    return _CACHE[key]


def sha256_path(path: str | Path, cancel=None, cache: HashCache = NO_CACHE) -> str:
    """sha256 of a file; for a folder (diffusers), sha256 over ``relpath\\0sha256\\n`` of its files.
    ``cancel``: a ``threading.Event`` that stops the work (``HashCancelled``) when set; ``cache``: where
    sha256s already known are taken from (``ckptlab.hashes.HashCache``; default: none)."""
    p = Path(path)
    if not p.is_dir():
        return _sha256_one(p, cancel, cache)
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(f"{f.relative_to(p).as_posix()}\0{_sha256_one(f, cancel, cache)}\n".encode())
    return h.hexdigest()


def sha256_many(paths: list[Path], cancel=None, cache: HashCache = NO_CACHE) -> list[str]:
    uniq = list(dict.fromkeys(Path(p) for p in paths))
    workers = max(1, min(len(uniq), os.cpu_count() or 1, 4))
    with ThreadPoolExecutor(workers) as pool:
        got = dict(zip(uniq, pool.map(lambda p: sha256_path(p, cancel, cache), uniq), strict=True))
    return [got[Path(p)] for p in paths]


def a1111_legacy_hash(path: str | Path) -> str | None:
    """A1111's old 8-hex model hash: sha256 of 64 KiB at offset 1 MiB."""
    p = Path(path)
    if p.is_dir():
        return None
    try:
        with open(p, "rb") as fh:
            fh.seek(0x100000)
            return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]
    except OSError:
        return None


def a1111_metadata(step_method, a1111_name: str, multiplier, hashes: list[str | None], *, out_dtype: str | None,
                   vae: bool, prune: bool, inpaint: bool) -> dict[str, object]:
    """The ``sd_merge_recipe`` object in A1111's shape (``type`` says who made it)."""
    return {
        "type": "ckptlab",
        "primary_model_hash": hashes[0] if hashes else None,
        "secondary_model_hash": hashes[1] if len(hashes) > 1 else None,
        "tertiary_model_hash": hashes[2] if len(hashes) > 2 else None,
        "interp_method": a1111_name or step_method,
        "multiplier": multiplier,
        "save_as_half": out_dtype == "F16",
        "custom_name": "",
        "config_source": 0,
        "bake_in_vae": vae,
        "discard_weights": "model_ema" if prune else "",
        "is_inpainting": inpaint,
        "is_instruct_pix2pix": False,
    }


def merge_models_entry(name: str, sha256: str, legacy: str | None, metadata: dict[str, str]) -> dict:
    """``sd_merge_models`` entries for one input, including its own parents (as A1111 nests them)."""
    out = {sha256: {"name": name, "legacy_hash": legacy, "sd_merge_recipe": _json_or_none(metadata.get("sd_merge_recipe"))}}
    parents = _json_or_none(metadata.get("sd_merge_models"))
    if isinstance(parents, dict):
        for k, v in parents.items():
            out.setdefault(k, v)
    return out


def _json_or_none(text: str | None):
    if not text:
        return None
    from ckptlab.jsonable import loads_limited

    try:
        return loads_limited(text)  # an input's metadata is untrusted: nesting limited, never a RecursionError
    except ValueError:
        return None


def modelspec_of(metadatas: list[dict[str, str]]) -> dict[str, str]:
    """``modelspec.*`` entries: A's first, keys A lacks filled from the later inputs."""
    out: dict[str, str] = {}
    for md in metadatas:
        for k, v in md.items():
            if k.startswith("modelspec.") and k not in out:
                out[k] = v
    return out
