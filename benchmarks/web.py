"""Web app benchmark (issue 16): a 50,000-file catalog; the library index's first build, server start, the first
library page and typical filter/search answers, against the plain ``list_files`` pass (what ``ckptlab ls --search``
does, and what the skeleton's library page did) for the same questions.

    python benchmarks/web.py              # 50,000 files (the issue's size)
    python benchmarks/web.py --files 5000 --repeats 10   # quicker
    python benchmarks/web.py --keep       # keep the catalog in .bench-cache/web/ (reused by the next run)

The catalog is written directly into SQLite (seconds; no 50,000 real model files exist: the index and the page
read the catalog only, never the files). Its rows follow a realistic library: 63 % LoRAs/LyCORIS, checkpoints,
embeddings, VAEs, ControlNets...; SD 1.5 / SDXL / Flux / SD2 / SD3 families (some only known through CivitAI's base
model); fp16/bf16/fp32/fp8/mixed; A1111 and ComfyUI folders; names from a word list; a safety verdict on most
(some suspicious, malicious, corrupt, never checked); sha256 on every file with 8 % in duplicate groups; 30 %
linked to CivitAI version and model records (tags, trained words, some with a newer version); LoRA trigger words;
20 % with sidecar summaries and previews.

Targets: first library page <= 300 ms server-side, a filter or search <= 200 ms, server start <= 2 s.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _measure import cache_dir, child_env, print_table, use_src

CACHE = cache_dir("web")

WORDS = ("anime", "realistic", "detail", "tweaker", "portrait", "cyberpunk", "fantasy", "landscape", "pixel", "art",
         "style", "character", "epic", "dream", "shaper", "vision", "juggernaut", "ghibli", "watercolor", "neon",
         "noir", "retro", "mecha", "chibi", "photo", "cinematic", "lighting", "hands", "eyes", "clothing", "armor",
         "dragon", "forest", "castle", "ink", "sketch", "oil", "painting", "3d", "render", "cute", "dark", "gothic",
         "steampunk", "surreal", "minimal", "vivid", "soft", "sharp", "grain", "film", "analog", "polaroid", "magic")
KINDS = (("lora", 0.55), ("lycoris", 0.08), ("checkpoint", 0.12), ("embedding", 0.10), ("vae", 0.04),
         ("controlnet", 0.04), ("upscaler", 0.02), ("unet", 0.02), ("ipadapter", 0.02), ("text_encoder", 0.01))
FOLDERS = {"lora": ("Lora", "loras"), "lycoris": ("LyCORIS", "loras"), "checkpoint": ("Stable-diffusion", "checkpoints"),
           "embedding": ("embeddings", "embeddings"), "vae": ("VAE", "vae"), "controlnet": ("ControlNet", "controlnet"),
           "upscaler": ("ESRGAN", "upscale_models"), "unet": ("Stable-diffusion", "diffusion_models"),
           "ipadapter": ("ControlNet", "ipadapter"), "text_encoder": ("text_encoder", "text_encoders")}
FAMILIES = (("sd1", 0.45), ("sdxl", 0.33), ("flux", 0.08), ("sd2", 0.03), ("sd3", 0.03), (None, 0.08))
BASE_MODELS = {"sd1": ("SD 1.5",), "sdxl": ("SDXL 1.0", "Pony", "Illustrious", "NoobAI"), "flux": ("Flux.1 D",),
               "sd2": ("SD 2.1",), "sd3": ("SD 3.5",), None: ("SD 1.5", "SDXL 1.0", "Pony")}
DTYPES = ((("F16",), 0.70), (("BF16",), 0.10), (("F32",), 0.10), (("F32", "F16"), 0.05), (("F8_E4M3",), 0.05))
SAFETY = (("safe", 0.90), (None, 0.05), ("suspicious", 0.03), ("malicious", 0.01), ("corrupt", 0.01))
SUBTYPES = {"lora": (None, None, None, "locon", "dora"), "lycoris": ("loha", "lokr", "locon"),
            "checkpoint": (None, None, None, "inpaint")}


def pick(rng: random.Random, table):
    values, weights = zip(*table, strict=True)
    return rng.choices(values, weights)[0]


def build(db: Path, n: int, seed: int = 16) -> None:
    """A catalog of ``n`` files written directly (core + hub tables; the web index is NOT imported here, so the
    catalog is what an existing library looks like before its first ``ckptlab serve``)."""
    use_src()
    from ckptlab.hub import store  # noqa: F401 - its tables
    from ckptlab.library.catalog import Catalog

    rng = random.Random(seed)
    if db.exists():
        db.unlink()
    for extra in db.parent.glob(db.name + "-*"):
        extra.unlink()
    cat = Catalog(db)
    now = time.time()
    files, content, links, versions, models = [], [], [], [], []
    shas: list[str] = []
    version_id, model_id = 100000, 5000
    for i in range(1, n + 1):
        kind = pick(rng, KINDS)
        fam = pick(rng, FAMILIES)
        if kind in ("upscaler", "text_encoder"):
            fam = None
        ui = rng.random() < 0.6
        folder = FOLDERS[kind][0 if ui else 1]
        root = "/bench/lib/" + ("a1111/models" if ui else "comfyui/models")
        words = rng.sample(WORDS, rng.randint(2, 4))
        sep = rng.choice("_- ")
        stem = sep.join(words) + rng.choice(("", f"_v{rng.randint(1, 12)}", f"-{rng.randint(1, 99)}",
                                              "XL" if fam == "sdxl" else ""))
        stem = rng.choice((stem, stem.title().replace(" ", ""), stem)) + f"_{i}"
        fmt, ext = ("safetensors", ".safetensors") if rng.random() < 0.85 else (
            ("pickle", rng.choice((".ckpt", ".pt"))) if rng.random() < 0.8 else ("gguf", ".gguf"))
        name = stem + ext
        sub = rng.choice(("", "", "characters/", "styles/", "concepts/"))
        path = f"{root}/{folder}/{sub}{name}"
        size = {"checkpoint": 2_100_000_000, "unet": 11_000_000_000, "lora": 150_000_000}.get(kind, 80_000_000)
        size = int(size * rng.uniform(0.2, 1.6))
        dts = pick(rng, DTYPES)
        dtypes = {d: size // len(dts) for d in dts} if len(dts) > 1 else {dts[0]: size - 1024}
        variant = rng.choice(SUBTYPES.get(kind, (None,)))
        safety = pick(rng, SAFETY)
        triggers = None
        if kind in ("lora", "lycoris"):
            triggers = json.dumps([{"word": w, "count": rng.randint(1, 40), "sources": ["tag frequency"]}
                                   for w in rng.sample(WORDS, 2)] + [{"word": f"{words[0]}{i}", "count": 0,
                                                                      "sources": ["output name"]}])
        sidecars = None
        if rng.random() < 0.2:
            sidecars = json.dumps({"files": {"preview": stem + ".preview.png", "civitai_info": stem + ".civitai.info"},
                                   "civitai_info": {"kind": "civitai_helper", "model_name": " ".join(words).title(),
                                                    "version_name": "v1.0", "trained_words": [words[-1]]},
                                   "trigger_words": [words[-1]]})
        first_seen = now - rng.uniform(0, 365 * 86400)
        files.append((path.encode(), path, name, root, folder, 1, i, size, 1_700_000_000_000_000_000 + i, 0, fmt,
                      kind, fam, variant, 100, size, 0, 0, json.dumps(dtypes), safety, sidecars, "present",
                      first_seen, now, triggers))
        sha = rng.choice(shas) if shas and rng.random() < 0.08 else hashlib.sha256(f"{seed}-{i}".encode()).hexdigest().upper()
        shas.append(sha)
        content.append((1, i, size, 1_700_000_000_000_000_000 + i, sha, sha[:10], now))
        if rng.random() < 0.3 and sha not in {lk[0] for lk in links[-50:]}:
            model_id += 1
            n_versions = rng.randint(1, 4)
            vids = list(range(version_id + n_versions, version_id, -1))  # newest first
            version_id += n_versions
            linked = vids[0] if rng.random() < 0.85 else rng.choice(vids)
            base = rng.choice(BASE_MODELS[fam])
            mname = " ".join(w.title() for w in words) + rng.choice(("", " XL", " | Style", " (LoRA)"))
            models.append((model_id, {"id": model_id, "name": mname, "type": "LORA" if kind in ("lora", "lycoris")
                                      else "Checkpoint", "tags": rng.sample(WORDS, 3) + [kind],
                                      "description": "<p>" + " ".join(rng.choices(WORDS, k=300)) + "</p>",
                                      "modelVersions": [{"id": v, "name": f"v{len(vids) - j}"} for j, v in enumerate(vids)]}))
            versions.append((linked, {"id": linked, "modelId": model_id, "name": f"v{len(vids) - vids.index(linked)}",
                                      "baseModel": base, "trainedWords": rng.sample(WORDS, 2),
                                      "model": {"name": mname, "type": "LORA"},
                                      "files": [{"name": name, "sizeKB": size / 1024, "hashes": {"SHA256": sha}}],
                                      "images": [{"url": f"https://image.civitai.com/x/{linked}.jpeg"}]}))
            links.append((sha, linked, model_id, None, "sha256", None, now, now, "ok"))
    with cat.transaction() as c:
        c.executemany(
            "INSERT INTO files(path, display, name, root, folder, dev, ino, size, mtime_ns, is_link, format, kind, "
            "family, variant, n_tensors, tensor_bytes, ema_bytes, fp32_bytes, dtypes, safety, sidecars, status, "
            "first_seen, last_seen, triggers) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
            "?, ?, ?, ?)", files)
        c.executemany("INSERT INTO content(dev, ino, size, mtime_ns, sha256, autov2, hashed_at) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?)", content)
        c.executemany("INSERT OR IGNORE INTO civitai_links VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", links)
        for kind, rows in (("version", versions), ("model", models)):
            c.executemany("INSERT OR IGNORE INTO civitai_records(kind, remote_id, revision, digest, data, fetched_at, "
                          "checked_at) VALUES (?, ?, 1, ?, ?, ?, ?)",
                          [(kind, rid, hashlib.sha256(json.dumps(d).encode()).hexdigest(), json.dumps(d), now, now)
                           for rid, d in rows])
    cat.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(conn: http.client.HTTPConnection, url: str) -> tuple[int, bytes]:
    conn.request("GET", url)
    r = conn.getresponse()
    return r.status, r.read()


def stats(samples: list[float]) -> tuple[float, float]:
    s = sorted(samples)
    return statistics.median(s), s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))]


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--baseline-repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the catalog in .bench-cache/web/")
    args = ap.parse_args()
    use_src()
    CACHE.mkdir(parents=True, exist_ok=True)
    db = CACHE / f"catalog-{args.files}.db"
    rows: list[tuple] = []

    t0 = time.perf_counter()
    build(db, args.files)
    print(f"built a {args.files:,}-file catalog in {time.perf_counter() - t0:.1f} s ({db.stat().st_size / 2**20:.0f} MiB)")

    # -- the index's first build: opening with ckptlab.web imported runs the migration (tables, triggers, every
    # file marked), the first refresh builds every row
    from ckptlab.library.catalog import Catalog
    from ckptlab.web import index, query

    t0 = time.perf_counter()
    cat = Catalog(db)
    t_mig = time.perf_counter() - t0
    n = index.refresh(cat)
    t_build = time.perf_counter() - t0
    print(f"index first build: migration {t_mig * 1000:.0f} ms + refresh of {n:,} rows = {t_build * 1000:.0f} ms")
    rows.append(("index first build (once per catalog)", t_build * 1000, t_build * 1000, None, None, "-"))
    t_noop = timed(lambda: index.refresh(cat), args.repeats)
    rows.append(("refresh with nothing dirty", *stats(t_noop), None, None, "-"))
    with cat.transaction() as c:  # a rescan that changed 1,000 files (the triggers mark them)
        c.execute("UPDATE files SET safety = 'safe' WHERE id IN (SELECT id FROM files WHERE safety IS NULL LIMIT 1000)")
        c.execute("UPDATE files SET size = size + 1 WHERE id % 50 = 0")
    t0 = time.perf_counter()
    n_dirty = index.refresh(cat)
    t_inc = (time.perf_counter() - t0) * 1000
    rows.append((f"refresh after a rescan changed {n_dirty:,} files", t_inc, t_inc, None, None, "-"))

    # -- server start: process start until the first HTTP answer of `ckptlab serve`
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ckptlab", "serve", "--db", str(db), "--port", str(port)],
                            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_status = None
    try:
        while time.perf_counter() - t0 < 60:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                first_status, _ = get(conn, "/")
                break
            except OSError:
                time.sleep(0.01)
        t_start = (time.perf_counter() - t0) * 1000
        if first_status is None:
            raise SystemExit(f"the server did not answer: {proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ''}")
        rows.append((f"server start to first answer (GET / {first_status})", t_start, t_start, None, None, "<= 2000"))
        page_http = timed(lambda: get(conn, "/"), args.repeats)
        status, body = get(conn, "/")
        print(f"GET / through the server: HTTP {status}, {len(body):,} bytes")
        rows.append(("GET / through the server", *stats(page_http), None, None, "<= 300"))
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    # -- the page through the app in-process, and the queries
    from fastapi.testclient import TestClient

    from ckptlab.hub.link import link_lookup
    from ckptlab.library.show import list_files
    from ckptlab.web.app import create_app

    app = create_app(db, host="127.0.0.1", port=8765)
    with TestClient(app, base_url="http://127.0.0.1:8765") as client:
        page_app = timed(lambda: client.get("/"), args.repeats)
        deep = client.get("/", params={"page": 200})
        print(f"GET / in-process: HTTP {client.get('/').status_code}; /?page=200: HTTP {deep.status_code}")

    def base(**kw):
        return lambda: list_files(cat, civitai=link_lookup(cat), **kw)

    def plain_filter(pred, **kw):
        return lambda: [r for r, _ in list_files(cat, civitai=link_lookup(cat), **kw) if pred(r)]

    word = "tweak"
    queries = [
        ("first page (no filter)", query.Filters(), base()),
        ("kind=lora", query.Filters(kind=("lora",)), base(kind="lora")),
        ("family=sdxl", query.Filters(family=("sdxl",)), base(family="sdxl")),
        ("safety=malicious", query.Filters(safety=("malicious",)),
         plain_filter(lambda r: r.safety == "malicious", unsafe=True)),
        (f"q={word} (partial word)", query.Filters(q=word), base(search=word)),
        ("q=a (one letter)", query.Filters(q="a"), base(search="a")),
        ("kind=lora family=sdxl q=detail sort=size desc", query.Filters(q="detail", kind=("lora",), family=("sdxl",),
                                                                       sort="size", desc=True),
         base(kind="lora", family="sdxl", search="detail", sort="size")),
        ("duplicates=yes", query.Filters(duplicates=True), None),
        ("updates=yes linked=yes", query.Filters(updates=True, linked=True), None),
        ("tag=anime precision=bf16", query.Filters(tag=("anime",), precision=("bf16",)), None),
        ("deep page (page 400 of name sort)", query.Filters(page=400, per_page=60), base()),
        ("sort=added desc page 100", query.Filters(sort="added", desc=True, page=100), base(sort="mtime")),
    ]
    q_rows = []
    for label, f, baseline in queries:
        samples = timed(lambda f=f: query.search(cat, f), args.repeats)
        med, p95 = stats(samples)
        total = query.search(cat, f).total
        b = stats(timed(baseline, args.baseline_repeats))[0] if baseline else None
        q_rows.append((f"search {label} [{total:,}]", med, p95, b, (b / med) if b else None, "<= 200"))
    fac = stats(timed(lambda: query.facets(cat), args.repeats))
    from ckptlab.library.ui_folders import KIND_GROUPS

    fac_cold = timed(lambda: query.count_facets(cat, KIND_GROUPS), 5)
    rows.append(("GET / in-process (TestClient)", *stats(page_app), None, None, "<= 300"))
    rows += q_rows
    rows.append(("facets (cached)", *fac, None, None, "-"))
    rows.append(("facets (counted again after a change)", *stats(fac_cold), None, None, "-"))
    cat.close()

    print()
    print_table(("measurement", "median ms", "p95 ms", "ls pass ms", "speed-up", "target ms"),
                [(r[0], r[1], r[2], "-" if r[3] is None else f"{r[3]:.0f}", "-" if r[4] is None else f"{r[4]:.0f}x",
                  r[5]) for r in rows], ("", ".1f", ".1f", "", "", ""))
    print(f"load average (1/5/15 min) at the end: {' / '.join(f'{x:.1f}' for x in os.getloadavg())} on "
          f"{os.cpu_count()} CPUs")
    if not args.keep:
        shutil.rmtree(CACHE, ignore_errors=True)
    else:
        print(f"kept {db}")
    if os.environ.get("BENCH_JSON"):
        Path(os.environ["BENCH_JSON"]).write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
