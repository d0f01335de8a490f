"""How long the model page (``/model/{id}``) takes server-side in a 50,000-file catalog, and what its indexes cost.

The catalog is synthetic but shaped like a real one: the rows of the small sample library (A1111 layout, scanned
with hashes and fingerprints: real ``info`` blobs with identify's evidence, real component fingerprints) repeated
to N rows, each with its own path, stat identity and SHA256; two thirds of the LoRAs carry a 250-tag
``ss_tag_frequency`` and an ``ss_new_sd_model_hash`` naming one of 50 checkpoints (so a base model has hundreds
of LoRAs trained on it); 1 % of the rows are ckptlab outputs whose ``ckptlab.inputs`` names an earlier row; one
checkpoint in 7 keeps the sample's component fingerprints (shared components).

Measured:

1. the one-time migration that adds the page's indexes to an existing catalog (``library.lineage``: a partial
   index and an expression index on ``files``; ``library.copies``: the component-fingerprint table, filled);
2. the model page, server-side (FastAPI test client, no network): a checkpoint, a LoRA, a base model with
   hundreds of trained LoRAs, a ckptlab output, the file its output was made from; median of ``--runs``;
3. for comparison, what the page avoids: ``made into`` by ``instr`` over every row's ``info`` and the
   per-component loop of ``show_file`` over all files.

    python benchmarks/web_model.py [--files N] [--runs N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sqlite3
import statistics
import sys
import time
from pathlib import Path

from _measure import ROOT, cache_dir, print_table, use_src

CACHE = cache_dir("web_model")


def sample_catalog() -> Path:
    from ckptlab.sample.build import build_library

    lib = CACHE / "lib"
    db = CACHE / "sample.db"
    if not db.exists():
        import ckptlab

        if not lib.exists():
            build_library(lib, "a1111", small=True)
        ckptlab.scan(lib, db=db, hash=True, fingerprint=True)
    return db


def synthetic(src: Path, dst: Path, n: int) -> dict:
    """The N-row catalog (module docstring); returns ids worth measuring."""
    from ckptlab.library.catalog import Catalog

    for p in (dst, Path(f"{dst}-wal"), Path(f"{dst}-shm")):
        if p.exists():
            p.unlink()
    Catalog(dst).close()
    s, d = sqlite3.connect(src), sqlite3.connect(dst)
    cols = [r[1] for r in s.execute("PRAGMA table_info(files)")]
    ccols = [r[1] for r in s.execute("PRAGMA table_info(content)")]
    rows = [dict(zip(cols, r, strict=True)) for r in s.execute(f"SELECT {', '.join(cols)} FROM files ORDER BY id")]
    content = {tuple(r[:4]): dict(zip(ccols, r, strict=True)) for r in s.execute(f"SELECT {', '.join(ccols)} FROM content")}
    rnd = random.Random(1)
    tags = {f"tag{i} word": rnd.randint(1, 300) for i in range(250)}
    ckpt_rows = [i for i in range(n) if rows[i % len(rows)]["kind"] == "checkpoint"]
    bases = [hashlib.sha256(b"%d" % i).hexdigest() for i in ckpt_rows[:50]]
    picks: dict = {"checkpoint": None, "lora": None, "output": None, "input": None, "base": ckpt_rows[0] + 1}
    d.execute("BEGIN")
    for i in range(n):
        row = dict(rows[i % len(rows)])
        c = dict(content.get((row["dev"], row["ino"], row["size"], row["mtime_ns"])) or dict.fromkeys(ccols))
        row.update(id=i + 1, ino=10_000_000 + i)
        row["display"] = f"/synthetic/{i}/{row['name']}"
        row["path"] = row["display"].encode()
        info = json.loads(row["info"] or "{}")
        md = info.setdefault("metadata", {})
        if row["kind"] in ("lora", "lycoris") and i % 3:
            md["ss_tag_frequency"] = {"10_x": tags}
            md["ss_new_sd_model_hash"] = bases[i % len(bases)]
            picks["lora"] = picks["lora"] or i + 1
        if i % 100 == 99:
            src_i = rnd.randrange(i)
            md["ckptlab.operation"] = "prune"
            md["ckptlab.inputs"] = [{"name": "x.safetensors", "sha256": hashlib.sha256(b"%d" % src_i).hexdigest()}]
            if picks["output"] is None:
                picks["output"], picks["input"] = i + 1, src_i + 1
        if row["kind"] == "checkpoint" and picks["checkpoint"] is None and i % 7:
            picks["checkpoint"] = i + 1
        row["info"] = json.dumps(info)
        d.execute(f"INSERT INTO files({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                  [row[k] for k in cols])
        c.update(dev=row["dev"], ino=row["ino"], size=row["size"], mtime_ns=row["mtime_ns"],
                 sha256=hashlib.sha256(b"%d" % i).hexdigest().upper())
        if c.get("components") and i % 7:
            comps = {k: hashlib.sha256(f"{k}{i}".encode()).hexdigest() for k in json.loads(c["components"])}
            c["components"] = json.dumps(comps)
            c["fingerprint"] = hashlib.sha256(c["components"].encode()).hexdigest()
            c["components_bf16"] = c["fingerprint_bf16"] = None
        d.execute(f"INSERT INTO content({', '.join(ccols)}) VALUES ({', '.join('?' * len(ccols))})",
                  [c[k] for k in ccols])
    d.execute("COMMIT")
    d.close()
    return picks


def median_ms(fn, runs: int) -> float:
    fn()  # warm (imports, page cache)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=50_000)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    use_src()
    sys.path.insert(0, str(ROOT / "tests"))
    CACHE.mkdir(parents=True, exist_ok=True)
    db = CACHE / f"catalog-{args.files}.db"
    t0 = time.perf_counter()
    picks = synthetic(sample_catalog(), db, args.files)
    print(f"synthetic catalog: {args.files:,} files, {os.path.getsize(db) / 1e6:.0f} MB, built in "
          f"{time.perf_counter() - t0:.1f} s")

    from ckptlab.library.catalog import Catalog
    from ckptlab.library.show import show_file  # noqa: F401 - imported before timing

    t0 = time.perf_counter()
    from ckptlab.library import copies, lineage

    Catalog(db).close()
    migrate_s = time.perf_counter() - t0

    from fakes.web import make_client

    rows = []
    with make_client(db) as client, Catalog(db) as cat:
        for label, fid in (("checkpoint", picks["checkpoint"]), ("LoRA (250-tag metadata)", picks["lora"]),
                           ("base model of hundreds of LoRAs", picks["base"]), ("ckptlab output", picks["output"]),
                           ("input of that output", picks["input"])):
            if fid is None:
                continue

            def get(fid=fid):
                r = client.get(f"/model/{fid}")
                assert r.status_code == 200, r.text[:300]

            rec = cat.get(fid)
            made = len(lineage.made_into(cat, rec.sha256)) if rec.sha256 else 0
            rows.append((label, fid, median_ms(get, args.runs), made))
        print_table(("model page", "id", "median ms", "made into"), rows, ("", "", ".1f", ""))
        print(f"\none-time migration of the page's indexes on this catalog: {migrate_s:.2f} s")

        rec = cat.get(picks["base"])
        sha = rec.sha256
        full = median_ms(lambda: cat.conn.execute("SELECT id FROM files WHERE instr(info, ?) > 0 OR instr(info, ?) > 0",
                                                  (sha.lower(), sha)).fetchall(), 3)
        indexed = median_ms(lambda: lineage.made_into(cat, sha), args.runs)
        ck = cat.get(picks["checkpoint"])
        comp_idx = median_ms(lambda: copies.same_component(cat, ck), args.runs)

        def loop():
            for other in cat.files(status="present", sort="path"):
                if other.components and other.id != ck.id:
                    any(other.components.get(k) == v for k, v in ck.components.items())

        comp_loop = median_ms(loop, 1)
        print_table(("query", "median ms"), [
            ("made into: instr over every row's info (avoided)", full),
            ("made into: lineage.made_into (partial + expression index)", indexed),
            ("same component: loop over all files as show_file does (avoided)", comp_loop),
            ("same component: copies.same_component (component_fps index)", comp_idx)], ("", ".1f"))


if __name__ == "__main__":
    main()
