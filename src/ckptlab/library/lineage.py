"""Lineage: what a catalogued file was made from, and what was made from it, as its metadata records it.

Where the records come from (all read from ``files.info["metadata"]``, the header metadata ``scan`` stored):

- **ckptlab outputs** (convert, prune, precision, extract, replace, to/from-diffusers, merge, lora-bake,
  lora-extract, lora-resize, lora-merge, lora-convert) carry ``ckptlab.operation`` and ``ckptlab.inputs``,
  a JSON list of ``{"name", "sha256"}`` in input order (``ops.stream.provenance``). These are the direct
  inputs: the relation is the operation.
- **A1111 merges** (and ckptlab merges, which write the same keys) carry ``sd_merge_recipe`` (the
  ``primary/secondary/tertiary_model_hash`` of the direct inputs) and ``sd_merge_models`` (``{sha256: {"name",
  ...}}`` of the inputs *and their own recorded parents*). Used only when ``ckptlab.inputs`` is absent.
- **kohya LoRAs** carry ``ss_new_sd_model_hash`` (SHA-256 of the checkpoint they were trained on) and
  ``ss_sd_model_name``: relation ``trained on``.

``lineage(cat, rec)`` resolves every recorded input to the catalogued files with that SHA-256 (present ones
first) and finds the files made from ``rec``. "Made into" must not parse every row's ``info`` per page view at
50,000 files: this module registers two indexes (component ``lineage``) that SQLite keeps current on every
write, whoever writes (a CLI scan included):

- ``files_lineage_derived``: a *partial* index over the rows whose info mentions ``"ckptlab.inputs"`` or
  ``"sd_merge_models"`` (outputs of transforms and merges, a small share of a library); the query searches the
  SHA-256 only inside those rows, then parses the few candidates to confirm.
- ``files_lineage_trained``: an expression index on ``metadata.ss_new_sd_model_hash`` (lower case), so the
  LoRAs trained on a checkpoint are one index lookup.

A catalog opened before this module was imported lacks the indexes: the same queries then scan (correct, slower).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from ckptlab.display import short_text
from ckptlab.library.catalog import Catalog, FileRecord, register_migrations

COMPONENT = "lineage"

#: the row filter of the partial index; queries repeat it verbatim so that SQLite uses the index
DERIVED_WHERE = "(instr(f.info, '\"ckptlab.inputs\"') > 0 OR instr(f.info, '\"sd_merge_models\"') > 0)"
#: the expression of the trained-on index, repeated verbatim by the query
TRAINED_EXPR = ("lower(json_extract(CASE WHEN json_valid(f.info) THEN f.info END, "
                "'$.metadata.ss_new_sd_model_hash'))")

MIGRATIONS = [
    f"""
    CREATE INDEX IF NOT EXISTS files_lineage_derived ON files(id) WHERE {DERIVED_WHERE.replace('f.info', 'info')};
    CREATE INDEX IF NOT EXISTS files_lineage_trained ON files({TRAINED_EXPR.replace('f.info', 'info')});
    """,
]
register_migrations(COMPONENT, MIGRATIONS)

#: at most this many files are listed as made from one file (a base model may have thousands of LoRAs)
MAX_MADE_INTO = 200

#: what each input of a ckptlab operation is, by position (others: "input N")
_ROLES = {"lora-bake": ("base",), "lora-extract": ("tuned", "base"), "merge": ("A", "B", "C")}


def _json(value: Any) -> Any:
    """A metadata value that may still be the header's JSON string (identify parses most of them)."""
    if isinstance(value, str) and value[:1] in ("[", "{"):
        from ckptlab.jsonable import loads_limited

        try:
            return loads_limited(value)
        except ValueError:
            return None
    return value


def _hex(value: Any) -> str | None:
    """A SHA-256 (64 hex digits) in upper case, or None for anything else (a placeholder, a short hash)."""
    if not isinstance(value, str):
        return None
    v = value.strip().lower().removeprefix("0x")
    return v.upper() if len(v) == 64 and all(c in "0123456789abcdef" for c in v) else None


#: a recorded input's name (untrusted header metadata) as short text, None for none
_text = functools.partial(short_text, limit=200)


def recorded_inputs(metadata: dict | None) -> list[dict]:
    """What a file's header metadata says it was made from: ``[{"relation", "role", "name", "sha256"}]``, in the
    recorded order (``sha256`` upper case, or None when not recorded). Never raises on malformed metadata."""
    md = metadata if isinstance(metadata, dict) else {}
    out: list[dict] = []
    op = _text(md.get("ckptlab.operation"))
    inputs = _json(md.get("ckptlab.inputs"))
    if isinstance(inputs, list) and inputs:
        roles = _ROLES.get(op or "", ())
        for i, item in enumerate(inputs[:100]):
            if not isinstance(item, dict):
                continue
            role = roles[i] if i < len(roles) else ("LoRA" if op == "lora-bake" else f"input {i + 1}")
            out.append({"relation": op or "ckptlab", "role": role, "name": _text(item.get("name")),
                        "sha256": _hex(item.get("sha256"))})
    else:
        models = _json(md.get("sd_merge_models"))
        models = models if isinstance(models, dict) else {}
        recipe = _json(md.get("sd_merge_recipe"))
        recipe = recipe if isinstance(recipe, dict) else {}
        direct = [(role, _hex(recipe.get(f"{key}_model_hash"))) for role, key in
                  (("A", "primary"), ("B", "secondary"), ("C", "tertiary"))]
        direct = [(r, h) for r, h in direct if h]
        names = {_hex(k): v.get("name") if isinstance(v, dict) else None for k, v in list(models.items())[:100]}
        if direct:
            for role, h in direct:
                out.append({"relation": "merge", "role": role, "name": _text(names.get(h)), "sha256": h})
        else:
            for h, name in names.items():
                if h:
                    out.append({"relation": "merge", "role": "input", "name": _text(name), "sha256": h})
    trained = _hex(md.get("ss_new_sd_model_hash"))
    if trained:
        out.append({"relation": "trained on", "role": "base", "name": _text(md.get("ss_sd_model_name")),
                    "sha256": trained})
    return out


def _made_from_sha(metadata: dict | None, sha256: str) -> list[dict]:
    """The recorded inputs of a file that are ``sha256``."""
    return [e for e in recorded_inputs(metadata) if e["sha256"] == sha256]


def _files_with(cat: Catalog, sha256: str) -> list[dict]:
    """The catalogued files with this content, present ones first: ``[{"id", "path", "status"}]``."""
    rows = cat.conn.execute(
        "SELECT f.id, f.display, f.status FROM files f JOIN content c ON c.dev = f.dev AND c.ino = f.ino "
        "AND c.size = f.size AND c.mtime_ns = f.mtime_ns WHERE c.sha256 = ? "
        "ORDER BY f.status != 'present', f.id LIMIT 20", (sha256,)).fetchall()
    return [{"id": i, "path": p, "status": s} for i, p, s in rows]


def _entry(cat: Catalog, e: dict, exclude: int | None = None) -> dict:
    files = [f for f in (_files_with(cat, e["sha256"]) if e["sha256"] else []) if f["id"] != exclude]
    first = files[0] if files else None
    return {**e, "id": first["id"] if first else None, "path": first["path"] if first else None,
            "status": first["status"] if first else None, "copies": files}


def made_into(cat: Catalog, sha256: str, *, exclude: int | None = None, limit: int = MAX_MADE_INTO) -> list[dict]:
    """The catalogued files whose metadata records ``sha256`` as an input (see the module docstring for the
    indexes that keep this fast): ``[{"id", "path", "status", "relation", "role", "name", "sha256"}]``, where
    ``role`` is the part ``sha256`` played (base, A, LoRA...), ``name``/``sha256`` the made file's own."""
    sha = sha256.upper()
    join = ("FROM files f LEFT JOIN content c ON c.dev = f.dev AND c.ino = f.ino AND c.size = f.size "
            "AND c.mtime_ns = f.mtime_ns")
    out: list[dict] = []
    derived = cat.conn.execute(
        f"SELECT f.id, f.display, f.status, f.name, f.info, c.sha256 {join} "
        f"WHERE {DERIVED_WHERE} AND (instr(f.info, ?1) > 0 OR instr(f.info, ?2) > 0) ORDER BY f.id LIMIT ?3",
        (sha.lower(), sha, limit * 4)).fetchall()
    for fid, path, status, name, info, own in derived:
        if fid == exclude:
            continue
        try:
            md = json.loads(info).get("metadata") if info else None
        except (ValueError, AttributeError):
            continue
        hits = _made_from_sha(md, sha)  # confirmed: the hash is a recorded input, not just text somewhere
        if hits and hits[0]["relation"] != "trained on":
            out.append({"id": fid, "path": path, "status": status, "name": name, "sha256": own,
                        "relation": hits[0]["relation"], "role": hits[0]["role"]})
    # the index expression is the exact recorded value: no row needs parsing
    trained = cat.conn.execute(f"SELECT f.id, f.display, f.status, f.name, c.sha256 {join} WHERE {TRAINED_EXPR} = ? "
                               "ORDER BY f.id LIMIT ?", (sha.lower(), limit + 1)).fetchall()
    out += [{"id": fid, "path": path, "status": status, "name": name, "sha256": own, "relation": "trained on",
             "role": "base"} for fid, path, status, name, own in trained if fid != exclude]
    return out[:limit]


def lineage(cat: Catalog, rec: FileRecord) -> dict[str, Any]:
    """``{"made_from": [...], "made_into": [...], "hashed": bool, "more": bool}`` for a catalogued file (``more``:
    ``made_into`` stopped at ``MAX_MADE_INTO``).

    ``made_from``: the inputs its metadata records (``recorded_inputs``), each with the catalogued file that has
    that content (``id``, ``path``, ``status``; None when the library has no such file: then the recorded
    ``name``/``sha256`` is all there is) and ``copies`` (every catalogued file with it). ``made_into``: the
    files made from it (``made_into``); empty when the file is not hashed yet (``hashed`` False), since the
    records name inputs by SHA-256."""
    md = (rec.info or {}).get("metadata") if isinstance(rec.info, dict) else None
    made_from = [_entry(cat, e, exclude=rec.id) for e in recorded_inputs(md)]
    into = made_into(cat, rec.sha256, exclude=rec.id) if rec.sha256 else []
    return {"made_from": made_from, "made_into": into, "hashed": bool(rec.sha256),
            "more": len(into) >= MAX_MADE_INTO}
