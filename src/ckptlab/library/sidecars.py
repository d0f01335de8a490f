"""Read the files other tools keep next to a model (docs/library.md, "Sidecars"). Read only: ckptlab never
writes or rewrites any of them.

For ``<dir>/<stem>.<ext>``:

- ``<stem>.json``: A1111 user metadata (``activation text``, ``sd version``, ``preferred weight``,
  ``description``, ``notes``...) *or* SD.Next's raw CivitAI model JSON (``id`` + ``modelVersions``);
  told apart by their keys.
- ``<stem>.civitai.info`` (Civitai Helper: a CivitAI model-version JSON), ``<stem>.cm-info.json``
  (Stability Matrix, PascalCase), ``<stem>.metadata.json`` (ComfyUI-Lora-Manager).
- previews: ``<stem>.preview.<img>``, ``<stem>.<img>``, ``<stem>.thumb.jpg``; descriptions
  ``<stem>.txt`` / ``<stem>.description.txt``; ``<stem>.yaml`` (LDM config).

``find(model_path, names)`` lists the sidecars present (``names``: the folder listing, so no extra
system calls); ``read(model_path, found)`` returns a compact, JSON-ready summary.
"""

from __future__ import annotations

import json
import os
import stat as stat_mod
from pathlib import Path
from typing import Any

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "gif")
_MAX_JSON = 8 * 1024 * 1024  # sidecars larger than this are listed, not parsed
_MAX_TEXT = 4096


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


def find(model_path: str | os.PathLike, names: set[str] | None = None) -> dict[str, str]:
    """``{role: file name}`` of the sidecars next to ``model_path``. Roles: ``json``, ``civitai_info``,
    ``cm_info``, ``metadata_json``, ``preview``, ``thumb``, ``description``, ``yaml``."""
    folder, name = os.path.split(os.fspath(model_path))
    if names is None:
        try:
            names = set(os.listdir(folder or "."))
        except OSError:
            return {}
    stem = _stem(name)
    out: dict[str, str] = {}
    for role, cand in (("json", f"{stem}.json"), ("civitai_info", f"{stem}.civitai.info"),
                       ("cm_info", f"{stem}.cm-info.json"), ("metadata_json", f"{stem}.metadata.json"),
                       ("yaml", f"{stem}.yaml"), ("thumb", f"{stem}.thumb.jpg")):
        if cand in names:
            out[role] = cand
    for cand in (f"{stem}.description.txt", f"{stem}.txt"):
        if cand in names:
            out["description"] = cand
            break
    for ext in IMAGE_EXTS:  # A1111 order: <stem>.<ext> then <stem>.preview.<ext>, per extension
        hit = next((c for c in (f"{stem}.{ext}", f"{stem}.preview.{ext}") if c in names), None)
        if hit:
            out["preview"] = hit
            break
    return out


def signature(model_path: str | os.PathLike, found: dict[str, str]) -> dict[str, int]:
    """``{file name: mtime_ns}`` of the parseable sidecars, to notice edits without re-reading."""
    folder = os.path.dirname(os.fspath(model_path))
    sig = {}
    for role, name in found.items():
        if role in ("preview", "thumb", "yaml"):
            sig[name] = 0
            continue
        try:
            sig[name] = os.stat(os.path.join(folder, name)).st_mtime_ns
        except OSError:
            sig[name] = -1
    return sig


_MAX_WORDS = 500  # trigger words kept per file (a hostile sidecar may list millions)


def _load_json(path: Path) -> tuple[Any, str | None]:
    try:
        st = path.stat()
        if not stat_mod.S_ISREG(st.st_mode):  # a FIFO would block the scan, a device never end
            return None, "not a regular file"
        if st.st_size > _MAX_JSON:
            return None, "too large to read"
        return json.loads(path.read_text(encoding="utf-8", errors="replace")), None
    except OSError as e:
        return None, f"cannot read: {e.strerror or e}"
    except ValueError as e:
        return None, f"not valid JSON: {e}"
    except RecursionError:  # json's C decoder recurses once per level; a hostile file nests 100,000 deep
        return None, "not valid JSON: nested too deeply"


def classify_json(obj: Any) -> str:
    """``a1111`` (user metadata), ``sdnext_civitai`` (raw CivitAI model), ``civitai_version`` or ``unknown``."""
    if not isinstance(obj, dict):
        return "unknown"
    if "modelVersions" in obj and "id" in obj:
        return "sdnext_civitai"
    if "modelId" in obj and "files" in obj:
        return "civitai_version"
    if obj.keys() & {"activation text", "sd version", "preferred weight", "negative text", "notes", "description"}:
        return "a1111"
    return "unknown"


def _civitai_version_summary(obj: dict) -> dict:
    model = obj.get("model") if isinstance(obj.get("model"), dict) else {}
    files = obj.get("files") if isinstance(obj.get("files"), list) else []
    hashes = {}
    for f in files:
        if isinstance(f, dict) and isinstance(f.get("hashes"), dict) and (f.get("primary") or not hashes):
            hashes = {str(k): str(v) for k, v in f["hashes"].items()}
    return _clean({"model_id": obj.get("modelId"), "version_id": obj.get("id"), "model_name": model.get("name"),
                   "version_name": obj.get("name"), "base_model": obj.get("baseModel"), "type": model.get("type"),
                   "trained_words": obj.get("trainedWords"), "hashes": hashes or None})


def _clean(d: dict) -> dict:
    return {k: v for k, v in d.items() if v not in (None, "", [], {})}


def summarize(role: str, obj: Any) -> dict:
    """The useful fields of one parsed sidecar, under ckptlab's own names."""
    if not isinstance(obj, dict):
        return {"kind": "unknown"}
    if role == "json":
        kind = classify_json(obj)
        if kind == "a1111":
            return {"kind": kind, **_clean({k.replace(" ", "_"): obj.get(k) for k in (
                "activation text", "negative text", "preferred weight", "sd version", "vae", "description", "notes")})}
        if kind == "sdnext_civitai":
            versions = obj.get("modelVersions") if isinstance(obj.get("modelVersions"), list) else []
            return {"kind": kind, **_clean({"model_id": obj.get("id"), "model_name": obj.get("name"),
                                            "type": obj.get("type"), "versions": len(versions)})}
        if kind == "civitai_version":
            return {"kind": kind, **_civitai_version_summary(obj)}
        return {"kind": "unknown", "keys": sorted(map(str, obj))[:20]}
    if role == "civitai_info":
        return {"kind": "civitai_helper", **_civitai_version_summary(obj)} if obj else {"kind": "civitai_helper",
                                                                                      "not_on_civitai": True}
    if role == "cm_info":
        hashes = obj.get("Hashes") if isinstance(obj.get("Hashes"), dict) else None
        return {"kind": "stability_matrix", **_clean({
            "model_id": obj.get("ModelId"), "version_id": obj.get("VersionId"), "model_name": obj.get("ModelName"),
            "version_name": obj.get("VersionName"), "base_model": obj.get("BaseModel"), "type": obj.get("ModelType"),
            "trained_words": obj.get("TrainedWords"), "hashes": hashes})}
    if role == "metadata_json":
        civ = obj.get("civitai") if isinstance(obj.get("civitai"), dict) else {}
        return {"kind": "lora_manager", **_clean({
            "model_id": civ.get("modelId"), "version_id": civ.get("id"), "model_name": obj.get("model_name"),
            "base_model": obj.get("base_model"), "sha256": obj.get("sha256"), "autov3": obj.get("autov3"),
            "trained_words": civ.get("trainedWords") or obj.get("trainedWords"), "tags": obj.get("tags")})}
    return {"kind": "unknown"}


def read(model_path: str | os.PathLike, found: dict[str, str] | None = None) -> dict[str, Any]:
    """Summaries of every sidecar of ``model_path``: ``{"files": {role: name}, role: summary...}``,
    plus ``civitai`` (model/version ids from whichever sidecar has them) and ``trigger_words``."""
    model_path = Path(os.fspath(model_path))
    found = find(model_path) if found is None else found
    out: dict[str, Any] = {"files": dict(found)}
    for role in ("json", "civitai_info", "cm_info", "metadata_json"):
        if role in found:
            obj, err = _load_json(model_path.parent / found[role])
            out[role] = {"kind": "unreadable", "error": err} if err else summarize(role, obj)
            for key in ("trained_words", "tags"):  # the catalog keeps a summary, not megabytes of words
                if isinstance(out[role].get(key), list):
                    out[role][key] = out[role][key][:_MAX_WORDS]
    if "description" in found:
        try:
            desc = model_path.parent / found["description"]
            if stat_mod.S_ISREG(desc.stat().st_mode):  # not a FIFO: it would block
                with open(desc, encoding="utf-8", errors="replace") as fh:
                    out["description"] = fh.read(_MAX_TEXT).strip()
        except OSError:
            pass
    for role in ("civitai_info", "cm_info", "metadata_json", "json"):
        s = out.get(role)
        if isinstance(s, dict) and s.get("version_id") and "civitai" not in out:
            out["civitai"] = _clean({"model_id": s.get("model_id"), "version_id": s.get("version_id"),
                                     "from": found[role]})
    words: list[str] = []
    seen: set[str] = set()
    for role in ("civitai_info", "cm_info", "metadata_json"):
        s = out.get(role)
        if isinstance(s, dict) and isinstance(s.get("trained_words"), list):
            for w in map(str, s["trained_words"]):
                if w not in seen and len(words) < _MAX_WORDS:
                    seen.add(w)
                    words.append(w)
    a1111 = out.get("json")
    if isinstance(a1111, dict) and a1111.get("activation_text") and not words:
        words = [str(a1111["activation_text"])]
    if words:
        out["trigger_words"] = words
    return out
