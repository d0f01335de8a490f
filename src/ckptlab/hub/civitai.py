"""CivitAI REST client (site API v1): look model versions up by hash (one, or up to 100 SHA256 at
once), fetch version and model records, and build download URLs.

Responses are returned as plain dicts, exactly as the server sent them. The API token travels only
in an ``Authorization: Bearer`` header to the configured CivitAI origin: never in a query string,
never to the storage host a download redirects to, never in an error message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ckptlab.errors import CkptlabError
from ckptlab.hub.config import HubConfig, load_hub_config
from ckptlab.hub.http import NotFoundError, Requester

BULK_LIMIT = 100
TOKEN_HINT = "set CIVITAI_API_TOKEN or [civitai] token in the config file"
_HEX = re.compile(r"^[0-9A-Fa-f]+$")


class InvalidHashError(CkptlabError):
    """A value that cannot be a CivitAI hash."""


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
        resp = self.http.request("GET", self.config.civitai_api + path, what=what)
        return _json(resp, what)

    # -- lookups ---------------------------------------------------------------------------------
    def version_by_hash(self, value: str) -> dict | None:
        """The version holding a file with this hash (any CivitAI type), or None on 404."""
        value = _check_hash(value)
        try:
            return self._get_json(f"/model-versions/by-hash/{value.upper()}", f"CivitAI by-hash {value[:12]}")
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
            resp = self.http.request("POST", self.config.civitai_api + "/model-versions/by-hash",
                                     what="CivitAI bulk by-hash", json=[h.upper() for h in batch])
            versions = _json(resp, "CivitAI bulk by-hash")
            if not isinstance(versions, list):
                raise CkptlabError("CivitAI bulk by-hash: expected a JSON array")
            want = set(batch)
            for v in versions:
                for f in (v.get("files") or []) if isinstance(v, dict) else []:
                    sha = ((f.get("hashes") or {}).get("SHA256") or "").lower()
                    if sha in want and sha not in found:
                        found[sha] = v
        return found

    def model_version(self, version_id: int) -> dict:
        return self._get_json(f"/model-versions/{int(version_id)}", f"CivitAI model version {int(version_id)}")

    def model(self, model_id: int) -> dict:
        return self._get_json(f"/models/{int(model_id)}", f"CivitAI model {int(model_id)}")

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


def _json(resp, what: str):
    try:
        return resp.json()
    except ValueError:
        raise CkptlabError(f"{what}: the server did not answer JSON") from None


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
