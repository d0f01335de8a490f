"""Write the sidecars other tools read, from stored CivitAI records (docs/hub.md, "Sidecars"):

- ``<stem>.civitai.info``: the version record plus ``model.{description, tags, allow*}`` and
  ``creator`` from the model record (Civitai Helper's format). Written when absent, or refreshed when
  the existing one describes the same version; one for another version is left alone.
- ``<stem>.json``: A1111 extra-networks user metadata (``description``, ``sd version``,
  ``activation text``, ``preferred weight``, ``notes``) - only when no ``<stem>.json`` exists, since
  that file belongs to the user (or to SD.Next, with another schema).
- ``<stem>.preview.<ext>``: the version's first image of a safe rating (PG/PG-13 unless allowed),
  only when the model has no preview yet; the extension follows the image bytes.

Every write is atomic (temporary file in the folder, then rename). The API token is never part of
any record, and nothing here sends it: images are fetched without credentials.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ckptlab.atomic import write_atomic
from ckptlab.library import sidecars as existing

_MODEL_KEYS = ("description", "tags", "allowNoCredit", "allowCommercialUse", "allowDerivatives", "allowDifferentLicense")
_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"GIF8", "gif"))
SAFE_NSFW_LEVELS = (1, 2)  # PG, PG-13 (bitmask values on version images)
MAX_PREVIEW_BYTES = 32 * 1024 * 1024


@dataclass
class SidecarResult:
    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # present already and not ours to change


def civitai_info(version: dict, model: dict | None) -> dict:
    info = dict(version)
    m = dict(info.get("model") or {})
    if model:
        for k in _MODEL_KEYS:
            if k in model:
                m[k] = model[k]
        if model.get("creator") is not None:
            info["creator"] = model["creator"]
    info["model"] = m
    return info


def sd_version(base_model: str | None) -> str:
    """A1111's "sd version" of a CivitAI ``baseModel`` (the family record's ``a1111_version``), or Unknown."""
    from ckptlab.arch.families import get
    from ckptlab.library.ui_folders import UnknownChoiceError, resolve_family

    try:
        fam = get(resolve_family(base_model or "")[0])
    except UnknownChoiceError:
        return "Unknown"
    return (fam.a1111_version if fam else None) or "Unknown"


def a1111_user_metadata(version: dict, model: dict | None) -> dict:
    words = [str(w).strip() for w in (version.get("trainedWords") or []) if str(w).strip()]
    joiner = " || " if any("," in w for w in words) else ", "
    mtype = ((model or {}).get("type") or (version.get("model") or {}).get("type") or "").lower()
    meta = {"description": _plain((model or {}).get("description") or version.get("description") or ""),
            "sd version": sd_version(version.get("baseModel")),
            "activation text": joiner.join(words),
            "preferred weight": 0,
            "notes": f"CivitAI: {(model or {}).get('name') or (version.get('model') or {}).get('name') or ''} - "
                     f"{version.get('name') or ''} (model {version.get('modelId')}, version {version.get('id')})"}
    if mtype not in ("lora", "locon", "dora"):
        meta.pop("preferred weight")
    return meta


def _plain(html: str) -> str:
    text = re.sub(r"<br\s*/?>|</p>", "\n", html, flags=re.I)
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=4, ensure_ascii=False) + "\n").encode("utf-8")


def pick_preview(version: dict, allow_nsfw: bool = False) -> dict | None:
    for img in version.get("images") or []:
        if not isinstance(img, dict) or not img.get("url") or img.get("type", "image") != "image":
            continue
        level = img.get("nsfwLevel")
        if allow_nsfw or (isinstance(level, int) and level in SAFE_NSFW_LEVELS):
            return img
    return None


def write_sidecars(model_path: Path, version: dict, model: dict | None, *, fetch_image=None,
                   allow_nsfw: bool = False) -> SidecarResult:
    """Write the sidecars for ``model_path``; ``fetch_image(url) -> bytes`` fetches a preview."""
    model_path = Path(model_path)
    stem = model_path.name.rsplit(".", 1)[0] if "." in model_path.name else model_path.name
    folder = model_path.parent
    found = existing.find(model_path)
    res = SidecarResult()

    info_path = folder / f"{stem}.civitai.info"
    if info_path.exists():
        try:
            same = json.loads(info_path.read_text(encoding="utf-8")).get("id") == version.get("id")
        except (OSError, ValueError, AttributeError):
            same = False
        if not same:
            res.kept.append(info_path.name)
    if info_path.name not in res.kept:
        data = _json_bytes(civitai_info(version, model))
        if _read(info_path) == data:
            res.kept.append(info_path.name)  # already up to date: not rewritten
        else:
            write_atomic(info_path, data)
            res.written.append(info_path.name)

    user_path = folder / f"{stem}.json"
    if user_path.exists():
        res.kept.append(user_path.name)
    else:
        write_atomic(user_path, _json_bytes(a1111_user_metadata(version, model)))
        res.written.append(user_path.name)

    if "preview" in found:
        res.kept.append(found["preview"])
    elif fetch_image is not None and (img := pick_preview(version, allow_nsfw)):
        data = fetch_image(img["url"])
        ext = next((e for magic, e in _IMAGE_MAGIC if data.startswith(magic)), None)
        if ext is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            ext = "webp"
        if ext:  # anything else (a video, an error page) is not a preview
            p = folder / f"{stem}.preview.{ext}"
            write_atomic(p, data)
            res.written.append(p.name)
    return res
