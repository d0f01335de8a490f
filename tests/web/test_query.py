"""The library page's query (``web.query.search`` / ``facets`` over ``web.index``) against an independent oracle:
plain Python over the records ``library.show.list_files`` returns (the ``ckptlab ls`` pass) for a catalog with
varied rows - the sample library (A1111 + ComfyUI copies: duplicates), CivitAI links and records stored through
``hub.store`` (one with a newer version upstream, one whose family is only known from CivitAI's base model), trigger
words, sidecars (a Civitai Helper ``.civitai.info``, a LoRA Manager ``.metadata.json`` with tags, a preview), unsafe
and never-checked verdicts, and file names full of FTS operators, quotes and non-ASCII letters."""

from __future__ import annotations

import json
import os
import re
import shutil
import unicodedata
from pathlib import Path

import pytest

import ckptlab
from ckptlab.hub import store
from ckptlab.hub.link import link_lookup
from ckptlab.library.catalog import Catalog
from ckptlab.library.show import base_model_family, list_files, trigger_sources
from ckptlab.web.query import Filters, facets, search

#: the names UIs use for the families in the sample library (written down here, not read from the code)
FAMILY_UI = {"sd1": "SD 1.5", "sd2": "SD 2.1", "sdxl": "SDXL 1.0", "flux": "Flux.1 D", "esrgan": "esrgan"}
ODD_NAMES = ('NEAR(style) OR "quoted" lora.safetensors', "Élan vital ★ 猫 AND-x*.safetensors",
             "x'y^z:{names} - NOT.safetensors")


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture(scope="module")
def varied(sample_library, tmp_path_factory) -> Path:
    """A private copy of the sample library with odd names and sidecars, scanned, then linked / judged through
    the catalog's and the hub's own APIs. Returns the library folder (catalog at ``catalog.db``)."""
    lib = tmp_path_factory.mktemp("web-query") / "lib"
    shutil.copytree(sample_library, lib, symlinks=True)
    for f in lib.glob("catalog.db*"):
        f.unlink()
    lora = lib / "a1111" / "models" / "Lora"
    for name in ODD_NAMES:
        shutil.copyfile(lora / "sd15_style_lora.safetensors", lora / name)
    _write_json(lora / "sdxl_detail_lora.civitai.info",
                {"id": 901, "modelId": 90, "name": "v2 sidecar", "baseModel": "SDXL 1.0",
                 "trainedWords": ["sidecarword"], "model": {"name": "Sidecar Detail Model", "type": "LORA"},
                 "files": []})
    _write_json(lora / "flux_style_lora.metadata.json",
                {"model_name": "Flux Metadata Style", "base_model": "Flux.1 D", "tags": ["Sidecartag", "anime"]})
    (lora / "sd15_loha.preview.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    db = lib / "catalog.db"
    ckptlab.scan(lib, db=db, hash=True)
    with Catalog(db) as cat:
        by_name = {}
        for r in cat.files():
            by_name.setdefault(r.name, []).append(r)
        style = by_name["sd15_style_lora.safetensors"][0]
        store.store_record(cat, "model", 11, {"id": 11, "name": "Détail Tweaker «XL»", "type": "LORA",
                                              "tags": ["Style", "anime"],
                                              "modelVersions": [{"id": 102, "name": "v2"}, {"id": 101, "name": "v1"}]})
        store.store_record(cat, "version", 101, {"id": 101, "modelId": 11, "name": "v1.0", "baseModel": "SD 1.5",
                                                 "trainedWords": ["stylword", "Ghibli style"],
                                                 "model": {"name": "Détail Tweaker «XL»", "type": "LORA"}})
        store.put_link(cat, style.sha256, 101, 11, matched_by="sha256")
        peft = by_name["pytorch_lora_weights.safetensors"][0]  # no family from its keys: CivitAI says Pony
        store.store_record(cat, "model", 21, {"id": 21, "name": "Pony Character", "type": "LORA", "tags": ["character"],
                                              "modelVersions": [{"id": 201, "name": "v1"}]})
        store.store_record(cat, "version", 201, {"id": 201, "modelId": 21, "name": "v1", "baseModel": "Pony",
                                                 "trainedWords": ["ponyword"], "model": {"name": "Pony Character"}})
        store.put_link(cat, peft.sha256, 201, 21, matched_by="autov3")
        ckpt = by_name["v1-5-pruned.ckpt"][0]  # a version record without its model record
        store.store_record(cat, "version", 301, {"id": 301, "modelId": 31, "name": "pruned",
                                                 "baseModel": "SD 1.5", "model": {"name": "Stable Diffusion v1-5"}})
        store.put_link(cat, ckpt.sha256, 301, 31, matched_by="sha256")
        with cat.transaction() as c:  # verdicts and trigger words as `check` and `scan` store them
            c.execute("UPDATE files SET safety = 'malicious' WHERE id = ?", (by_name["anime_hypernet.pt"][0].id,))
            c.execute("UPDATE files SET safety = 'suspicious' WHERE id = ?", (by_name["bad-hands.pt"][0].id,))
            c.execute("UPDATE files SET safety = NULL WHERE id = ?", (by_name["RRDB_ESRGAN_x4.pth"][0].id,))
            c.execute("UPDATE files SET safety = 'corrupt' WHERE id = ?", (by_name["clip_l.safetensors"][0].id,))
            c.execute("UPDATE files SET triggers = ? WHERE id = ?",
                      (json.dumps([{"word": "zxqtrigger", "count": 3, "sources": ["tag frequency"]}]),
                       by_name["sd15_locon.safetensors"][0].id))
    return lib


# -- the oracle ------------------------------------------------------------------------------------------------
def fold(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", text.casefold()) if not unicodedata.combining(c))


def words(text: str) -> list[str]:
    return [t for w in re.findall(r"\w+", fold(text)) for t in w.split("_") if t]


def oracle_precision(dtypes) -> str | None:
    if not dtypes:
        return None
    names = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "I64": "i64"}
    by: dict[str, int] = {}
    for k, n in dtypes.items():
        by[names.get(k, k.lower())] = by.get(names.get(k, k.lower()), 0) + n
    top = max(by, key=by.get)
    return top if by[top] >= 0.9 * sum(by.values()) else "mixed"


def expected(db: Path) -> list[dict]:
    """One dict per present file, every value computed from ``list_files`` records and stored hub data."""
    with Catalog(db) as cat:
        pairs = list_files(cat, civitai=link_lookup(cat))
        out = []
        shas = [r.sha256 for r, _ in pairs]
        for rec, brief in pairs:
            link = store.link_summary(cat, rec.sha256)
            model = store.latest_record(cat, "model", link["model_id"]) if link else None
            stem = os.path.splitext(rec.name)[0]
            family = rec.family or base_model_family(brief)
            tags = list((model or {}).get("tags") or [])
            sc = rec.sidecars or {}
            tags += (sc.get("metadata_json") or {}).get("tags") or []
            ids = [v["id"] for v in (model or {}).get("modelVersions") or []]
            trig = [t["word"] for t in trigger_sources(rec, link, rec.sidecars)]
            name = (brief or {}).get("model_name") or stem
            text = [rec.name, name, (brief or {}).get("model_name") or "", (brief or {}).get("version_name") or "",
                    *tags, *trig, rec.sha256 or "", (rec.hashes.autov2 if rec.hashes else "") or ""]
            files = sc.get("files") or {}
            out.append({
                "id": rec.id, "name": name, "kind": rec.kind, "family": family, "format": rec.format,
                "precision": oracle_precision(rec.dtypes), "safety": rec.safety or "unchecked", "folder": rec.folder,
                "tags": {t.casefold() for t in tags}, "linked": bool(brief and brief.get("source") == "link"),
                "dups": shas.count(rec.sha256) - 1 if rec.sha256 else 0,
                "update": bool(ids and link and ids[0] != link["version_id"] and link["version_id"] in ids),
                "preview": bool(files.get("preview") or files.get("thumb")),
                "base_model": (brief or {}).get("base_model") or FAMILY_UI.get(family, family),
                "size": rec.size or 0, "added": rec.first_seen, "words": {w for t in text for w in words(t)},
                "version_name": (brief or {}).get("version_name"),
            })
        return out


def matches_text(row: dict, q: str) -> bool:
    return all(any(w.startswith(t) for w in row["words"]) for t in words(q))


def ids_of(db: Path, f: Filters) -> list[int]:
    with Catalog(db) as cat:
        out, page = [], 1
        while True:
            p = search(cat, Filters(**{**f.__dict__, "page": page, "per_page": 30}))
            out += [c.id for c in p.cards]
            if page >= p.pages:
                assert len(out) == p.total
                return out
            page += 1


def sort_key(row: dict, sort: str):
    name = (fold(row["name"]), row["id"])
    if sort == "name":
        return name
    if sort == "family":
        label = FAMILY_UI[row["family"]] if row["family"] else None
        return ((0, fold(label)) if label else (1, ""), *name)
    return (row["size" if sort == "size" else "added"], *name)


# -- tests -----------------------------------------------------------------------------------------------------
def test_cards_carry_the_values_the_oracle_computes(varied):
    exp = {e["id"]: e for e in expected(varied / "catalog.db")}
    with Catalog(varied / "catalog.db") as cat:
        page = search(cat, Filters(per_page=240))
    assert page.total == len(exp) == len(page.cards)
    for c in page.cards:
        e = exp[c.id]
        assert (c.name, c.kind, c.family, c.format, c.precision, c.folder, c.linked, c.duplicates,
                c.update_available, c.has_preview, c.base_model, c.version_name) == (
            e["name"], e["kind"], e["family"], e["format"], e["precision"], e["folder"], e["linked"], e["dups"],
            e["update"], e["preview"], e["base_model"], e["version_name"]), c
        assert (c.safety or "unchecked") == e["safety"]
        assert {t.casefold() for t in c.tags} == e["tags"]
    cards = {c.file_name: c for c in page.cards}
    # spot checks the oracle itself relies on: the fixture made what it meant to
    assert cards["pytorch_lora_weights.safetensors"].family == "sdxl"  # from CivitAI's "Pony"
    assert cards["pytorch_lora_weights.safetensors"].base_model == "Pony"
    assert cards["sd15_style_lora.safetensors"].name == "Détail Tweaker «XL»"
    assert cards["sd15_style_lora.safetensors"].update_available
    assert cards["sdxl_detail_lora.safetensors"].name in ("Sidecar Detail Model", "sdxl_detail_lora")
    assert cards["sd15_locon.safetensors"].subtype == "LoCon" and cards["sd15_loha.safetensors"].subtype == "LoHa"
    assert any(c.has_preview for c in page.cards) and any(c.duplicates for c in page.cards)


FILTER_CASES = [
    {"kind": ("lora",)}, {"kind": ("lycoris",)}, {"kind": ("checkpoint", "vae")}, {"family": ("sdxl",)},
    {"family": ("sd1", "flux")}, {"format": ("pickle",)}, {"precision": ("bf16",)}, {"precision": ("fp16", "bf16")},
    {"safety": ("malicious",)}, {"safety": ("unchecked", "suspicious", "corrupt")}, {"folder": ("Lora",)},
    {"folder": ("loras", "checkpoints")}, {"tag": ("anime",)}, {"tag": ("Style", "character")},
    {"linked": True}, {"linked": False}, {"duplicates": True}, {"duplicates": False}, {"updates": True},
    {"updates": False}, {"kind": ("lora",), "family": ("sd1",), "duplicates": True},
    {"kind": ("lora",), "linked": True, "q": "tweak"},
]


def _want(e: dict, case: dict) -> bool:
    kinds = {k for v in case.get("kind", ()) for k in ({"lora", "lycoris"} if v == "lora" else {v})}
    checks = [
        not kinds or e["kind"] in kinds,
        not case.get("family") or e["family"] in case["family"],
        not case.get("format") or e["format"] in case["format"],
        not case.get("precision") or e["precision"] in case["precision"],
        not case.get("safety") or e["safety"] in case["safety"],
        not case.get("folder") or e["folder"] in case["folder"],
        not case.get("tag") or bool(e["tags"] & {t.casefold() for t in case["tag"]}),
        case.get("linked") is None or e["linked"] == case["linked"],
        case.get("duplicates") is None or (e["dups"] > 0) == case["duplicates"],
        case.get("updates") is None or e["update"] == case["updates"],
        not case.get("q") or matches_text(e, case["q"]),
    ]
    return all(checks)


@pytest.mark.parametrize("case", FILTER_CASES, ids=lambda c: "&".join(f"{k}={v}" for k, v in c.items()))
def test_every_filter_matches_the_oracle(varied, case):
    exp = expected(varied / "catalog.db")
    want = sorted((e for e in exp if _want(e, case)), key=lambda e: sort_key(e, "name"))
    got = ids_of(varied / "catalog.db", Filters(**case))
    assert got == [e["id"] for e in want]
    assert got, f"the fixture has no file for {case}: the case proves nothing"


@pytest.mark.parametrize("q", ["tweak", "detai lor", "sd15", "SD15_STYLE", "elan", "ÉLAN", "猫", "near", "quoted",
                               "stylword", "ghibli sty", "zxqtrigger", "sidecarw", "ponyw", "sidecartag", "anime",
                               "character", "safetensors", "v1 5 pruned", "nothing-like-this"])
def test_search_matches_word_prefixes_like_the_oracle(varied, q):
    exp = expected(varied / "catalog.db")
    want = [e["id"] for e in sorted(exp, key=lambda e: sort_key(e, "name")) if matches_text(e, q)]
    assert ids_of(varied / "catalog.db", Filters(q=q)) == want
    if q != "nothing-like-this":
        assert want, f"{q!r} matches nothing in the fixture: the case proves nothing"


def test_search_finds_a_file_by_hash_prefix(varied):
    exp = expected(varied / "catalog.db")
    with Catalog(varied / "catalog.db") as cat:
        rec = cat.files()[0]
        got = {c.id for c in search(cat, Filters(q=rec.sha256[:12].lower(), per_page=240)).cards}
    assert got == {e["id"] for e in exp if any(w.startswith(rec.sha256[:12].lower()) for w in e["words"])}
    assert rec.id in got


@pytest.mark.parametrize("sort", ["name", "size", "added", "family"])
@pytest.mark.parametrize("desc", [False, True])
def test_sorts_and_paging_match_the_oracle(varied, sort, desc):
    exp = expected(varied / "catalog.db")
    want = [e["id"] for e in sorted(exp, key=lambda e: sort_key(e, sort), reverse=desc)]
    assert ids_of(varied / "catalog.db", Filters(sort=sort, desc=desc)) == want
    with Catalog(varied / "catalog.db") as cat:
        page2 = search(cat, Filters(sort=sort, desc=desc, page=2, per_page=30))
        beyond = search(cat, Filters(sort=sort, desc=desc, page=99, per_page=30))
    assert [c.id for c in page2.cards] == want[30:60]
    assert page2.total == len(want) and page2.pages == -(-len(want) // 30)
    assert beyond.cards == [] and beyond.total == len(want)


def test_facets_list_present_values_with_ui_labels_and_the_counts_a_filter_gives(varied):
    exp = expected(varied / "catalog.db")
    with Catalog(varied / "catalog.db") as cat:
        fac = facets(cat)
    fam = {v: (label, n) for v, label, n in fac["family"]}
    assert fam["sd1"][0] == "SD 1.5" and fam["sdxl"][0] == "SDXL 1.0"
    for name in ("kind", "family", "format", "precision", "safety", "folder", "tag"):
        assert fac[name], name
        for value, _label, n in fac[name]:
            assert n == sum(_want(e, {name: (value,)}) for e in exp), (name, value)
    for name in ("linked", "duplicates", "updates"):
        got = {v: n for v, _label, n in fac[name]}
        assert got == {"yes": sum(_want(e, {name: True}) for e in exp), "no": sum(_want(e, {name: False}) for e in exp)}
    assert {v for v, _, _ in fac["safety"]} == {e["safety"] for e in exp}


@pytest.mark.parametrize("q", ['"', '""', "'", "*", "**lora", "lora*", "NEAR(a b)", "a OR b", "NOT x", "AND",
                               "names:lora", "{names}: x", "^sd", "(", ")", "-x", "+", "a\x00b", "\\", "%", "_",
                               "x" * 5000, " ".join(["lora"] * 300), "é" * 199, "🙂", "\u202e"])
def test_bad_search_text_never_raises(varied, q):
    from starlette.datastructures import QueryParams

    exp = expected(varied / "catalog.db")
    f = Filters.from_query(QueryParams({"q": q}))
    with Catalog(varied / "catalog.db") as cat:
        page = search(cat, f)
    expected_total = len(exp) if not words(f.q) else sum(matches_text(e, f.q) for e in exp)
    assert page.total == expected_total


def test_unknown_filter_values_find_nothing_rather_than_fail(varied):
    with Catalog(varied / "catalog.db") as cat:
        for f in (Filters(kind=("nope",)), Filters(family=("'; DROP TABLE files; --",)), Filters(tag=("x" * 999,)),
                  Filters(folder=('"',))):
            assert search(cat, f).total == 0
        assert search(cat, Filters()).total > 0  # and nothing was dropped


def test_a_catalog_made_without_the_web_app_is_indexed_on_first_use(sample_library, tmp_path, cli):
    """`ckptlab scan` (a process that never imports ckptlab.web) makes the catalog; the first search indexes it."""
    lib = tmp_path / "lib"
    shutil.copytree(sample_library / "a1111", lib)
    db = tmp_path / "fresh.db"
    r = cli("scan", str(lib), "--db", str(db))
    assert r.returncode == 0, r.stderr
    with Catalog(db) as cat:
        want = sorted(rec.id for rec in cat.files())
        assert sorted(c.id for c in search(cat, Filters(per_page=240)).cards) == want
