"""A synthetic hub catalog: rows written straight into a real catalog (its own schema, made by ``Catalog``), fast
enough for a million rows (``executemany`` in one transaction), with a hub's mix: mostly objects in S3 (``dev =
REMOTE_DEV``, URL paths), some local files, families / kinds / formats / verdicts, ~5 % of the rows in duplicate
groups (exact copies, fp16 and bf16 variants of the same weights), hard links and symlinks, missing and error
rows, and - with ``hostile=True`` - names a terminal, a spreadsheet or SQL would misread.

No model file exists behind any row: the catalog is what ``report``, ``dupes`` and ``ls`` read. Used by
tests/library/test_hub_*.py and benchmarks/hub_answers.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

from ckptlab.library.catalog import Catalog
from ckptlab.remote import RemoteEntry, remote_stat_key

FAMILIES = ("sd1", "sdxl", "flux", "sd3", "pony", None)
KINDS = ("checkpoint", "lora", "lora", "lora", "vae", "embedding", "controlnet", "upscaler", None)
HOSTILE = ("evil\nname", "\u202egnp.safetensors", "=HYPERLINK(\"http://x\")", "'; DROP TABLE files; --",
           "100%_off", "tab\there", "\x1b[31mred", "quote\"d", "back\\slash")
LOCAL_DEV = 2049


def _hex(*parts) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()


def build(db: str | os.PathLike, rows: int, *, seed: int = 0, remote_share: float = 0.8, dup_share: float = 0.05,
          hostile: bool = False, batch: int = 50_000) -> dict:
    """Write ``rows`` file rows (and their content rows) into a new catalog at ``db``; returns counts."""
    rnd = random.Random(seed)
    files_sql = ("INSERT INTO files(id, path, display, name, root, folder, dev, ino, size, mtime_ns, is_link, format, "
                 "kind, family, variant, n_tensors, tensor_bytes, ema_bytes, fp32_bytes, dtypes, safety, error, "
                 "status, first_seen, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                 "?, ?, ?, ?, ?)")
    content_sql = ("INSERT OR IGNORE INTO content(dev, ino, size, mtime_ns, sha256, autov2, fingerprint, components, "
                   "fingerprint_bf16, hashed_at, fingerprinted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
    fbuf: list[tuple] = []
    cbuf: list[tuple] = []
    counts = {"rows": 0, "remote": 0, "dup_rows": 0}
    with Catalog(db) as cat:
        conn = cat.conn

        def flush() -> None:
            if fbuf:
                conn.executemany(files_sql, fbuf)
                conn.executemany(content_sql, cbuf)
                fbuf.clear()
                cbuf.clear()

        conn.execute("BEGIN")
        i = 0
        model = 0
        while i < rows:
            model += 1
            # one model: usually one file, sometimes a duplicate group of 2-4 copies in several forms
            n = rnd.choice((2, 2, 3, 4)) if rnd.random() < dup_share / 2.5 else 1
            weights = _hex("weights", seed, model)
            bf16w = _hex("bf16", seed, model)
            family, kind = rnd.choice(FAMILIES), rnd.choice(KINDS)
            base_size = rnd.randrange(10 << 20, 7 << 30)
            first_key = None
            for copy in range(min(n, rows - i)):
                i += 1
                form = "exact" if copy and rnd.random() < 0.5 else ("fp16" if copy and rnd.random() < 0.6 else
                                                                   "bf16" if copy else "orig")
                remote = rnd.random() < remote_share
                fmt = rnd.choices(("safetensors", "pickle", "gguf", "diffusers"), (80, 15, 3, 2))[0]
                if form == "exact" and first_key is not None:
                    fmt = first_key["format"]
                safety = ("safe" if fmt != "pickle" else
                          rnd.choices(("safe", "suspicious", "malicious", "unchecked", None), (80, 8, 4, 5, 3))[0])
                if fmt == "safetensors" and rnd.random() < 0.01:
                    safety = "corrupt"
                error = "truncated header" if rnd.random() < 0.005 else None
                status = "missing" if rnd.random() < 0.01 else "present"
                stem = f"{(family or 'x')}-{kind or 'model'}-{model}-{copy}"
                if hostile and rnd.random() < 0.2:
                    stem = rnd.choice(HOSTILE) + f"-{model}-{copy}"
                suffix = {"pickle": ".ckpt", "gguf": ".gguf", "diffusers": ""}.get(fmt, ".safetensors")
                name = stem + suffix
                if form == "exact" and first_key is not None:
                    size, dtype = first_key["size"], first_key["dtype"]
                else:
                    dtype = {"orig": "F32", "fp16": "F16", "bf16": "BF16"}[form]
                    size = base_size // (1 if dtype == "F32" else 2) + rnd.randrange(0, 4096)
                if remote:
                    url = f"s3://hub-bucket/uploads/u{rnd.randrange(10_000)}/{name}"
                    dev, ino, _, mtime_ns = remote_stat_key(RemoteEntry(url, size, etag=_hex("etag", i)[:32],
                                                                        last_modified=1.7e9 + i))
                    path, display, root, folder, is_link = url.encode("utf-8", "surrogatepass"), url, \
                        "s3://hub-bucket/uploads", None, 0
                    counts["remote"] += 1
                else:
                    sub = rnd.choice(("models/Stable-diffusion", "models/Lora", "Downloads", "archive"))
                    display = f"/hub/local/{sub}/{name}"
                    path = os.fsencode(display)
                    if hostile and rnd.random() < 0.02:  # a name that is not UTF-8 on disk
                        path = os.fsencode(f"/hub/local/{sub}/") + b"\xff\xfe" + os.fsencode(name)
                        display = path.decode("utf-8", "replace")
                    dev, ino, mtime_ns = LOCAL_DEV, 10_000_000 + i, 1_700_000_000_000_000_000 + i
                    root, folder, is_link = "/hub/local", ("checkpoints" if "Stable" in sub else None), 0
                    if first_key is not None and not first_key["remote"] and rnd.random() < 0.05:
                        # a hard link (or a symlink) to the group's first file: one physical file
                        dev, ino, size, mtime_ns = first_key["stat"]
                        is_link = int(rnd.random() < 0.5)
                sha = (first_key["sha"] if form == "exact" and first_key is not None else _hex("bytes", seed, i))
                if first_key is not None and (dev, ino) == first_key["stat"][:2]:
                    sha = first_key["sha"]
                # a bf16 copy rounds to other fp16 weights: its own fingerprint, the original's bf16 fingerprint
                fingerprint = _hex("bf16-copy", seed, i) if form == "bf16" else weights
                # a checkpoint's parts: its own UNet, one of a few VAEs many checkpoints share (shared components)
                comps = json.dumps({"unet": _hex("unet", fingerprint), "vae": _hex("vae", seed, model % 7)}
                                   if kind == "checkpoint" else {"model": fingerprint})
                hashed = rnd.random() < 0.97
                fingerprinted = fmt != "gguf" and rnd.random() < 0.95
                dtypes = json.dumps({dtype: size - 1024, "I64": 8})
                fbuf.append((i, path, display, name, root, folder, dev, ino, size, mtime_ns, is_link, fmt,
                             kind, family, None, 1000, size - 1024, 0, size - 1024 if dtype == "F32" else 0,
                             dtypes, safety, error, status, 1.7e9, 1.7e9))
                cbuf.append((dev, ino, size, mtime_ns, sha.upper() if hashed else None,
                             sha[:10].upper() if hashed else None, fingerprint if fingerprinted else None,
                             comps if fingerprinted else None, bf16w if fingerprinted and dtype != "F16" else None,
                             1.7e9, 1.7e9))
                if first_key is None:
                    first_key = {"format": fmt, "size": size, "dtype": dtype, "remote": remote, "sha": sha,
                                 "stat": (dev, ino, size, mtime_ns)}
                counts["rows"] += 1
                counts["dup_rows"] += n > 1
                if len(fbuf) >= batch:
                    flush()
        flush()
        conn.execute("COMMIT")
    return counts


if __name__ == "__main__":  # pragma: no cover - python tests/fakes/hub_catalog.py DB ROWS
    import sys

    print(build(Path(sys.argv[1]), int(sys.argv[2])))
