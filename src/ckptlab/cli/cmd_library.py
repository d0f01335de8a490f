"""Library commands: ``scan``, ``hash``, ``ls``, ``show``, ``dupes``, ``plan-space``, ``report``.

All of them work on the catalog (``--db``, else ``$CKPTLAB_DB``, else the platform data dir); the
logic lives in ``ckptlab.library``. Exit codes: 0 ok; 1 bad input, a scan root that is not there,
an unreadable or read-only catalog, an existing ``report -o`` file; 2 usage (an unknown ``--kind``
or ``--family`` included, a hash prefix under 8 digits); ``show`` finding nothing is 1; 5 ``scan`` finished but some files had errors
(``--strict`` only).

Human output renders control characters in names and metadata visibly (``ckptlab.display``);
``--json`` output keeps every value exact.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ckptlab.cli.common import db_option


def _catalog(db: Path | None, *, must_exist: bool = False):
    from ckptlab.library.catalog import Catalog

    return Catalog(db, must_exist=must_exist)


def scan_cmd(
    roots: list[str] = typer.Argument(None, help="Model folders (A1111/ComfyUI roots, or any folder), or "
                                               "object-store prefixes (s3://bucket/prefix, gs://, az://)."),
    hash: bool = typer.Option(False, "--hash", help="Also compute the six CivitAI hashes (one read per file)."),
    fingerprint: bool = typer.Option(False, "--fingerprint",
                                     help="Also compute tensor fingerprints (for dupes across forms)."),
    extra_model_paths: Path = typer.Option(None, "--extra-model-paths",
                                           help="A ComfyUI extra_model_paths.yaml whose folders to scan too."),
    db: Path = db_option(),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
    strict: bool = typer.Option(False, "--strict", help="Exit 5 when any file had an error."),
    workers: int = typer.Option(None, "--workers", min=1,
                                help="Processes reading new files (default: CPUs, at most 8; for URLs: "
                                     "threads, default 8)."),
    ray: str = typer.Option(None, "--ray", metavar="auto|ADDRESS",
                            help="Read the objects of URL roots as Ray tasks on a cluster: 'auto' "
                                 "($RAY_ADDRESS or the running local cluster) or HOST:PORT."),
) -> None:
    """Walk model folders into the catalog (incremental: unchanged files are not re-read)."""
    from ckptlab.cli.common import console, emit_json, error_line, progress_bar, warning_line
    from ckptlab.display import one_line
    from ckptlab.library.scanner import scan
    from ckptlab.remote import is_remote

    # typer's Path would turn s3://b/k into s3:/b/k: URLs stay strings, the rest become paths
    targets = [r if is_remote(r) else Path(r) for r in roots or []]
    def waiting() -> None:
        warning_line("another scan of this catalog is running; waiting for it to finish")

    with _catalog(db) as cat, progress_bar("scanning", unit_bytes=True, enabled=not json_out) as prog:
        s = scan(targets, cat, hash=hash, fingerprint=fingerprint, extra_model_paths=extra_model_paths,
                 progress=prog, workers=workers, on_wait=waiting, ray_address=ray)
    if json_out:
        emit_json(s)
    else:
        from ckptlab.display import human_size as human

        console.print(f"scanned {s.files} files ({human(s.bytes)}) in {s.seconds:.2f} s: {s.new} new, "
                      f"{s.changed} changed, {s.unchanged} unchanged, {s.moved} moved, {s.missing} missing, "
                      f"{s.errors} errors" + (f"; hashed {s.hashed}" if hash else "")
                      + (f"; fingerprinted {s.fingerprinted}" if fingerprint else ""),
                      highlight=False, markup=False, soft_wrap=True)
        for e in s.error_list[:20]:
            console.print(f"  error: {one_line(e['path'])}: {one_line(e['error'])}", highlight=False,
                          markup=False, soft_wrap=True)
        if len(s.error_list) > 20:
            console.print(f"  ... {len(s.error_list) - 20} more (ckptlab ls --errors)", markup=False)
    if s.malicious or s.suspicious:
        what = " and ".join(f"{n} {v}" for n, v in ((s.malicious, "malicious"), (s.suspicious, "suspicious"))
                            if n)
        warning_line(f"{what} file(s) in the scanned folders; never load them with torch.load "
                     f"(list: ckptlab ls --unsafe)")
    for root in s.bad_roots:
        error_line(f"{root}: " + ("no objects under this prefix (not scanned)" if is_remote(root)
                                  else "cannot access this folder (not scanned)"))
    if s.bad_roots:
        raise typer.Exit(1)
    if strict and s.errors:
        raise typer.Exit(5)


def hash_cmd(
    paths: list[str] = typer.Argument(..., help="Model files, folders (searched for model files) or globs."),
    db: Path = db_option(),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor fill the catalog's hash cache."),
    json_out: bool = typer.Option(False, "--json", help="JSON Lines, one object per file."),
) -> None:
    """SHA256, AutoV1, AutoV2, AutoV3, CRC32 and BLAKE3 of each file, in one read (UPPER-case, as CivitAI)."""
    import os

    from ckptlab.cli.common import (
        console,
        emit_json,
        error_line,
        expand_paths,
        progress_bar,
        warning_line,
    )
    from ckptlab.display import printable
    from ckptlab.errors import CkptlabError
    from ckptlab.formats import MODEL_SUFFIXES
    from ckptlab.library.scanner import hash_paths
    from ckptlab.remote import RemoteURL, expand_targets

    files: list = []
    for p in expand_targets(paths, expand_paths):
        if type(p) is RemoteURL:
            files.append(p)  # an object (a prefix is refused by hash_paths with one line)
        elif p.is_dir():  # a diffusers folder: CivitAI hashes are per file, so each file in it
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in MODEL_SUFFIXES
                            and not any(part.startswith(".") for part in f.relative_to(p).parts))
        else:
            files.append(p)
    if not files:
        raise CkptlabError(f"no model files in {', '.join(paths)}")
    total = sum(os.path.getsize(p) for p in files if type(p) is not RemoteURL and os.path.isfile(p))
    cat, failed = None, []
    if not no_cache:
        from ckptlab.library.catalog import CatalogWriteError

        try:
            cat = _catalog(db)
        except CatalogWriteError as e:  # the catalog is only a cache here (a read-only folder...)
            warning_line(f"{e}; hashes not cached")
    try:
        with progress_bar("hashing", total=total, enabled=not json_out) as prog:
            results = hash_paths(files, cat, progress=prog, on_cache_error=warning_line,
                                 on_error=lambda e: failed.append(e) or error_line(str(e)))
    finally:
        if cat is not None:
            cat.close()
    for r in results:
        if json_out:
            emit_json(r)
            continue
        console.print(printable(r["path"]) + (" (cached)" if r["cached"] else ""), markup=False,
                      highlight=False, soft_wrap=True)
        for name, key in (("SHA256", "sha256"), ("AutoV1", "autov1"), ("AutoV2", "autov2"),
                          ("AutoV3", "autov3"), ("CRC32", "crc32"), ("BLAKE3", "blake3")):
            console.print(f"  {name:<7} {(r[key] or '-').upper()}", markup=False, highlight=False)
    if failed:  # each already said on stderr; the files that could be read were hashed
        raise typer.Exit(1)


def ls_cmd(
    kind: str = typer.Option(None, "--kind",
                             help="checkpoint, lora (includes LyCORIS), vae, embedding, controlnet, ... or a UI "
                                  "folder name (loras, checkpoints, Stable-diffusion) or CivitAI type (LORA)."),
    family: str = typer.Option(None, "--family",
                               help="sd1, sdxl, flux, ... or a CivitAI base model (\"SD 1.5\", \"SDXL 1.0\", "
                                    "Pony) or short name (sd15)."),
    search: str = typer.Option(None, "--search",
                               help="Text in the path, the sidecars, the CivitAI name, base model and "
                                    "trigger words, or a LoRA's trigger words from its own metadata."),
    sort: str = typer.Option("name", "--sort", help="size | name | mtime | path"),
    missing: bool = typer.Option(False, "--missing", help="List files marked missing instead."),
    errors: bool = typer.Option(False, "--errors", help="Only files with errors."),
    unsafe: bool = typer.Option(False, "--unsafe",
                                help="Only files whose safety verdict is not safe (malicious, suspicious, "
                                     "corrupt, unchecked)."),
    db: Path = db_option(),
    json_out: bool = typer.Option(False, "--json", help="JSON Lines, one object per file."),
) -> None:
    """List catalogued files (one line each, under a header row)."""
    from ckptlab.cli.common import console, emit_json
    from ckptlab.display import human_size as human
    from ckptlab.display import printable
    from ckptlab.library.report import file_row
    from ckptlab.library.show import list_files

    with _catalog(db, must_exist=True) as cat:
        # imported after opening: importing hub.store registers its migrations, and a read adds no tables
        from ckptlab.hub.link import link_lookup

        listed = list_files(cat, kind=kind, family=family, search=search, sort=sort, missing=missing,
                            errors=errors, unsafe=unsafe, civitai=link_lookup(cat))
        from ckptlab.library.image_links import counts as image_counts

        made_with = image_counts(cat)  # images made with each content (ckptlab images)
    if json_out:
        for r, c in listed:
            emit_json(file_row(r) | {"id": r.id, "civitai": c, "triggers": r.triggers,
                                     "images": made_with.get(r.sha256.upper()) if r.sha256 else None})
        return
    if not listed:
        console.print("no files", markup=False)
        return
    console.print(f"{'SIZE':>10}  {'KIND/FAMILY':<22} {'FORMAT':<11} {'SAFETY':<10} {'AUTOV2':<10}  PATH  "
                  "[CIVITAI]", markup=False, highlight=False, soft_wrap=True)
    for r, c in listed:
        row = file_row(r)
        what = printable("/".join(x for x in (r.kind, r.family) if x) or "?")
        line = (f"{human(r.size):>10}  {what:<22} {r.format or '?':<11} {r.safety or '-':<10} "
                f"{(row['autov2'] or '-').upper():<10}  {printable(r.path)}")
        if c:
            name = " / ".join(x for x in (c["model_name"], c["version_name"]) if x)
            line += f"  [{printable(name)}" + (f"; {printable(c['base_model'])}" if c["base_model"] else "")
            if c["trigger_words"]:
                line += "; triggers: " + printable(", ".join(map(str, c["trigger_words"])))
            line += "]"
        own = [t["word"] for t in r.triggers or [] if isinstance(t, dict) and isinstance(t.get("word"), str)]
        if own:
            line += "  [metadata triggers: " + printable(", ".join(own[:3])) + "]"
        if r.error:
            line += f"  [error: {printable(r.error)}]"
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def show_cmd(
    target: str = typer.Argument(..., help="A catalogued path, or a hash (SHA256, AutoV1/2/3, CRC32, BLAKE3)."),
    db: Path = db_option(),
    json_out: bool = typer.Option(False, "--json", help="JSON Lines, one object per matching file."),
) -> None:
    """Everything known about one file: identification, hashes, fingerprints, sidecars, copies."""
    from ckptlab.cli.common import console, emit_json
    from ckptlab.library.show import render_text, show_file

    with _catalog(db, must_exist=True) as cat:
        # imported after opening: importing hub.store registers its migrations, and a read adds no tables
        from ckptlab.hub.link import link_lookup

        found = show_file(cat, target, civitai=link_lookup(cat))
    for d in found:
        if json_out:
            emit_json(d)
            continue
        for line in render_text(d):
            console.print(line, markup=False, highlight=False, soft_wrap=True)


def dupes_cmd(
    prefer_smaller: bool = typer.Option(False, "--prefer-smaller",
                                        help="Keep the lower-precision copy of same-weight files."),
    components: bool = typer.Option(False, "--components",
                                    help="Also list models sharing one component (same UNet, other VAE)."),
    link: str = typer.Option("auto", "--link",
                             help="Copies in UI folders become links to the kept copy: auto (hard link on "
                                  "the same filesystem, else symlink), hard, sym, or none (remove them)."),
    db: Path = db_option(),
    json_out: bool = typer.Option(False, "--json", help="JSON Lines, one object per group."),
) -> None:
    """Every model held more than once (same bytes, or the same weights in another form), with the one copy
    to keep and what would happen to each other copy."""
    from ckptlab.cli.common import console, emit_json
    from ckptlab.display import human_size as human
    from ckptlab.display import printable
    from ckptlab.library.dupes import find_dupes

    with _catalog(db, must_exist=True) as cat:
        res = find_dupes(cat, prefer_smaller=prefer_smaller, components=components, link=link)
    if json_out:
        for g in res.groups:
            emit_json(g)
        return

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    marks = {"keep": "keep  ", "delete": "remove", "link": "link  ", "leave": "leave "}
    for g in res.groups:
        say(f"{g.kind}: {g.reason} - frees {human(g.bytes_freed)}")
        for c in g.copies:
            mark = marks[c.action] if g.kind != "shared_component" else "      "
            form = "diffusers folder" if c.format == "diffusers" else (
                f"{c.format}, {c.precision or '?'}{', pruned' if c.pruned else ', full'}")
            where = ", UI folder" if c.in_ui else ""
            say(f"  {mark} {printable(c.path)} ({human(c.size)}, {form}{where})"
                + (f": {c.note}" if c.note and g.kind != "shared_component" else ""))
    say(f"{len(res.groups)} groups, {human(res.bytes_freed)} could be freed"
        + (f"; {res.unhashed} files not hashed (scan --hash)" if res.unhashed else "")
        + (f"; {res.unfingerprinted} not fingerprinted (scan --fingerprint)" if res.unfingerprinted else ""))


def plan_space_cmd(
    output: Path = typer.Option(None, "-o", "--output", help="Write the plan as JSON (for apply-plan)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the -o file if it exists."),
    prefer_smaller: bool = typer.Option(False, "--prefer-smaller", help="Keep lower-precision copies."),
    no_fp16: bool = typer.Option(False, "--no-fp16", help="Do not propose fp32 -> fp16."),
    link: str = typer.Option("auto", "--link",
                             help="Duplicates in UI folders become links to the kept copy: auto (hard link "
                                  "on the same filesystem, else symlink), hard, sym, or none (remove them "
                                  "from the UI)."),
    convert_kind: list[str] = typer.Option(None, "--convert-kind",
                                           help="Also convert pickles of this kind (e.g. hypernetwork, "
                                                "upscaler), which UIs may load only as .pt/.pth."),
    db: Path = db_option(),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as one JSON object."),
) -> None:
    """A dry-run disk plan: duplicates to remove or link, pickles to convert, files to prune or make fp16,
    with the bytes each step frees (nothing is changed; apply-plan carries it out)."""
    from ckptlab.cli.common import console, emit_json
    from ckptlab.display import human_size as human
    from ckptlab.display import printable
    from ckptlab.errors import OutputError
    from ckptlab.library.dupes import plan_space

    if output is not None and not overwrite and (output.exists() or output.is_symlink()):
        raise OutputError("output already exists (use --overwrite to replace it)", output)
    with _catalog(db, must_exist=True) as cat:
        plan = plan_space(cat, prefer_smaller=prefer_smaller, fp16=not no_fp16, link=link,
                          convert_kinds=set(convert_kind or ()))
    if output is not None:
        plan.save(output, overwrite=overwrite)
    if json_out:
        emit_json(plan.to_dict())
        return

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    for s in plan.steps:
        if s.action == "link_duplicate":
            extra = f" ({s.link} link to {printable(s.keep)}" + (
                f", named {Path(s.link_path).name})" if s.link_path != s.path else ")")
        elif s.action == "delete_duplicate":
            extra = f" (keep {printable(s.keep)})"
        else:
            extra = f" -> {Path(s.output).name}" if s.output != s.path else " (in place)"
        say(f"{s.label:<22} {human(s.bytes_freed):>10}  {printable(s.path)}{extra}")
    for note in plan.notes:
        say(f"note: {printable(note)}")
    for action, d in plan.by_action().items():
        say(f"{action}: {d['files']} files, {human(d['bytes_freed'])}")
    say(f"total: {human(plan.total_bytes_freed)} could be freed (dry run; nothing was changed)"
        + (f"; plan written to {output}" if output else ""))


def report_cmd(
    fmt: str = typer.Option("table", "--format", help="table | json | csv | html"),
    output: Path = typer.Option(None, "-o", "--output", help="Write to this file (default: stdout)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
    db: Path = db_option(),
) -> None:
    """The library inventory: totals, by kind / family / format / precision / size, pickles and verdicts."""
    import shutil
    import sys

    from ckptlab.library.report import report

    shown = output is None and sys.stdout.isatty()
    text = report(db, fmt, output, overwrite=overwrite, terminal=shown,
                  width=shutil.get_terminal_size().columns if shown else None)
    if output is None:
        sys.stdout.write(text)


def register(app) -> None:
    app.command("scan")(scan_cmd)
    app.command("hash")(hash_cmd)
    app.command("ls")(ls_cmd)
    app.command("show")(show_cmd)
    app.command("dupes")(dupes_cmd)
    app.command("plan-space")(plan_space_cmd)
    app.command("report")(report_cmd)
