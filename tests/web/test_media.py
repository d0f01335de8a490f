"""``GET /media/preview/{file_id}``: serves the preview image the catalog names for a file (the ``previews`` table
or the scanner's sidecar preview) and nothing else: no path from the URL, no traversal, no non-image, no
symlink out of the folder, no vanished file, no FIFO."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import struct
import zlib
from pathlib import Path

import pytest
from fakes.web import make_client

from ckptlab.library.catalog import Catalog

JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + bytes(64) + b"\xff\xd9"


def png_bytes(seed: int = 0) -> bytes:
    """A valid 1x1 PNG (built by hand), its pixel from ``seed`` so two previews differ."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes([0, seed % 256, 0, 0]))) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def shared_copy(sample_library, tmp_path_factory) -> Path:
    """One private copy of the sample library for this module's tests that only edit catalog rows (each resets
    the LoRA's preview entries first), with the hostile files beside its LoRA made once."""
    import ckptlab

    lib = tmp_path_factory.mktemp("media") / "lib"
    shutil.copytree(sample_library, lib, symlinks=True)
    for old in lib.glob("catalog.db*"):
        old.unlink()
    ckptlab.scan(lib, db=lib / "catalog.db")
    folder = Path(_lora(lib / "catalog.db").path).parent
    (folder / "notes.txt").write_text("root:x:0:0:secret\n")
    (folder / "fake.png").write_text("root:x:0:0:not an image\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "x.png").write_bytes(png_bytes())
    os.mkfifo(folder / "fifo.png")
    return lib


@pytest.fixture
def lib(shared_copy) -> Path:
    db = shared_copy / "catalog.db"
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE files SET sidecars = NULL")
        conn.execute("DELETE FROM previews")
    return shared_copy


def _lora(db: Path):
    with Catalog(db) as cat:
        return next(r for r in cat.files() if r.kind == "lora")


def _set_sidecar(db: Path, fid: int, files: dict) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE files SET sidecars = ? WHERE id = ?", (json.dumps({"files": files}), fid))


def _set_recorded(db: Path, fid: int, path: str) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT OR REPLACE INTO previews(file_id, path, made) VALUES (?, ?, 0)", (fid, path))


def test_the_scanners_sidecar_preview_is_served_with_etag(library_copy):
    import ckptlab

    db = library_copy / "catalog.db"
    lora = _lora(db)
    img = Path(lora.path).with_name(Path(lora.name).stem + ".preview.png")
    img.write_bytes(png_bytes(7))
    ckptlab.scan(library_copy, db=db)
    with Catalog(db) as cat:
        assert cat.get(lora.id).sidecars["files"]["preview"] == img.name  # the oracle: what the scanner recorded
    with make_client(db) as c:
        r = c.get(f"/media/preview/{lora.id}")
        assert r.status_code == 200 and r.content == img.read_bytes()
        assert r.headers["content-type"] == "image/png"
        st = img.stat()
        assert r.headers["etag"] == f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
        assert "no-cache" in r.headers["cache-control"]
        again = c.get(f"/media/preview/{lora.id}", headers={"if-none-match": r.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
        # a replaced preview has a new ETag and new bytes
        img.write_bytes(png_bytes(200))
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        fresh = c.get(f"/media/preview/{lora.id}", headers={"if-none-match": r.headers["etag"]})
        assert fresh.status_code == 200 and fresh.content == png_bytes(200) and fresh.headers["etag"] != r.headers["etag"]


def test_a_recorded_preview_wins_and_its_type_comes_from_the_bytes(lib, tmp_path):
    from ckptlab.library.previews import record_preview

    db = lib / "catalog.db"
    lora = _lora(db)
    out = tmp_path / "renders" / "made.jpg"
    out.parent.mkdir()
    out.write_bytes(JPEG)
    with Catalog(db) as cat:
        assert record_preview(cat, lora.path, out, seed=1)
    Path(lora.path).with_name(Path(lora.name).stem + ".png").write_bytes(png_bytes())
    _set_sidecar(db, lora.id, {"preview": Path(lora.name).stem + ".png"})
    with make_client(db) as c:
        r = c.get(f"/media/preview/{lora.id}")
        assert r.status_code == 200 and r.content == JPEG and r.headers["content-type"] == "image/jpeg"
        out.unlink()  # the recorded one vanished: the sidecar is next
        r = c.get(f"/media/preview/{lora.id}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"


@pytest.mark.parametrize("url", [
    "/media/preview/../../etc/passwd",
    "/media/preview/..%2F..%2Fetc%2Fpasswd",
    "/media/preview/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/media/preview/%252e%252e%252fetc%252fpasswd",
    "/media/preview/1%2F..%2F..%2Fetc%2Fpasswd",
    "/media/preview/1/../../../etc/passwd",
    "/media/preview/..\\..\\etc\\passwd",
    "/media/preview/-1",
    "/media/preview/1.0",
    "/media/preview/%31",  # a percent-encoded digit is still only an id: fine either way, never a path
    "/media/preview/99999999",
    "/media/preview/" + "9" * 40,
    "/media/preview/%00",
    "/media/preview/",
])
def test_urls_never_name_a_path(client, url):
    r = client.get(url)
    assert b"root:" not in r.content
    if url.endswith("%31"):
        assert r.status_code in (200, 404)
    else:
        assert r.status_code == 404, url


@pytest.mark.parametrize("entry", ["/etc/passwd", "../../../../../../etc/passwd", "..", "",
                                   "sub/x.png", "..\\x.png", "notes.txt", "fake.png", "fifo.png"])
def test_a_hostile_sidecar_entry_is_refused(lib, entry):
    db = lib / "catalog.db"
    lora = _lora(db)
    _set_sidecar(db, lora.id, {"preview": entry, "thumb": entry})
    with make_client(db) as c:
        r = c.get(f"/media/preview/{lora.id}")
    assert r.status_code == 404 and b"root:" not in r.content


@pytest.mark.parametrize("target", ["/etc/passwd", "relative.png", "/tmp/does-not-exist.png"])
def test_a_hostile_recorded_preview_is_refused(lib, target):
    db = lib / "catalog.db"
    lora = _lora(db)
    _set_recorded(db, lora.id, target)
    with make_client(db) as c:
        r = c.get(f"/media/preview/{lora.id}")
    assert r.status_code == 404 and b"root:" not in r.content


def test_symlinks_out_of_the_folder_are_refused_in_it_served(lib, tmp_path):
    db = lib / "catalog.db"
    lora = _lora(db)
    folder = Path(lora.path).parent
    outside = tmp_path / "elsewhere" / "secret.png"
    outside.parent.mkdir()
    outside.write_bytes(png_bytes(1))
    (folder / "out.png").symlink_to(outside)
    (folder / "passwd.png").symlink_to("/etc/passwd")
    (folder / "real.png").write_bytes(png_bytes(2))
    (folder / "alias.png").symlink_to("real.png")
    with make_client(db) as c:
        for name in ("out.png", "passwd.png"):
            _set_sidecar(db, lora.id, {"preview": name})
            assert c.get(f"/media/preview/{lora.id}").status_code == 404, name
            _set_sidecar(db, lora.id, {})
            _set_recorded(db, lora.id, str(folder / name))
            assert c.get(f"/media/preview/{lora.id}").status_code == 404, name
            with sqlite3.connect(db) as conn:
                conn.execute("DELETE FROM previews WHERE file_id = ?", (lora.id,))
        _set_sidecar(db, lora.id, {"preview": "alias.png"})
        r = c.get(f"/media/preview/{lora.id}")
        assert r.status_code == 200 and r.content == png_bytes(2)


def test_a_vanished_preview_is_a_404_and_so_is_a_file_without_one(lib):
    db = lib / "catalog.db"
    lora = _lora(db)
    img = Path(lora.path).with_name("gone.webp")
    img.write_bytes(b"RIFF\x10\x00\x00\x00WEBPVP8 " + bytes(8))
    _set_sidecar(db, lora.id, {"preview": img.name})
    with make_client(db) as c:
        r = c.get(f"/media/preview/{lora.id}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/webp"
        img.unlink()
        assert c.get(f"/media/preview/{lora.id}").status_code == 404
        with Catalog(db) as cat:
            other = next(r for r in cat.files() if r.id != lora.id)
        assert c.get(f"/media/preview/{other.id}").status_code == 404


def test_the_card_helper_agrees_with_the_route(lib):
    from ckptlab.web.media import preview_paths

    db = lib / "catalog.db"
    lora = _lora(db)
    shutil.copyfile(lora.path, Path(lora.path).with_name("unused.bin"))
    (Path(lora.path).parent / "p.gif").write_bytes(b"GIF89a" + bytes(20))
    _set_sidecar(db, lora.id, {"preview": "p.gif"})
    with Catalog(db) as cat:
        ids = [r.id for r in cat.files()]
        got = preview_paths(cat, ids)
    assert got == {lora.id: str(Path(lora.path).parent / "p.gif")}
    with make_client(db) as c:
        served = {i for i in ids if c.get(f"/media/preview/{i}").status_code == 200}
    assert served == set(got)


def test_concurrent_requests_on_a_real_server(lib):
    """A page's previews load at once: each request must use a catalog connection of its own thread (a sqlite3
    connection used from another pool thread raises ProgrammingError: a 500 per image)."""
    import socket
    import threading
    import urllib.error
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    import uvicorn

    from ckptlab.web.app import create_app

    db = lib / "catalog.db"
    lora = _lora(db)
    Path(lora.path).with_name("many.png").write_bytes(png_bytes(3))
    _set_sidecar(db, lora.id, {"preview": "many.png"})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(db, host="127.0.0.1", port=port)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            threading.Event().wait(0.05)
        assert server.started

        def get(path: str) -> int:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
                    r.read()
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        paths = [f"/media/preview/{lora.id}", "/?per_page=30", "/?kind=vae"] * 16
        with ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(get, paths))
        assert codes == [200] * len(paths)
    finally:
        server.should_exit = True
        thread.join(10)
