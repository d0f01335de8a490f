"""The model page ``/model/{id}``: each section against an independent oracle (hashlib over the file's bytes, the
catalog's rows read with plain SQL, the metadata written into the header with the ``safetensors`` library, the
copies the test made, the inputs a transform was given), the DOM contract, escaping, 404 and missing files."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from fakes.sample_files import make_model
from fakes.web import make_client
from safetensors.numpy import load_file, save_file

import ckptlab


# -- a small DOM (no bs4 in the environment) ----------------------------------------------------------------
class Node:
    def __init__(self, tag, attrs, parent=None):
        self.tag, self.attrs, self.parent, self.children = tag, dict(attrs), parent, []

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def all(self, tag=None, id=None, cls=None, attr=None):
        for c in self.children:
            if isinstance(c, Node):
                if ((tag is None or c.tag == tag) and (id is None or c.attrs.get("id") == id)
                        and (cls is None or cls in c.classes()) and (attr is None or attr in c.attrs)):
                    yield c
                yield from c.all(tag, id, cls, attr)

    def one(self, **kw) -> Node:
        found = list(self.all(**kw))
        assert len(found) == 1, (kw, len(found))
        return found[0]


_VOID = {"meta", "link", "img", "input", "br", "hr"}


class _Parser(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.cur = Node("#root", {})

    def handle_starttag(self, tag, attrs):
        n = Node(tag, attrs, self.cur)
        self.cur.children.append(n)
        if tag not in _VOID:
            self.cur = n

    def handle_endtag(self, tag):
        n = self.cur
        while n is not None and n.tag != tag:
            n = n.parent
        if n is not None and n.parent is not None:
            self.cur = n.parent

    def handle_data(self, data):
        self.cur.children.append(data)


def dom(html: str) -> Node:
    p = _Parser()
    p.feed(html)
    return p.root


# -- helpers --------------------------------------------------------------------------------------------------
def _id_of(db: Path, path: Path) -> int:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT id FROM files WHERE display = ?", (str(path),)).fetchone()[0]
    finally:
        con.close()


def _get(client, fid: int) -> Node:
    r = client.get(f"/model/{fid}")
    assert r.status_code == 200, r.text[:500]
    return dom(r.text)


def _hashes(doc: Node) -> dict[str, str]:
    dl = doc.one(tag="dl", id="hashes")
    names = [dt.text.strip() for dt in dl.all(tag="dt")]
    values = [dd.one(tag="code").text.strip() for dd in dl.all(tag="dd")]
    copies = [dd.one(tag="button", attr="data-copy").attrs["data-copy"] for dd in dl.all(tag="dd")]
    assert values == copies
    return dict(zip(names, values, strict=True))


def _job_links(doc: Node) -> dict[str, dict]:
    out = {}
    for a in doc.all(tag="a", cls="job-link"):
        u = urlsplit(a.attrs["href"])
        assert u.path.startswith("/jobs/new/")
        out[u.path.removeprefix("/jobs/new/")] = {k: v[0] for k, v in parse_qs(u.query).items()}
    return out


def _lib(tmp_path: Path, files: dict[str, tuple], *, hash=True, fingerprint=False) -> tuple[Path, dict[str, Path]]:
    """A scanned private library: ``files`` maps a file name to ``make_model`` arguments."""
    lib = tmp_path / "lib"
    lib.mkdir(exist_ok=True)
    paths = {}
    for name, (spec, kw) in files.items():
        paths[name] = make_model(lib / name, spec, **kw)
    ckptlab.scan(lib, db=tmp_path / "c.db", hash=hash, fingerprint=fingerprint)
    return tmp_path / "c.db", paths


# -- the sample library ---------------------------------------------------------------------------------------
def test_every_sample_file_renders_with_the_contract_sections(client, sample_library):
    con = sqlite3.connect(sample_library / "catalog.db")
    ids = [r[0] for r in con.execute("SELECT id FROM files")]
    for fid in ids:
        doc = _get(client, fid)
        assert doc.one(tag="h1", cls="model-name").text.strip()
        for sid in ("identification", "metadata", "civitai", "sidecars", "duplicates", "lineage", "images"):
            doc.one(tag="section", id=sid)
        doc.one(tag="dl", id="hashes")


def test_hashes_equal_hashlib_and_the_catalog(client, sample_library):
    con = sqlite3.connect(sample_library / "catalog.db")
    path, fid = con.execute("SELECT display, id FROM files WHERE name = 'sd15_style_lora.safetensors' "
                            "ORDER BY id LIMIT 1").fetchone()
    row = con.execute("SELECT c.sha256, c.autov1, c.autov2, c.autov3, c.crc32, c.blake3 FROM files f JOIN content c "
                      "USING (dev, ino, size, mtime_ns) WHERE f.id = ?", (fid,)).fetchone()
    got = _hashes(_get(client, fid))
    assert got["SHA256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest().upper()
    assert got == dict(zip(("SHA256", "AutoV1", "AutoV2", "AutoV3", "CRC32", "BLAKE3"),
                           (v.upper() for v in row), strict=True))


def test_lora_syntax_uses_the_file_stem_and_embeddings_their_name(client, sample_library):
    con = sqlite3.connect(sample_library / "catalog.db")
    for fid, name, kind in con.execute("SELECT id, name, kind FROM files WHERE kind IN ('lora', 'lycoris', "
                                       "'embedding', 'checkpoint')"):
        doc = _get(client, fid)
        stem = name.rsplit(".", 1)[0]
        if kind in ("lora", "lycoris"):
            code = doc.one(id="lora-syntax")
            assert code.text == f"<lora:{stem}:1>"
            assert any(b.attrs["data-copy"] == f"<lora:{stem}:1>" for b in doc.all(tag="button", attr="data-copy"))
        else:
            assert not list(doc.all(id="lora-syntax"))
        if kind == "embedding":
            assert doc.one(id="embedding-name").text == stem


def test_identification_shows_what_inspect_says(client, sample_library):
    """The oracle is ``ckptlab inspect --json`` run on the file (the CLI's own output for the same question)."""
    import os
    import subprocess
    import sys

    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    con = sqlite3.connect(sample_library / "catalog.db")
    for name in ("v2-1_768-ema-pruned.safetensors", "sd15_locon.safetensors", "v1-5-pruned.ckpt"):
        fid, path = con.execute("SELECT id, display FROM files WHERE name = ? ORDER BY id LIMIT 1", (name,)).fetchone()
        r = subprocess.run([sys.executable, "-m", "ckptlab", "inspect", "--json", path], capture_output=True,
                           text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        want = json.loads(r.stdout.splitlines()[0])
        ident = _get(client, fid).one(tag="section", id="identification")
        field = {dd.attrs["data-field"]: dd.text for dd in ident.all(tag="dd", attr="data-field")}
        assert field["kind"].strip() == want["kind"]
        assert f"({want['family']})" in field["family"]
        if want["prediction"]:
            assert field["prediction"].strip() == want["prediction"]
        assert field["ema"].startswith("yes" if want["has_ema"] else "no")
        assert ident.one(tag="dd", cls=None, attr="title").attrs["title"] == f"{want['params']:,}"
        assert [li.text for li in ident.one(tag="ul", cls="evidence").all(tag="li")] == want["evidence"]
        assert [li.text.strip() for li in ident.one(tag="ul", cls="components").all(tag="li")] == want["components"] \
            if want["components"] else True
        if want["vram"]:
            assert f"~{want['vram']['gib']:.2f} GiB" in field["vram"]


def test_unknown_id_is_a_404_page(client):
    for bad in ("999999", "abc", "-1", "1e9"):
        r = client.get(f"/model/{bad}")
        assert r.status_code == 404
        assert "not in the catalog" in r.text or "no file with id" in r.text
        assert "Traceback" not in r.text


def test_job_links_fit_the_kind(client, sample_library):
    con = sqlite3.connect(sample_library / "catalog.db")

    def links(name):
        fid, path = con.execute("SELECT id, display FROM files WHERE name = ? ORDER BY id LIMIT 1", (name,)).fetchone()
        return _job_links(_get(client, fid)), path

    got, path = links("v1-5-pruned.ckpt")
    assert {"hash", "check", "convert", "prune", "precision", "extract", "merge", "lora-bake", "generate"} <= set(got)
    assert all(v == {"path": path} for v in got.values())
    got, path = links("sd15_style_lora.safetensors")
    assert got["lora-bake"] == {"lora": path}
    assert "convert" not in got and "generate" not in got and "merge" not in got
    got, path = links("sd_xl_base_1.0.safetensors")
    assert "convert" not in got and got["merge"] == {"path": path}


# -- private libraries ------------------------------------------------------------------------------------------
def test_not_hashed_offers_a_hash_job(tmp_path):
    db, paths = _lib(tmp_path, {"m.safetensors": ("sd1_kohya_lora", {})}, hash=False)
    with make_client(db) as c:
        doc = _get(c, _id_of(db, paths["m.safetensors"]))
    assert list(doc.one(tag="dl", id="hashes").all(tag="dd")) == []
    link = doc.one(tag="p", cls="not-hashed").one(tag="a", cls="job-link")
    u = urlsplit(link.attrs["href"])
    assert u.path == "/jobs/new/hash" and parse_qs(u.query) == {"path": [str(paths["m.safetensors"])]}


def test_metadata_values_are_what_the_header_holds(tmp_path):
    """ModelSpec, kohya training keys and the tag-frequency trigger suggestion, written with the safetensors
    library; the page must show exactly those values."""
    src = make_model(tmp_path / "src.safetensors", "sd1_kohya_lora")
    lib = tmp_path / "lib"
    lib.mkdir()
    tags = {"10_zkx": {"zkx woman": 40, "smile": 12, "outdoors": 3}}
    md = {"modelspec.title": "Zkx Style", "modelspec.architecture": "stable-diffusion-v1/lora",
          "modelspec.author": "someone", "ss_network_module": "networks.lora", "ss_network_dim": "8",
          "ss_network_alpha": "4.0", "ss_learning_rate": "0.0001", "ss_num_epochs": "10",
          "ss_output_name": "zkxstyle", "ss_tag_frequency": json.dumps(tags), "custom_key": "custom value"}
    save_file(load_file(str(src)), str(lib / "zkx.safetensors"), metadata=md)
    ckptlab.scan(lib, db=tmp_path / "c.db", hash=True)
    with make_client(tmp_path / "c.db") as c:
        doc = _get(c, _id_of(tmp_path / "c.db", lib / "zkx.safetensors"))
    sec = doc.one(tag="section", id="metadata")

    def kv(cls):
        dl = sec.one(tag="dl", cls=cls)
        return dict(zip((dt.text for dt in dl.all(tag="dt")), (dd.text for dd in dl.all(tag="dd")), strict=True))

    assert kv("modelspec") == {k: v for k, v in md.items() if k.startswith("modelspec.")}
    training = kv("training")
    for k in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_learning_rate", "ss_num_epochs",
              "ss_output_name"):
        assert training[k] == md[k]
    words = [li.one(tag="code").text for li in sec.one(tag="ul", cls="triggers").all(tag="li")]
    # lora.info's rule: (no ss_dataset_dirs) the output name, then the tags, most frequent first
    assert words == ["zkxstyle", "zkx woman", "smile", "outdoors"]
    other = sec.one(tag="details", cls="other-metadata")
    assert "custom value" in other.text and "custom_key" in other.text


def test_duplicates_and_same_weights_and_same_component(tmp_path):
    """Copies made by the test (same bytes), an fp16 copy made by ``precision`` (same weights) and the VAE
    extracted from the checkpoint (same component)."""
    lib = tmp_path / "lib"
    lib.mkdir()
    a = make_model(lib / "a.safetensors", "sd1_checkpoint", dtype="F32")
    c1, c2 = lib / "copy1.safetensors", lib / "sub" / "copy2.safetensors"
    c2.parent.mkdir()
    shutil.copyfile(a, c1)
    shutil.copyfile(a, c2)
    half = Path(ckptlab.precision(a, "fp16", out_dir=lib / "half")[0].output)
    vae = Path(ckptlab.extract(a, "vae", out_dir=lib / "vae")[0].output)
    other = make_model(lib / "other.safetensors", "sd1_checkpoint", seed=9)
    db = tmp_path / "c.db"
    ckptlab.scan(lib, db=db, hash=True, fingerprint=True)
    with make_client(db) as c:
        doc = _get(c, _id_of(db, a))
    sec = doc.one(tag="section", id="duplicates")
    same = [li.one(tag="a").text for li in sec.one(tag="ul", cls="same-bytes").all(tag="li")]
    assert sorted(same) == sorted([str(c1), str(c2)])
    weights = [li.one(tag="a").text for li in sec.one(tag="ul", cls="same-weights").all(tag="li")]
    assert weights == [str(half)]
    comps = {ul.attrs["data-component"]: [li.one(tag="a").text for li in ul.all(tag="li")]
             for ul in sec.all(tag="ul", cls="same-component")}
    assert comps.get("vae") == [str(vae)]
    assert str(other) not in sec.text


def test_lineage_section_links_inputs_and_outputs(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    a = make_model(lib / "a.safetensors", "sd1_checkpoint", ema=True)
    pruned = Path(ckptlab.prune(a, out_dir=lib / "out")[0].output)
    db = tmp_path / "c.db"
    ckptlab.scan(lib, db=db, hash=True)
    ida, idp = _id_of(db, a), _id_of(db, pruned)
    with make_client(db) as c:
        out = _get(c, idp).one(tag="section", id="lineage")
        back = _get(c, ida).one(tag="section", id="lineage")
    li = out.one(tag="ul", cls="made-from").one(tag="li")
    assert li.attrs["data-relation"] == "prune" and li.one(tag="a").attrs["href"] == f"/model/{ida}"
    li = back.one(tag="ul", cls="made-into").one(tag="li")
    assert li.attrs["data-relation"] == "prune" and li.one(tag="a").attrs["href"] == f"/model/{idp}"


def test_missing_file_renders_with_a_banner(tmp_path):
    db, paths = _lib(tmp_path, {"gone.safetensors": ("sd1_kohya_lora", {})})
    fid = _id_of(db, paths["gone.safetensors"])
    want = hashlib.sha256(paths["gone.safetensors"].read_bytes()).hexdigest().upper()
    paths["gone.safetensors"].unlink()
    ckptlab.scan(tmp_path / "lib", db=db)
    assert sqlite3.connect(db).execute("SELECT status FROM files WHERE id = ?", (fid,)).fetchone()[0] == "missing"
    with make_client(db) as c:
        doc = _get(c, fid)
    assert "missing" in doc.one(tag="p", cls="banner").text
    assert _hashes(doc)["SHA256"] == want  # what the catalog knew
    assert _job_links(doc) == {}  # no job can run on a file that is not there


def test_civitai_versions_local_and_update(tmp_path):
    """Stored CivitAI records: the model has versions 3 (newest), 2, 1; this file is version 2, another local
    file is version 3. The page marks version 2 as this file, 3 as newer and local, and an update available."""
    from ckptlab.hub import store
    from ckptlab.library.catalog import Catalog

    db, paths = _lib(tmp_path, {"v2.safetensors": ("sd1_kohya_lora", {"seed": 2}),
                                "v3.safetensors": ("sd1_kohya_lora", {"seed": 3})})
    sha = {k: hashlib.sha256(p.read_bytes()).hexdigest().upper() for k, p in paths.items()}
    versions = [{"id": 30, "name": "v3 <b>new</b>", "baseModel": "SD 1.5",
                 "files": [{"hashes": {"SHA256": sha["v3.safetensors"]}}]},
                {"id": 20, "name": "v2", "baseModel": "SD 1.5", "files": [{"hashes": {"SHA256": sha["v2.safetensors"]}}]},
                {"id": 10, "name": "v1", "baseModel": "SD 1.5", "files": [{"hashes": {"SHA256": "0" * 64}}]}]
    with store.open_catalog(db) as cat:
        store.store_record(cat, "model", 7, {"id": 7, "name": "Zkx <script>alert(1)</script>", "type": "LORA",
                                             "modelVersions": versions, "description":
                                             "<p>Use <b>zkx</b> &amp; friends</p><script>alert(3)</script>"
                                             "<img src=x onerror=alert(4)>"})
        store.store_record(cat, "version", 20, {**versions[1], "modelId": 7, "trainedWords": ["zkx"]})
        store.put_link(cat, sha["v2.safetensors"], 20, 7, matched_by="sha256")
    with Catalog(db):
        pass
    with make_client(db) as c:
        r = c.get(f"/model/{_id_of(db, paths['v2.safetensors'])}")
    assert "<script>alert(1)" not in r.text and "<b>new" not in r.text
    doc = dom(r.text)
    assert doc.one(tag="h1", cls="model-name").text == "Zkx <script>alert(1)</script>"
    sec = doc.one(tag="section", id="civitai")
    rows = {tr.attrs["data-version-id"]: tr for tr in sec.all(tag="tr", attr="data-version-id")}
    assert list(rows) == ["30", "20", "10"]
    assert "linked" in rows["20"].classes() and "newer" in rows["30"].classes() and "newer" not in rows["10"].classes()
    assert [a.attrs["href"] for a in rows["30"].all(tag="a", cls="local")] == \
        [f"/model/{_id_of(db, paths['v3.safetensors'])}"]
    assert "not local" in rows["10"].text
    assert sec.one(tag="p", cls="update-available").one(tag="strong").text == "v3 <b>new</b>"
    assert list(doc.all(tag="span", cls="update"))
    desc = sec.one(tag="details", cls="civitai-description").one(tag="div").text
    assert desc == "Use zkx & friends"  # the description's text; its HTML never rendered, its script dropped
    assert "alert(3)" not in r.text and "onerror" not in r.text


def test_sidecars_and_preview(tmp_path):
    db, paths = _lib(tmp_path, {"side.safetensors": ("sd1_kohya_lora", {})})
    folder = paths["side.safetensors"].parent
    info = {"id": 55, "modelId": 5, "name": "v1 <img src=x onerror=alert(1)>", "baseModel": "SD 1.5",
            "model": {"name": "Side Model", "type": "LORA"}, "trainedWords": ["sidetok"]}
    (folder / "side.civitai.info").write_text(json.dumps(info))
    (folder / "side.preview.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    ckptlab.scan(folder, db=db, hash=True)  # the catalog learns the preview: /media/preview/ID serves what it names
    with make_client(db) as c:
        r = c.get(f"/model/{_id_of(db, paths['side.safetensors'])}")
        assert c.get(f"/media/preview/{_id_of(db, paths['side.safetensors'])}").status_code == 200
    assert "<img src=x" not in r.text
    doc = dom(r.text)
    sec = doc.one(tag="section", id="sidecars")
    names = [li.one(tag="code").text for li in sec.one(tag="ul", cls="sidecar-files").all(tag="li")]
    assert sorted(names) == ["side.civitai.info", "side.preview.png"]
    assert "Side Model" in sec.text and "v1 <img src=x onerror=alert(1)>" in sec.text
    fid = _id_of(db, paths["side.safetensors"])
    assert doc.one(tag="img", cls="model-preview").attrs["src"] == f"/media/preview/{fid}"
    words = [li.one(tag="code").text for li in doc.one(tag="section", id="metadata").one(
        tag="ul", cls="triggers").all(tag="li")]
    assert "sidetok" in words


def test_images_made_with_it(tmp_path):
    from ckptlab.library import image_links
    from ckptlab.library.catalog import Catalog

    db, paths = _lib(tmp_path, {"m.safetensors": ("sd1_kohya_lora", {})})
    sha = hashlib.sha256(paths["m.safetensors"].read_bytes()).hexdigest().upper()
    imgs = [tmp_path / f"img{i}.png" for i in range(3)]
    with Catalog(db) as cat:
        image_links.record(cat, [(p, [(sha, "lora", "autov3")]) for p in imgs])
    with make_client(db) as c:
        sec = _get(c, _id_of(db, paths["m.safetensors"])).one(tag="section", id="images")
    assert sorted(li.text for li in sec.one(tag="ul", cls="image-paths").all(tag="li")) == sorted(map(str, imgs))


def test_hostile_names_and_metadata_are_escaped(tmp_path):
    src = make_model(tmp_path / "src.safetensors", "sd1_kohya_lora")
    lib = tmp_path / "lib"
    lib.mkdir()
    name = "<script>alert(1)<\u2044script>x"
    evil = '"><script>alert(2)</script>'
    save_file(load_file(str(src)), str(lib / f"{name}.safetensors"),
              metadata={"modelspec.title": evil, "ss_output_name": evil, evil: evil,
                        "ss_tag_frequency": json.dumps({"1_x": {evil: 3}})})
    ckptlab.scan(lib, db=tmp_path / "c.db", hash=True)
    with make_client(tmp_path / "c.db") as c:
        r = c.get(f"/model/{_id_of(tmp_path / 'c.db', lib / f'{name}.safetensors')}")
    assert r.status_code == 200
    assert "<script>alert" not in r.text
    doc = dom(r.text)
    assert doc.one(tag="h1", cls="model-name").text == name
    assert doc.one(id="lora-syntax").text == f"<lora:{name}:1>"
    assert evil in doc.one(tag="section", id="metadata").text
    assert not list(doc.all(tag="script", attr="src")) or all(
        s.attrs["src"].startswith("/static/") for s in doc.all(tag="script"))


@pytest.mark.parametrize("n", [3])
def test_made_into_lists_several_outputs(tmp_path, n):
    lib = tmp_path / "lib"
    lib.mkdir()
    a = make_model(lib / "a.safetensors", "sd1_checkpoint", dtype="F32", ema=True)
    outs = [Path(ckptlab.precision(a, p, out_dir=lib / p)[0].output) for p in ("fp16", "bf16")]
    outs.append(Path(ckptlab.prune(a, out_dir=lib / "pr")[0].output))
    db = tmp_path / "c.db"
    ckptlab.scan(lib, db=db, hash=True)
    with make_client(db) as c:
        sec = _get(c, _id_of(db, a)).one(tag="section", id="lineage")
    got = sorted(li.one(tag="a").text for li in sec.one(tag="ul", cls="made-into").all(tag="li"))
    assert len(got) == n and got == sorted(map(str, outs))


def test_an_unreadable_file_renders_its_error(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    bad = lib / "broken.safetensors"
    bad.write_bytes((10**6).to_bytes(8, "little") + b'{"a": ')  # header length past the end of the file
    ckptlab.scan(lib, db=tmp_path / "c.db", hash=True)
    err = sqlite3.connect(tmp_path / "c.db").execute("SELECT error FROM files").fetchone()[0]
    assert err
    with make_client(tmp_path / "c.db") as c:
        doc = _get(c, _id_of(tmp_path / "c.db", bad))
    assert err in doc.one(tag="section", id="identification").text
