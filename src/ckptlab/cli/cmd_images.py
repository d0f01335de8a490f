"""``ckptlab images``: read the generation metadata of images (A1111/Forge, ComfyUI, InvokeAI, StabilityMatrix)
and find the models they name in the library catalog (``ckptlab.imaging.images``).

Exit codes: 0 every file was read (models missing from the library are a report, not a failure, ``--missing``
included); 1 some file could not be read (each said on one line, the others still reported), or the ``--db``
given is no catalog. The links found are recorded in the catalog ("images made with this model", shown by
``ckptlab show``); a catalog that cannot be written is a warning.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import typer

from ckptlab.cli.common import db_option

#: the settings the human output shows (``--json`` has them all)
SHOWN = ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Denoising strength", "Clip skip")
PROMPT_CHARS = 400


def images_cmd(
    paths: list[Path] = typer.Argument(..., help="Images (.png, .jpg, .webp) or folders (searched recursively)."),
    missing: bool = typer.Option(False, "--missing", help="Only list what the images used that the library "
                                                          "lacks (name, kind, hash, how many images)."),
    json_out: bool = typer.Option(False, "--json", help="JSON Lines: one object per image (with --missing: per "
                                                        "missing model)."),
    db: Optional[Path] = db_option(),
) -> None:
    """What made these images (prompt, settings, models with their hashes), and where the library has each model.

      ckptlab images outputs/ --missing
      ckptlab images 00042-1234.png --json
    """
    from ckptlab.cli.common import emit_json, error_line, warning_line
    from ckptlab.imaging.images import catalog_index, missing_models, read_images, record_links

    index, db_path = catalog_index(db, required=missing)
    if index is None:
        warning_line(f"no catalog at {db_path}: models are not looked up (make one with 'ckptlab scan --hash "
                     "FOLDER', or pass --db)")

    failed: list[str] = []

    def on_error(path: str, message: str) -> None:
        failed.append(path)
        error_line(f"{path}: {message}")

    seen: list = []  # each image's report, for the catalog's links (with --missing: only missing models kept)
    ambiguous: set = set()
    for r in read_images([str(p) for p in paths], index, on_error):
        seen.append(r)
        if missing:
            ambiguous |= {(m.role, m.name, tuple(m.hashes)) for m in r.models if m.status == "ambiguous"}
            continue
        for w in r.warnings:
            warning_line(f"{r.path}: {w}")
        if json_out:
            emit_json(r)
        else:
            _print_image(r)
    if missing:
        missed = [SimpleNamespace(path=r.path, models=[m for m in r.models if m.status == "missing"]) for r in seen]
        _print_missing(missing_models(missed), len(missed), json_out)
        if ambiguous and not json_out:
            warning_line(f"{len(ambiguous)} model(s) match several files and are not counted as missing; run "
                         "without --missing to see the candidates")
    if index is not None:
        w = record_links(db_path, seen)
        if w:
            warning_line(w)
    if failed:
        raise typer.Exit(1)


def _print_image(r) -> None:
    from ckptlab.cli.common import console
    from ckptlab.display import printable

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    size = f", {r.size[0]}x{r.size[1]}" if r.size else ""
    say(f"{printable(r.path)}  ({r.generator or 'no generation metadata'}{size})")
    for label, text in (("prompt", r.prompt), ("negative", r.negative)):
        if text:
            shown = text if len(text) <= PROMPT_CHARS else text[:PROMPT_CHARS] + f"... [{len(text)} characters]"
            say(f"  {label}: {printable(shown)}")
    settings = [f"{k}: {r.params[k]}" for k in SHOWN if k in r.params and not isinstance(r.params[k], (dict, list))]
    if settings:
        say("  settings: " + printable(", ".join(settings)))
    for m in r.models:
        parts = [f"  {m.role:<12}", printable(m.name or m.title or (f"CivitAI version {m.version_id}"
                                                                  if m.version_id is not None else "?"))]
        if m.weight is not None:
            parts.append(f"x{m.weight:g}" + (f"/{m.weight_clip:g}" if m.weight_clip not in (None, m.weight) else ""))
        if m.hashes:
            parts.append("[" + printable(", ".join(m.hashes)) + "]")
        if m.status == "found":
            more = f" (+{len(m.paths) - 1} copies)" if len(m.paths) > 1 else ""
            parts.append(f"-> {printable(m.paths[0])}{more} by {m.matched_by}")
        elif m.status == "ambiguous":
            parts.append(f"AMBIGUOUS by {m.matched_by}: " + printable("; ".join(c["paths"][0] for c in m.candidates)))
        elif m.status == "missing":
            parts.append("MISSING")
        if m.note and m.status != "ambiguous":
            parts.append(f"({printable(m.note)})")
        say(" ".join(parts))


def _print_missing(rows: list[dict], n_images: int, json_out: bool) -> None:
    from ckptlab.cli.common import console, emit_json
    from ckptlab.display import printable

    if json_out:
        for row in rows:
            emit_json(row)
        return

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    if not rows:
        say(f"nothing missing: the library has every model the {n_images} image(s) name")
        return
    say(f"{'KIND':<12} {'IMAGES':>6}  {'HASH':<14} NAME")
    for row in rows:
        name = row["name"] or row["title"] or (f"CivitAI version {row['version_id']}" if row["version_id"] else "?")
        h = row["hashes"][0] if row["hashes"] else "-"
        line = f"{row['role']:<12} {row['images']:>6}  {printable(h):<14} {printable(name)}"
        if row["note"]:
            line += f"  ({printable(row['note'])})"
        say(line)
    say(f"{len(rows)} model(s) missing, named by {n_images} image(s) read")


def register(app) -> None:
    app.command("images")(images_cmd)
