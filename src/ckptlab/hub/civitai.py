"""CivitAI REST client (site API v1): look model versions up by hash (one, or up to 100 SHA256 at
once), fetch version and model records, and build download URLs.

Responses are returned as plain dicts, exactly as the server sent them, once they passed the one
parser for their response type (``parse_version``, ``parse_model``, ``parse_version_list``): every
field ckptlab reads has the type the API documents (an id is an integer, ``model`` an object,
``files`` a list of objects...), or the command fails with one line naming the field. The token travels only
in an ``Authorization: Bearer`` header to the configured CivitAI origin: never in a query string,
never to the storage host a download redirects to, never in an error message.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from ckptlab.errors import CkptlabError, InvalidHashError, NotFoundError, ResponseShapeError
from ckptlab.hub.config import HubConfig, load_hub_config
from ckptlab.hub.http import Requester

BULK_LIMIT = 100
TOKEN_HINT = "set CIVITAI_API_TOKEN or [civitai] token in the config file"
_HEX = re.compile(r"^[0-9A-Fa-f]+$")


@dataclass
class FileChoice:
    """One entry of a version's ``files[]`` picked for download."""

    file: dict
    version: dict

    @property
    def name(self) -> str:
        return str(self.file.get("name") or "")

    @property
    def sha256(self) -> str | None:
        h = (self.file.get("hashes") or {}).get("SHA256")
        return h.lower() if isinstance(h, str) and len(h) == 64 and _HEX.match(h) else None

    @property
    def size(self) -> int | None:
        """Exact size is not published (``sizeKB`` is a rounded float): used as a sanity bound only."""
        kb = self.file.get("sizeKB")
        return int(round(float(kb) * 1024)) if isinstance(kb, (int, float)) else None


class CivitaiClient:
    def __init__(self, config: HubConfig | None = None, *, requester: Requester | None = None, **requester_kw):
        self.config = config or load_hub_config()
        auth = {"Authorization": f"Bearer {self.config.civitai_token}"} if self.config.civitai_token else {}
        self.http = requester or Requester(auth_headers=auth, auth_origin=self.config.civitai_base_url,
                                           token_hint=TOKEN_HINT, **requester_kw)

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def has_token(self) -> bool:
        return bool(self.config.civitai_token)

    def _get_json(self, path: str, what: str):
        return self.http.get_json("GET", self.config.civitai_api + path, what=what)

    # -- lookups ---------------------------------------------------------------------------------
    def version_by_hash(self, value: str) -> dict | None:
        """The version holding a file with this hash (any CivitAI type), or None on 404."""
        value = _check_hash(value)
        try:
            what = f"CivitAI by-hash {value[:12]}"
            return parse_version(self._get_json(f"/model-versions/by-hash/{value.upper()}", what), what)
        except NotFoundError:
            return None

    def versions_by_sha256(self, hashes: Iterable[str]) -> dict[str, dict]:
        """Bulk ``POST by-hash`` in batches of <= 100 SHA256: {sha256 lower: version}; misses are absent."""
        wanted = []
        for h in hashes:
            h = _check_hash(h)
            if len(h) != 64:
                raise InvalidHashError(f"bulk lookup takes full SHA256 hashes (64 hex), got {len(h)} chars")
            wanted.append(h.lower())
        wanted = list(dict.fromkeys(wanted))
        found: dict[str, dict] = {}
        for i in range(0, len(wanted), BULK_LIMIT):
            batch = wanted[i:i + BULK_LIMIT]
            what = "CivitAI bulk by-hash"
            versions = parse_version_list(self.http.get_json("POST", self.config.civitai_api + "/model-versions/by-hash",
                                                             what=what, json=[h.upper() for h in batch]), what)
            want = set(batch)
            for v in versions:
                for f in v.get("files") or []:
                    sha = ((f.get("hashes") or {}).get("SHA256") or "").lower()
                    if sha in want and sha not in found:
                        found[sha] = v
        return found

    def model_version(self, version_id: int) -> dict:
        what = f"CivitAI model version {int(version_id)}"
        return parse_version(self._get_json(f"/model-versions/{int(version_id)}", what), what)

    def model(self, model_id: int) -> dict:
        what = f"CivitAI model {int(model_id)}"
        return parse_model(self._get_json(f"/models/{int(model_id)}", what), what)

    # -- downloads -------------------------------------------------------------------------------
    def download_url(self, choice: FileChoice) -> str:
        vid = int(choice.version["id"])
        url = f"{self.config.civitai_base_url}/api/download/models/{vid}"
        fid = choice.file.get("id")
        if not choice.file.get("primary") and fid is not None:
            url += f"?fileId={int(fid)}"  # type/format/fp query URLs of secondary files can 404; fileId works
        return url


def pick_file(version: dict, *, file_id: int | None = None) -> FileChoice:
    """The file to download: ``file_id`` if given, else the primary file, else the first Model file."""
    files = [f for f in (version.get("files") or []) if isinstance(f, dict)]
    if not files:
        mode = (version.get("model") or {}).get("mode")
        why = f" (model is {mode})" if mode else ""
        raise CkptlabError(f"CivitAI version {version.get('id')} lists no downloadable files{why}")
    if file_id is not None:
        for f in files:
            if f.get("id") == file_id:
                return FileChoice(f, version)
        raise CkptlabError(f"CivitAI version {version.get('id')} has no file with id {file_id}")
    for f in files:
        if f.get("primary"):
            return FileChoice(f, version)
    for f in files:
        if f.get("type") == "Model":
            return FileChoice(f, version)
    return FileChoice(files[0], version)


def latest_version(model: dict) -> dict:
    """The newest version of a model (``modelVersions`` is newest first in the API)."""
    versions = [v for v in (model.get("modelVersions") or []) if isinstance(v, dict)]
    if not versions:
        raise CkptlabError(f"CivitAI model {model.get('id')} has no versions")
    v = dict(versions[0])
    v.setdefault("modelId", model.get("id"))
    v.setdefault("model", {"name": model.get("name"), "type": model.get("type"), "nsfw": model.get("nsfw")})
    return v


def _check_hash(value: str) -> str:
    value = (value or "").strip()
    if value.lower().startswith("0x"):
        value = value[2:]
    if not value or not _HEX.match(value) or len(value) not in (8, 10, 12, 64):
        raise InvalidHashError(f"not a CivitAI hash (8, 10, 12 or 64 hex chars): {value[:70]!r}")
    return value


# -- the one boundary where CivitAI's JSON is checked ------------------------------------------------
# Only the fields ckptlab reads are checked; the rest is kept as sent (records are stored whole).
MAX_ID = 2 ** 53  # ids are JS numbers upstream; anything larger (or negative) is not a CivitAI id


def _kind(v) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(v), type(v).__name__)


class _Checker:
    def __init__(self, what: str):
        self.what = what

    def fail(self, path: str, value, expected: str):
        raise ResponseShapeError(f"{self.what}: unexpected answer from CivitAI: {path} is {_kind(value)}, "
                                 f"expected {expected}")

    def obj(self, v, path: str, *, optional: bool = False) -> dict:
        if v is None and optional:
            return {}
        if not isinstance(v, dict):
            self.fail(path, v, "an object")
        return v

    def lst(self, v, path: str) -> list:
        if v is None:
            return []
        if not isinstance(v, list):
            self.fail(path, v, "a list")
        return v

    def id(self, d: dict, key: str, path: str, *, optional: bool = True) -> None:
        v = d.get(key)
        if v is None and optional:
            return
        if type(v) is not int or not 0 <= v < MAX_ID:
            self.fail(f"{path}.{key}", v, "a non-negative integer id")

    def opt(self, d: dict, key: str, path: str, types: tuple, expected: str) -> None:
        v = d.get(key)
        if v is not None and (type(v) not in types):
            self.fail(f"{path}.{key}", v, expected)

    def strs(self, d: dict, key: str, path: str) -> None:
        for i, x in enumerate(self.lst(d.get(key), f"{path}.{key}")):
            if not isinstance(x, str):
                self.fail(f"{path}.{key}[{i}]", x, "a string")

    def size_kb(self, d: dict, path: str) -> None:
        v = d.get("sizeKB")
        if v is not None and (type(v) not in (int, float) or not math.isfinite(v) or not 0 <= v < MAX_ID / 1024):
            self.fail(f"{path}.sizeKB", v, "a size in KiB")


_S = ((str,), "a string")
_B = ((bool,), "true or false")
_N = ((int,), "a number")


def _check_version(c: _Checker, v, path: str) -> dict:
    v = c.obj(v, path)
    c.id(v, "id", path, optional=False)
    c.id(v, "modelId", path)
    for k in ("name", "baseModel", "baseModelType", "description", "air", "status", "downloadUrl"):
        c.opt(v, k, path, *_S)
    c.strs(v, "trainedWords", path)
    m = c.obj(v.get("model"), f"{path}.model", optional=True)
    for k in ("name", "type", "mode"):
        c.opt(m, k, f"{path}.model", *_S)
    c.opt(m, "nsfw", f"{path}.model", *_B)
    stats = c.obj(v.get("stats"), f"{path}.stats", optional=True)
    for k in ("downloadCount", "thumbsUpCount"):
        c.opt(stats, k, f"{path}.stats", *_N)
    for i, f in enumerate(c.lst(v.get("files"), f"{path}.files")):
        fp = f"{path}.files[{i}]"
        f = c.obj(f, fp)
        c.id(f, "id", fp)
        for k in ("name", "type", "pickleScanResult", "virusScanResult", "downloadUrl"):
            c.opt(f, k, fp, *_S)
        c.opt(f, "primary", fp, *_B)
        c.size_kb(f, fp)
        hashes = c.obj(f.get("hashes"), f"{fp}.hashes", optional=True)
        for k, h in hashes.items():
            if not isinstance(h, str):
                c.fail(f"{fp}.hashes.{k}", h, "a string")
        meta = c.obj(f.get("metadata"), f"{fp}.metadata", optional=True)
        for k in ("format", "size", "fp"):
            c.opt(meta, k, f"{fp}.metadata", *_S)
    for i, im in enumerate(c.lst(v.get("images"), f"{path}.images")):
        ip = f"{path}.images[{i}]"
        im = c.obj(im, ip)
        c.opt(im, "url", ip, *_S)
        c.opt(im, "type", ip, *_S)
        c.opt(im, "nsfwLevel", ip, (int, str), "a number or a string")
    return v


def parse_version(obj, what: str) -> dict:
    """A model-version object (``GET /model-versions/{id}``, ``by-hash``), checked; else one line."""
    return _check_version(_Checker(what), obj, "version")


def parse_version_list(obj, what: str) -> list[dict]:
    """The array ``POST /model-versions/by-hash`` answers, each entry a checked version object."""
    c = _Checker(what)
    if not isinstance(obj, list):
        c.fail("the answer", obj, "a list of versions")
    return [_check_version(c, v, f"[{i}]") for i, v in enumerate(obj)]


def parse_model(obj, what: str) -> dict:
    """A model object (``GET /models/{id}``) with its ``modelVersions``, checked; else one line."""
    c = _Checker(what)
    m = c.obj(obj, "model")
    c.id(m, "id", "model", optional=False)
    for k in ("name", "type", "mode", "description"):
        c.opt(m, k, "model", *_S)
    c.opt(m, "nsfw", "model", *_B)
    c.strs(m, "tags", "model")
    creator = c.obj(m.get("creator"), "model.creator", optional=True)
    c.opt(creator, "username", "model.creator", *_S)
    stats = c.obj(m.get("stats"), "model.stats", optional=True)
    for k in ("downloadCount", "thumbsUpCount"):
        c.opt(stats, k, "model.stats", *_N)
    for i, v in enumerate(c.lst(m.get("modelVersions"), "model.modelVersions")):
        _check_version(c, v, f"model.modelVersions[{i}]")
    return m


@dataclass
class RemoteFile:
    id: int | None
    name: str
    type: str | None
    size_bytes: int | None
    format: str | None
    fp: str | None
    primary: bool
    sha256: str | None
    pickle_scan: str | None
    virus_scan: str | None
    local_paths: list = field(default_factory=list)  # catalogued files with this SHA256 (civitai info --db)


@dataclass
class RemoteInfo:
    """What to look at before downloading: popularity, license, files, trigger words, previews."""

    model_id: int | None
    version_id: int | None
    model_name: str | None
    version_name: str | None
    type: str | None
    base_model: str | None
    creator: str | None
    nsfw: bool | None
    downloads: int | None
    thumbs_up: int | None
    license: dict
    trained_words: list
    tags: list
    files: list
    images: list
    mode: str | None = None  # Archived / TakenDown


def remote_info(version: dict, model: dict | None) -> RemoteInfo:
    m = model or {}
    vm = version.get("model") or {}
    stats = m.get("stats") or version.get("stats") or {}  # the model's totals, else the version's
    files = []
    for f in version.get("files") or []:
        meta = f.get("metadata") or {}
        choice = FileChoice(f, version)
        files.append(RemoteFile(f.get("id"), choice.name, f.get("type"), choice.size, meta.get("format"),
                                meta.get("fp"), bool(f.get("primary")), choice.sha256, f.get("pickleScanResult"),
                                f.get("virusScanResult")))
    images = [{"url": i.get("url"), "nsfw_level": i.get("nsfwLevel"), "type": i.get("type", "image")}
              for i in version.get("images") or [] if isinstance(i, dict)]
    lic = {k: m[k] for k in ("allowCommercialUse", "allowDerivatives", "allowNoCredit", "allowDifferentLicense")
           if k in m}
    return RemoteInfo(model_id=version.get("modelId") or m.get("id"), version_id=version.get("id"),
                      model_name=m.get("name") or vm.get("name"), version_name=version.get("name"),
                      type=m.get("type") or vm.get("type"), base_model=version.get("baseModel"),
                      creator=(m.get("creator") or {}).get("username"), nsfw=m.get("nsfw", vm.get("nsfw")),
                      downloads=stats.get("downloadCount"), thumbs_up=stats.get("thumbsUpCount"), license=lic,
                      trained_words=list(version.get("trainedWords") or []), tags=list(m.get("tags") or []),
                      files=files, images=images, mode=m.get("mode") or vm.get("mode"))
