"""Screenshots of ``ckptlab serve`` for the docs: the library grid, a LoRA's model page and a running job, taken
in Debian's chromium (Playwright) from the real server on the sample library.

    python scripts/web_screenshots.py [--lib DIR] [--out docs/images]

Without ``--lib`` it builds the sample library (both layouts, scanned with hashes) in a temporary folder. The
running job is a precision change of a big sparse checkpoint added for it (cancelled once photographed). Writes
``web-library.png``, ``web-model.png``, ``web-job.png`` (1280x800, palette PNGs when Pillow is there)."""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

VIEWPORT = {"width": 1280, "height": 800}


def build(lib: Path) -> None:
    import ckptlab
    from ckptlab.sample.build import build_library

    reuse: dict = {}
    for layout in ("a1111", "comfyui"):
        build_library(lib / layout, layout, small=True, reuse=reuse)
    ckptlab.scan(lib, db=lib / "catalog.db", hash=True, fingerprint=True)


def file_id(db: Path, name: str) -> int:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT min(id) FROM files WHERE status = 'present' AND name = ?", (name,)).fetchone()
    if not row or row[0] is None:
        raise SystemExit(f"{name} is not in {db}")
    return row[0]


def shrink(path: Path) -> None:
    """A palette PNG (a UI screenshot has few colours): a fraction of the bytes, same look."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


def shoot(db: Path, lib: Path, out: Path, home: Path) -> list[Path]:
    from fakes.browser import add_sparse, launch_browser, start_server
    from playwright.sync_api import sync_playwright

    import ckptlab

    big = lib / "a1111" / "models" / "Stable-diffusion" / "sdxl-big-sparse.safetensors"
    lora = file_id(db, "sd15_style_lora.safetensors")
    added = not big.exists()
    out.mkdir(parents=True, exist_ok=True)
    shots = []
    server = start_server(db, home)
    try:
        with sync_playwright() as p:
            browser = launch_browser(p)
            page = browser.new_page(viewport=VIEWPORT, color_scheme="light")
            page.goto(server.url + "/?density=compact")
            page.wait_for_load_state("networkidle")
            shots.append(out / "web-library.png")
            page.screenshot(path=shots[-1])

            page.goto(f"{server.url}/model/{lora}")
            page.wait_for_load_state("networkidle")
            shots.append(out / "web-model.png")
            page.screenshot(path=shots[-1])

            # a running job: a precision change of a big sparse checkpoint added now (cancelled once
            # photographed, which removes its partial output; the file goes too)
            if added:
                add_sparse(lib, big.stem, "sdxl_checkpoint")
            ckptlab.scan(big, db=db)
            job_file = file_id(db, big.name)
            page.goto(f"{server.url}/model/{job_file}")
            page.locator("a.job-link[href*='/jobs/new/precision']").first.click()
            page.locator("#job-form [name=to]").select_option("bf16")
            page.locator("#job-form button[type=submit]").click()
            page.wait_for_url("**/jobs/*")
            running = "() => document.querySelector('#job-status').textContent.trim() === 'running'"
            page.wait_for_function(running, timeout=120_000)
            try:  # some of the bar filled, when the job reports a total
                page.wait_for_function("() => { const p = document.querySelector('#job-progress');"
                                       " return p && p.max > 1 && p.value / p.max > 0.15; }", timeout=20_000)
            except Exception:
                pass
            if not page.evaluate(running):
                raise SystemExit("the job ended before its screenshot")
            shots.append(out / "web-job.png")
            page.screenshot(path=shots[-1])
            cancel = page.locator("button#cancel")
            if cancel.count():
                cancel.click()
                page.wait_for_function("() => document.querySelector('#job-status').textContent.trim()"
                                       " !== 'running'", timeout=60_000)
            browser.close()
    finally:
        server.stop()
        if added and big.exists():
            big.unlink()
            ckptlab.scan(lib, db=db)  # the catalog forgets it again
    for s in shots:
        shrink(s)
    return shots


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", type=Path, help="a sample library with its catalog.db (default: build one)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="ckptlab-shots-"))
    try:
        lib = args.lib.resolve() if args.lib else tmp / "sample-library"
        if not args.lib:
            build(lib)
        for s in shoot(lib / "catalog.db", lib, args.out, tmp / "home"):
            print(f"{s} ({s.stat().st_size // 1024} KiB)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
