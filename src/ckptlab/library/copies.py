"""The other catalogued files that hold a file's content: the same bytes (SHA256), the same weights (tensor
fingerprint, fp16 or bf16 canonical form: ``library.fingerprint``) and, per component (``unet``, ``vae``,
``clip_l``...), the files that share that component - a checkpoint whose VAE is the standalone VAE file, two
merges with the same text encoder.

Per-component matching must not loop over every file (``show_file`` does, fine for a CLI call, not for a page
view at 50,000 files). The catalog keeps each component fingerprint as JSON in ``content.components``, which no
index can search; so this module registers (component ``component_fps``) a table with one row per (content,
component, rounding), an index on the fingerprint, and triggers on ``content`` that keep it in step with every
write (a CLI scan's included; an insert first clears rows left under the same key, so even an ``INSERT OR
REPLACE``, whose implicit delete fires no trigger, leaves no stale row). The migration fills it from the rows
already there. Lookups are then an index search per component.
"""

from __future__ import annotations

from ckptlab.library.catalog import Catalog, FileRecord, register_migrations

COMPONENT = "component_fps"


def _fill(new: str) -> str:
    """The statements that add the component rows of content row ``new`` (``NEW`` in a trigger)."""
    out = []
    for col, rounding in (("components", "fp16"), ("components_bf16", "bf16")):
        out.append(
            "INSERT INTO component_fps(dev, ino, size, mtime_ns, component, rounding, fp) "
            f"SELECT {new}.dev, {new}.ino, {new}.size, {new}.mtime_ns, j.key, '{rounding}', j.value FROM "
            f"json_each(CASE WHEN json_valid({new}.{col}) THEN {new}.{col} ELSE '{{}}' END) j "
            "WHERE j.type = 'text';")
    return "\n".join(out)


_KEY = "dev = {r}.dev AND ino = {r}.ino AND size = {r}.size AND mtime_ns = {r}.mtime_ns"

MIGRATIONS = [
    f"""
    CREATE TABLE component_fps (
        dev INTEGER NOT NULL, ino INTEGER NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
        component TEXT NOT NULL, rounding TEXT NOT NULL, fp TEXT NOT NULL
    );
    CREATE INDEX component_fps_fp ON component_fps(fp);
    CREATE INDEX component_fps_key ON component_fps(dev, ino, size, mtime_ns);
    CREATE TRIGGER component_fps_insert AFTER INSERT ON content BEGIN
    DELETE FROM component_fps WHERE {_KEY.format(r="NEW")};
    {_fill("NEW")}
    END;
    CREATE TRIGGER component_fps_update AFTER UPDATE OF components, components_bf16 ON content BEGIN
    DELETE FROM component_fps WHERE {_KEY.format(r="OLD")};
    {_fill("NEW")}
    END;
    CREATE TRIGGER component_fps_delete AFTER DELETE ON content BEGIN
    DELETE FROM component_fps WHERE {_KEY.format(r="OLD")};
    END;
    INSERT INTO component_fps(dev, ino, size, mtime_ns, component, rounding, fp)
    SELECT c.dev, c.ino, c.size, c.mtime_ns, j.key, 'fp16', j.value FROM content c,
    json_each(CASE WHEN json_valid(c.components) THEN c.components ELSE '{{}}' END) j WHERE j.type = 'text';
    INSERT INTO component_fps(dev, ino, size, mtime_ns, component, rounding, fp)
    SELECT c.dev, c.ino, c.size, c.mtime_ns, j.key, 'bf16', j.value FROM content c,
    json_each(CASE WHEN json_valid(c.components_bf16) THEN c.components_bf16 ELSE '{{}}' END) j
    WHERE j.type = 'text';
    """,
]
register_migrations(COMPONENT, MIGRATIONS)

#: files listed at most per group
MAX_COPIES = 50

_JOIN = "JOIN files f ON c.dev = f.dev AND c.ino = f.ino AND c.size = f.size AND c.mtime_ns = f.mtime_ns"


def same_bytes(cat: Catalog, rec: FileRecord) -> list[dict]:
    """Other catalogued files with ``rec``'s SHA256 (present ones first): ``[{"id", "path", "status"}]``."""
    if not rec.sha256:
        return []
    rows = cat.conn.execute(f"SELECT f.id, f.display, f.status FROM content c {_JOIN} WHERE c.sha256 = ? AND f.id != ? "
                            "ORDER BY f.status != 'present', f.id LIMIT ?",
                            (rec.sha256.upper(), rec.id, MAX_COPIES)).fetchall()
    return [{"id": i, "path": p, "status": s} for i, p, s in rows]


def same_weights(cat: Catalog, rec: FileRecord) -> list[dict]:
    """Files with other bytes but the same tensors (the fp16 fingerprint, or the bf16 one where both have it):
    another format, precision or metadata. ``[{"id", "path", "status", "format"}]``."""
    if not rec.fingerprint:
        return []
    rows = cat.conn.execute(
        f"SELECT f.id, f.display, f.status, f.format FROM content c {_JOIN} WHERE (c.fingerprint = ?1 OR "
        "(?2 IS NOT NULL AND c.fingerprint_bf16 = ?2)) AND f.id != ?3 AND (c.sha256 IS NULL OR ?4 IS NULL OR "
        "c.sha256 != ?4) ORDER BY f.status != 'present', f.id LIMIT ?5",
        (rec.fingerprint, rec.fingerprint_bf16, rec.id, rec.sha256.upper() if rec.sha256 else None,
         MAX_COPIES)).fetchall()
    return [{"id": i, "path": p, "status": s, "format": fmt} for i, p, s, fmt in rows]


def has_table(cat: Catalog) -> bool:
    return cat.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'component_fps'"
                            ).fetchone() is not None


def same_component(cat: Catalog, rec: FileRecord, *, exclude: set[int] | None = None) -> dict[str, list[dict]]:
    """Per component of ``rec`` (only files with several components, or one named component such as a standalone
    ``vae``; a one-part file's match is its whole-weights match), the other files that hold it, by fp16 or bf16
    fingerprint: ``{component: [{"id", "path", "status"}]}``; ``exclude``: ids left out (the whole copies)."""
    comps = {k: v for k, v in (rec.components or {}).items() if isinstance(v, str) and v}
    bf16 = {k: v for k, v in (rec.components_bf16 or {}).items() if isinstance(v, str) and v}
    if not comps or set(comps) == {"model"} or not has_table(cat):
        return {}
    skip = set(exclude or ()) | {rec.id}
    out: dict[str, list[dict]] = {}
    seen: dict[str, set[int]] = {}
    for rounding, table in (("fp16", comps), ("bf16", bf16)):
        for comp, fp in sorted(table.items()):
            rows = cat.conn.execute(
                "SELECT DISTINCT f.id, f.display, f.status FROM component_fps c "
                f"{_JOIN} WHERE c.fp = ? AND c.component = ? AND c.rounding = ? "
                "ORDER BY f.status != 'present', f.id LIMIT ?", (fp, comp, rounding, MAX_COPIES + len(skip))).fetchall()
            for fid, path, status in rows:
                if fid in skip or fid in seen.setdefault(comp, set()) or len(out.get(comp, ())) >= MAX_COPIES:
                    continue
                seen[comp].add(fid)
                out.setdefault(comp, []).append({"id": fid, "path": path, "status": status})
    return out
