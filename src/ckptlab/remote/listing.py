"""``list_objects(prefix_url)``: the objects under a prefix, page by page, as ``RemoteEntry`` values.

S3 (``s3://bucket/prefix``): ListObjectsV2 pages (``page_size`` keys each) through s3fs's botocore client, each
page yielded as it arrives, with continuation tokens; a versioned bucket is listed with ListObjectVersions
(latest versions only, delete markers skipped) so every entry carries its VersionId. Keys come in UTF-8 binary
order (S3's own), which the distributed scan relies on to group sidecars and diffusers folders while streaming.

Other protocols (``gs://``, ``az://``...): fsspec's ``find(detail=True)``, sorted the same way (those listings
are held in memory: gcsfs/adlfs page internally but return the whole result). ``http(s)://``: one object (HTTP
has no listing), described by fsspec's ``info``.

Throttling (HTTP 503 SlowDown, 429, ``Throttling*``, ``RequestLimitExceeded``) and dropped connections on a
page are retried with exponential backoff (``retries`` times); a bucket that does not exist, denied access or
an endpoint that cannot be reached raise ``CkptlabError`` with one line. Imports fsspec/s3fs lazily.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from datetime import datetime

from ckptlab.errors import CkptlabError
from ckptlab.remote import RemoteEntry

#: error codes / messages a store uses to ask for a slower pace
THROTTLE_MARKERS = ("SlowDown", "Throttl", "TooManyRequests", "RequestLimitExceeded", "503", "429",
                    "ServiceUnavailable", "RequestTimeout", "InternalError")


def is_throttle(exc: BaseException) -> bool:
    """True for an exception that means "try again later" (throttling, a 5xx, a dropped connection)."""
    code = ""
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        code = str(resp.get("Error", {}).get("Code", "")) + " " + str(
            resp.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    text = f"{type(exc).__name__} {code} {exc}"
    if any(m in text for m in THROTTLE_MARKERS):
        return True
    return type(exc).__name__ in ("ReadTimeoutError", "ConnectionClosedError", "ServerDisconnectedError",
                                  "ClientPayloadError", "IncompleteReadError", "ResponseStreamingError")


def backoff(attempt: int, base: float = 0.1, cap: float = 5.0) -> float:
    """Seconds to wait before retry ``attempt`` (1-based): exponential with full jitter."""
    return random.uniform(0, min(cap, base * (2 ** attempt)))


def split_url(url: str) -> tuple[str, str, str]:
    """``(protocol, bucket, key prefix)`` of ``s3://bucket/some/prefix``."""
    proto, sep, rest = url.partition("://")
    if not sep:
        raise CkptlabError(f"not a URL: {url}")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise CkptlabError(f"no bucket in {url}")
    return proto.lower(), bucket, key


def _epoch(v) -> float | None:
    if v is None:
        return None
    if isinstance(v, datetime):
        return v.timestamp()
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return datetime.fromisoformat(str(v).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _etag(v) -> str | None:
    return str(v).strip('"') if v else None


def _s3fs():
    try:
        import s3fs
    except ImportError:
        raise CkptlabError("s3:// paths need the remote extra: pip install 'ckptlab[remote]'") from None
    return s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs={
        "connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 2, "mode": "standard"}})


def _fatal(url: str, e: BaseException) -> CkptlabError:
    name = type(e).__name__
    text = str(e)
    code = ""
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        code = str(resp.get("Error", {}).get("Code", ""))
    if code == "NoSuchBucket" or "NoSuchBucket" in text:
        return CkptlabError("no such bucket", url)
    cause = e.__cause__ or e.__context__
    if isinstance(e, FileNotFoundError) and isinstance(cause, OSError) and not isinstance(cause, FileNotFoundError):
        e, name, text = cause, type(cause).__name__, str(cause)  # fsspec's HTTP info: a refused connection
    elif isinstance(e, FileNotFoundError):  # s3fs turns NoSuchBucket into this
        return CkptlabError("no such bucket" if "bucket" in text.lower() else "not found", url)
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or isinstance(e, PermissionError):
        return CkptlabError(f"access denied ({code or name})", url)
    if "Could not connect" in text or "EndpointConnectionError" in name or "ConnectError" in name or isinstance(
            e, (ConnectionError, OSError)):
        return CkptlabError(f"cannot reach the storage endpoint: {text.splitlines()[0] if text else name}", url)
    return CkptlabError(f"cannot list: {name}: {text.splitlines()[0] if text else ''}", url)


def call_with_retries(url: str, fn, retries: int, **kw):
    """``fn(**kw)`` with retries on throttling; other errors become one-line ``CkptlabError``s."""
    attempt = 0
    while True:
        try:
            return fn(**kw)
        except CkptlabError:
            raise
        except Exception as e:  # noqa: BLE001 - every client error is sorted into retry / one line
            attempt += 1
            if attempt <= retries and is_throttle(e):
                time.sleep(backoff(attempt))
                continue
            raise _fatal(url, e) from None


def list_objects(prefix_url: str, *, page_size: int = 1000, retries: int = 8, fs=None) -> Iterator[RemoteEntry]:
    """Every object under ``prefix_url`` (a "folder" prefix or one object's URL), in key order, streamed page
    by page. Keys ending in ``/`` (folder markers) are skipped."""
    proto, bucket, key = split_url(prefix_url)
    if proto == "s3":
        yield from _list_s3(prefix_url, bucket, key, page_size, retries, fs)
    else:
        yield from _list_fsspec(prefix_url, proto, retries, fs)


def _list_s3(url: str, bucket: str, prefix: str, page_size: int, retries: int, fs) -> Iterator[RemoteEntry]:
    fs = fs or _s3fs()
    call = fs.call_s3
    versioned = False
    try:
        v = call_with_retries(url, call, retries, method="get_bucket_versioning", Bucket=bucket)
        versioned = (v or {}).get("Status") == "Enabled"
    except CkptlabError as e:
        if "access denied" not in e.message:  # no permission to ask: list as unversioned
            raise
    lister = _list_s3_versions if versioned else _list_s3_current
    if not prefix or prefix.endswith("/"):
        yield from lister(url, bucket, prefix, page_size, retries, call)
        return
    # "s3://b/models" is the folder models/ (not models-old/...), or else the one object named models
    n = 0
    for n, e in enumerate(lister(url, bucket, prefix + "/", page_size, retries, call), start=1):  # noqa: B007
        yield e
    if n == 0:
        first = next(iter(lister(url, bucket, prefix, 1, retries, call)), None)  # the shortest key comes first
        if first is not None and first.url == f"s3://{bucket}/{prefix}":
            yield first


def _list_s3_current(url, bucket, prefix, page_size, retries, call) -> Iterator[RemoteEntry]:
    kw = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size}
    while True:
        page = call_with_retries(url, call, retries, method="list_objects_v2", **kw)
        for obj in page.get("Contents", []) or []:
            k = obj["Key"]
            if k.endswith("/"):
                continue
            yield RemoteEntry(url=f"s3://{bucket}/{k}", size=int(obj.get("Size", 0)), etag=_etag(obj.get("ETag")),
                              last_modified=_epoch(obj.get("LastModified")))
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return
        kw["ContinuationToken"] = token


def _list_s3_versions(url, bucket, prefix, page_size, retries, call) -> Iterator[RemoteEntry]:
    kw = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size}
    while True:
        page = call_with_retries(url, call, retries, method="list_object_versions", **kw)
        for obj in page.get("Versions", []) or []:
            k = obj["Key"]
            if not obj.get("IsLatest") or k.endswith("/"):
                continue
            vid = obj.get("VersionId")
            yield RemoteEntry(url=f"s3://{bucket}/{k}", size=int(obj.get("Size", 0)), etag=_etag(obj.get("ETag")),
                              version_id=None if vid in (None, "null") else str(vid),
                              last_modified=_epoch(obj.get("LastModified")))
        if not page.get("IsTruncated"):
            return
        kw["KeyMarker"] = page.get("NextKeyMarker")
        kw["VersionIdMarker"] = page.get("NextVersionIdMarker")


def _list_fsspec(url: str, proto: str, retries: int, fs) -> Iterator[RemoteEntry]:
    if fs is None:
        try:
            import fsspec
        except ImportError:
            raise CkptlabError(f"{proto}:// paths need the remote extra: pip install 'ckptlab[remote]'") from None
        try:
            fs = fsspec.filesystem(proto)
        except (ImportError, ValueError) as e:
            raise CkptlabError(f"{proto}:// paths need the remote extra: pip install 'ckptlab[remote]' ({e})") \
                from None
    if proto in ("http", "https"):  # no listing in HTTP: the URL is one object
        info = call_with_retries(url, lambda: fs.info(url), retries)
        yield RemoteEntry(url=url, size=int(info.get("size") or 0), etag=_etag(info.get("ETag") or info.get("etag")),
                          last_modified=_epoch(info.get("Last-Modified") or info.get("last_modified")))
        return
    found = call_with_retries(url, fs.find, retries, path=url, detail=True)
    for path in sorted(found):
        info = found[path]
        if info.get("type", "file") != "file":
            continue
        full = path if "://" in path else f"{proto}://{path}"
        yield RemoteEntry(url=full, size=int(info.get("size") or 0),
                          etag=_etag(info.get("ETag") or info.get("etag") or info.get("md5Hash")),
                          version_id=(str(info.get("generation") or info.get("version_id") or "") or None),
                          last_modified=_epoch(info.get("LastModified") or info.get("updated")
                                               or info.get("last_modified") or info.get("mtime")))
