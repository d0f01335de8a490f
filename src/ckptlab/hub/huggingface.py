"""Hugging Face downloads through ``huggingface_hub``, verified and placed into the library atomically.

``download(repo_id, filename, revision, dest_dir=...)``:

1. asks the Hub for the file's metadata with ``huggingface_hub.get_hf_file_metadata``
   (``HEAD /{repo}/resolve/{rev}/{file}``): the commit the revision points at, the size, and the
   ETag - for LFS files the file's SHA-256, for small git files its git blob id;
2. LFS files (all model files) are fetched from ``/resolve/<that commit>/`` through ckptlab's
   resumable transfer (``hub.download.transfer``): ``<name>.part`` in the target folder, ``Range``
   resume within a run and across runs, SHA-256 compared with the ETag, renamed into place only when
   it matches (huggingface_hub 2.x cannot resume across runs: it deletes its partial on failure);
3. small git files go through ``hf_hub_download(local_dir=...)`` into a hidden staging folder in
   ``dest_dir``, are checked against their git blob id and size, then linked under their name
   (never replacing an existing file) and the staging folder removed.

A file that fails verification is deleted; nothing appears under the final name unless verified.

The environment is read at call time: ``HF_ENDPOINT`` (unless ``endpoint=``); the token is
``token=``, else ``HF_TOKEN``, else the one ``hf auth login`` stored (unless
``HF_HUB_DISABLE_IMPLICIT_TOKEN``); ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` mean no network at
all (an existing file is returned as is, otherwise a clear error). The token travels only in the
``Authorization`` header to the Hub (neither huggingface_hub nor our transfer forwards it on the
redirect to storage); it is never written anywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from pathlib import Path, PurePosixPath

from ckptlab.errors import (
    AuthError,
    CkptlabError,
    NetworkError,
    NotFoundError,
    OutputError,
    VerificationError,
)
from ckptlab.hashes import sha256_file
from ckptlab.hub.download import DownloadResult, check_free_space, publish, safe_filename
from ckptlab.progress import Progress, null_progress

DEFAULT_ENDPOINT = "https://huggingface.co"
STAGING = ".ckptlab-hf"  # hidden: library walks skip it
GENERIC_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$|^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_GIT_SHA1 = re.compile(r"^[0-9a-f]{40}$")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def is_offline() -> bool:
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def resolve_endpoint(endpoint: str | None = None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def local_name(repo_id: str, filename: str) -> str:
    """The library file name: the repo file's own name, except that diffusers/transformers generic
    names (``unet/diffusion_pytorch_model.fp16.safetensors``) get the repo and folder in front."""
    p = PurePosixPath(filename)
    if p.name.split(".")[0] in GENERIC_STEMS:
        parts = [repo_id.split("/")[-1], *p.parent.parts, p.name]
        return "-".join(x for x in parts if x not in ("", "."))
    return p.name


def git_blob_id(path: Path) -> str:
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check_args(repo_id: str, filename: str) -> None:
    if not repo_id or not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise CkptlabError(f"bad Hugging Face repo id {repo_id!r} (use ORG/NAME)")
    parts = PurePosixPath(filename).parts
    if not filename or filename.startswith("/") or "\\" in filename or any(x in ("..", ".") for x in parts):
        raise CkptlabError(f"bad file path in repo {repo_id}: {filename!r}")


def _tqdm_adapter(progress: Progress):
    """A tqdm-shaped class for ``hf_hub_download(tqdm_class=...)`` that feeds our callback."""

    class _Bar:
        def __init__(self, *args, total=None, initial=0, desc=None, **kw):
            self.n = initial or 0
            self.total = total
            progress(self.n, total=total, description=desc)

        def update(self, n=1):
            self.n += n
            progress(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

        def close(self):
            pass

        def set_description(self, *a, **kw):
            pass

        def refresh(self, *a, **kw):
            pass

    return _Bar


def _translate(e: Exception, what: str) -> CkptlabError:
    """huggingface_hub / httpx errors -> one-line ckptlab errors (no token in them)."""
    from huggingface_hub import errors as hfe

    if isinstance(e, hfe.GatedRepoError):
        return AuthError(f"{what}: the repo is gated or private; accept its terms on the Hub and set HF_TOKEN", 401)
    if isinstance(e, hfe.RepositoryNotFoundError):
        return NotFoundError(f"{what}: repository not found (or private: set HF_TOKEN)", 404)
    if isinstance(e, hfe.RevisionNotFoundError):
        return NotFoundError(f"{what}: revision not found", 404)
    if isinstance(e, hfe.EntryNotFoundError):
        return NotFoundError(f"{what}: file not found in the repository", 404)
    if isinstance(e, hfe.FileMetadataError):
        return NetworkError(f"{what}: the endpoint does not answer like the Hugging Face Hub ({_first_line(e)})")
    if isinstance(e, (hfe.OfflineModeIsEnabled, hfe.LocalEntryNotFoundError)):
        return NetworkError(f"{what}: offline (HF_HUB_OFFLINE is set) and the file is not here")
    if isinstance(e, hfe.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", 0) or 0
        if status in (401, 403):
            return AuthError(f"{what}: HTTP {status}: access denied (set HF_TOKEN)", status)
        return NetworkError(f"{what}: HTTP {status or '?'}: {_first_line(e)}")
    if isinstance(e, OSError) and "Consistency check failed" in str(e):
        return VerificationError(f"{what}: the transfer ended at the wrong size; run the same command again")
    return NetworkError(f"{what}: {type(e).__name__}: {_first_line(e)}")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _verify(path: Path, etag: str, size: int | None, what: str) -> tuple[str, str | None]:
    """(sha256 of the file, the SHA-256 the Hub published or None). Raises on mismatch."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise VerificationError(f"{what}: got {actual_size} bytes, the Hub says {size}; the download was deleted")
    digest = sha256_file(path)
    if _SHA256.match(etag):
        if digest != etag:
            raise VerificationError(f"{what}: SHA256 mismatch (the Hub's LFS ETag is {etag[:16]}..., got "
                                    f"{digest[:16]}...); the download was deleted")
        return digest, etag
    if _GIT_SHA1.match(etag):
        blob = git_blob_id(path)
        if blob != etag:
            raise VerificationError(f"{what}: git blob id mismatch (expected {etag[:12]}..., got {blob[:12]}...); "
                                    "the download was deleted")
        return digest, None
    raise VerificationError(f"{what}: the Hub gave no hash to verify against (ETag {etag!r}); refused")


def download(repo_id: str, filename: str, revision: str | None = None, dest_dir: str | Path | None = None, *,
             endpoint: str | None = None, token: str | None = None, progress: Progress | None = None,
             repo_type: str = "model", name: str | None = None) -> DownloadResult:
    """Download ``filename`` from the Hugging Face repo ``repo_id`` at ``revision`` (default
    ``main``) into ``dest_dir`` (default: the current folder), verified (see module doc)."""
    _check_args(repo_id, filename)
    revision = revision or "main"
    dest = Path(dest_dir) if dest_dir is not None else Path.cwd()
    final_name = safe_filename(name or local_name(repo_id, filename))
    if not final_name:
        raise CkptlabError(f"unusable file name for {filename!r}")
    target = dest / final_name
    base = resolve_endpoint(endpoint)
    what = f"hf:{repo_id}/{filename}@{revision}"
    extra = {"repo_id": repo_id, "filename": filename, "revision": revision, "endpoint": base}
    progress = progress or null_progress

    if is_offline():
        if target.is_file():
            from ckptlab.hashes import hash_file

            h = hash_file(target)  # all six in one read: the catalog needs no second one
            return DownloadResult(path=target, url="", size=h.size, sha256=h.sha256.lower(), source="hf",
                                  skipped=True, extra={**extra, "offline": True}, hashes=h)
        raise NetworkError(f"{what}: HF_HUB_OFFLINE is set and {target} is not here; unset it to download")

    from huggingface_hub import constants, get_hf_file_metadata, get_token, hf_hub_download, hf_hub_url

    constants.HF_HUB_OFFLINE = False  # the env as it is now, not as it was when huggingface_hub was imported
    # explicit token, else HF_TOKEN, else the one `hf auth login` stored (unless implicit tokens are off);
    # resolved once so the metadata request and the transfer use the same one
    token = (token or "").strip() or os.environ.get("HF_TOKEN", "").strip() or _stored_token(get_token)
    token = token or False  # False: huggingface_hub must not look for one again
    url = hf_hub_url(repo_id, filename, repo_type=repo_type, revision=revision, endpoint=base)
    try:
        meta = get_hf_file_metadata(url, token=token, endpoint=base)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line
        raise _translate(e, what) from None
    if not meta.commit_hash or not meta.etag:
        raise NetworkError(f"{what}: the endpoint gave no commit or ETag; not a Hugging Face Hub?")
    etag = meta.etag.lower()
    extra["commit"] = meta.commit_hash
    resolve_url = hf_hub_url(repo_id, filename, repo_type=repo_type, revision=meta.commit_hash, endpoint=base)

    if _SHA256.match(etag):  # an LFS file (every model file): resumable transfer, checked against the SHA-256
        return _transfer_lfs(resolve_url, dest, final_name, etag, meta.size, base, token, progress, extra)

    if target.exists():
        if target.is_file() and git_blob_id(target) == etag:
            return DownloadResult(path=target, url=resolve_url, size=target.stat().st_size,
                                  sha256=sha256_file(target), source="hf", skipped=True, extra=extra)
        raise OutputError("already exists and is not the file being downloaded; move it away first", target)

    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the folder: {e.strerror or e}", dest) from None
    if meta.size:
        check_free_space(dest, meta.size)
    key = hashlib.sha256(f"{base}\0{repo_type}\0{repo_id}\0{filename}".encode()).hexdigest()[:16]
    staging = dest / STAGING / key
    try:
        staged = Path(hf_hub_download(repo_id, filename, repo_type=repo_type, revision=meta.commit_hash,
                                      local_dir=staging, endpoint=base, token=token,
                                      tqdm_class=_tqdm_adapter(progress)))
    except Exception as e:  # noqa: BLE001
        _remove_tree(staging)  # huggingface_hub 2.x deletes its partial on failure: nothing to resume from
        raise _translate(e, what) from None
    try:
        sha, published = _verify(staged, etag, meta.size, what)
    except VerificationError:
        _remove_tree(staging)
        raise
    publish(staged, target)  # if the name was taken meanwhile, the verified copy stays staged
    _remove_tree(staging)
    return DownloadResult(path=target, url=resolve_url, size=target.stat().st_size, sha256=sha, source="hf",
                          expected_sha256=published, extra=extra)


def _stored_token(get_token) -> str | None:
    """The token ``hf auth login`` saved, unless implicit tokens are disabled; None on any trouble."""
    if _env_true("HF_HUB_DISABLE_IMPLICIT_TOKEN"):
        return None
    try:
        return get_token()
    except Exception:  # noqa: BLE001 - e.g. a failed OIDC exchange: go on without a token
        return None


def _transfer_lfs(url: str, dest: Path, name: str, sha256: str, size: int | None, base: str, token: str | None,
                  progress: Progress, extra: dict) -> DownloadResult:
    """Bytes of an LFS file through ckptlab's resumable transfer: ``<name>.part`` kept across runs,
    ``Range`` resume, SHA-256 checked before the rename. The token goes only to the Hub's origin;
    the redirect to storage (a signed URL, re-resolved on every attempt) gets none."""
    from ckptlab.hub.download import transfer
    from ckptlab.hub.http import Requester

    auth = {"Authorization": f"Bearer {token}"} if token else None
    req = Requester(auth_headers=auth, auth_origin=base, interval=0.0,
                    token_hint="the repo may be gated or private: set HF_TOKEN")
    try:
        return transfer(req, url, dest, filename=name, expected_sha256=sha256, expected_size=size,
                        progress=progress, source="hf", extra=extra)
    finally:
        req.close()


def _remove_tree(staging: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(staging)
    with contextlib.suppress(OSError):
        staging.parent.rmdir()  # only when no other download is staged
