"""Library commands: ``scan``, ``hash``, ``ls``, ``show``, ``dupes``, ``plan-space``, ``report``.

All of them work on the catalog (``--db``, else ``$CKPTLAB_DB``, else the platform data dir); the
logic lives in ``ckptlab.library``. Exit codes: 0 ok; 1 bad input / unreadable catalog; 2 usage;
3 ``show`` found nothing; 5 ``scan`` finished but some files had errors (``--strict`` only).
"""

from __future__ import annotations

from pathlib import Path

import typer

from ckptlab.cli.common import db_option


def _catalog(db: Path | None):
    from ckptlab.library.catalog import Catalog

    return Catalog(db)


def register(app) -> None:
    @app.command("scan")
    def scan_cmd(
        roots: list[Path] = typer.Argument(None, help="Model folders (A1111/ComfyUI roots, or any folder)."),
        hash: bool = typer.Option(False, "--hash", help="Also compute the six CivitAI hashes (one read per file)."),
        fingerprint: bool = typer.Option(False, "--fingerprint",
                                         help="Also compute tensor fingerprints (for dupes across forms)."),
        extra_model_paths: Path = typer.Option(None, "--extra-model-paths",
                                               help="A ComfyUI extra_model_paths.yaml whose folders to scan too."),
        db: Path = db_option(),
        json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
        strict: bool = typer.Option(False, "--strict", help="Exit 5 when any file had an error."),
        workers: int = typer.Option(None, "--workers", min=1,
                                    help="Processes reading new files (default: CPUs, at most 8)."),
    ) -> None:
        """Walk model folders into the catalog (incremental: unchanged files are not re-read)."""
        from ckptlab.cli.common import console, emit_json, progress_bar
        from ckptlab.library.scanner import scan

        with _catalog(db) as cat, progress_bar("scanning", unit_bytes=hash or fingerprint,
                                               enabled=not json_out) as prog:
            s = scan(roots or [], cat, hash=hash, fingerprint=fingerprint, extra_model_paths=extra_model_paths,
                     progress=prog, workers=workers)
        if json_out:
            emit_json(s)
        else:
            from ckptlab.display import human_size as human

            console.print(f"scanned {s.files} files ({human(s.bytes)}) in {s.seconds:.2f} s: {s.new} new, "
                          f"{s.changed} changed, {s.unchanged} unchanged, {s.moved} moved, {s.missing} missing, "
                          f"{s.errors} errors" + (f"; hashed {s.hashed}" if hash else "")
                          + (f"; fingerprinted {s.fingerprinted}" if fingerprint else ""),
                          highlight=False, markup=False)
            for e in s.error_list[:20]:
                console.print(f"  error: {e['path']}: {e['error']}", highlight=False, markup=False)
            if len(s.error_list) > 20:
                console.print(f"  ... {len(s.error_list) - 20} more (ckptlab ls --errors)", markup=False)
        if strict and s.errors:
            raise typer.Exit(5)

    @app.command("hash")
    def hash_cmd(
        paths: list[Path] = typer.Argument(..., help="Model files."),
        db: Path = db_option(),
        no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor fill the catalog's hash cache."),
        json_out: bool = typer.Option(False, "--json", help="JSON Lines, one object per file."),
    ) -> None:
        """SHA256, AutoV1, AutoV2, AutoV3, CRC32 and BLAKE3 of each file, in one read (UPPER-case, as CivitAI)."""
        import os

        from ckptlab.cli.common import console, emit_json, progress_bar
        from ckptlab.library.scanner import hash_paths

        total = sum(os.path.getsize(p) for p in paths if os.path.isfile(p))
        cat = None if no_cache else _catalog(db)
        try:
            with progress_bar("hashing", total=total, enabled=not json_out) as prog:
                results = hash_paths(paths, cat, progress=prog)
        finally:
            if cat is not None:
                cat.close()
        for r in results:
            if json_out:
                emit_json(r)
                continue
            console.print(r["path"] + (" (cached)" if r["cached"] else ""), markup=False, highlight=False)
            for name, key in (("SHA256", "sha256"), ("AutoV1", "autov1"), ("AutoV2", "autov2"),
                              ("AutoV3", "autov3"), ("CRC32", "crc32"), ("BLAKE3", "blake3")):
                console.print(f"  {name:<7} {r[key] or '-'}", markup=False, highlight=False)

    @app.command("ls")
    def ls_cmd(
        kind: str = typer.Option(None, "--kind", help="checkpoint, lora, vae, embedding, ..."),
        family: str = typer.Option(None, "--family", help="sd1, sdxl, flux, ..."),
        search: str = typer.Option(None, "--search", help="Text in the path or the sidecars."),
        sort: str = typer.Option("name", "--sort", help="size | name | mtime | path"),
        missing: bool = typer.Option(False, "--missing", help="List files marked missing instead."),
        errors: bool = typer.Option(False, "--errors", help="Only files with errors."),
        db: Path = db_option(),
        json_out: bool = typer.Option(False, "--json", help="JSON Lines, one object per file."),
    ) -> None:
        """List catalogued files."""
        from ckptlab.cli.common import console, emit_json
        from ckptlab.display import human_size as human
        from ckptlab.library.report import file_row

        with _catalog(db) as cat:
            recs = cat.files(status="missing" if missing else "present", kind=kind, family=family, search=search,
                             sort=sort)
        if errors:
            recs = [r for r in recs if r.error]
        if json_out:
            for r in recs:
                emit_json(file_row(r) | {"id": r.id})
            return
        if not recs:
            console.print("no files", markup=False)
        for r in recs:
            row = file_row(r)
            what = "/".join(x for x in (r.kind, r.family) if x) or "?"
            console.print(f"{human(r.size):>10}  {what:<22} {r.format or '?':<11} {row['autov2'] or '-':<10}  {r.path}"
                          + (f"  [error: {r.error}]" if r.error else ""), markup=False, highlight=False,
                          soft_wrap=True)

    @app.command("show")
    def show_cmd(
        target: str = typer.Argument(..., help="A catalogued path, or a hash (SHA256, AutoV1/2/3, CRC32, BLAKE3)."),
        db: Path = db_option(),
        json_out: bool = typer.Option(False, "--json", help="JSON Lines, one object per matching file."),
    ) -> None:
        """Everything known about one file: identification, hashes, fingerprints, sidecars, copies."""
        import json

        from ckptlab.cli.common import console, emit_json
        from ckptlab.library.show import show_file

        with _catalog(db) as cat:
            found = show_file(cat, target)
        for d in found:
            if json_out:
                emit_json(d)
                continue
            console.print(d["path"], style="bold", markup=False, highlight=False)
            for k in ("status", "kind", "family", "variant", "format", "size", "safety", "error", "folder"):
                if d.get(k) is not None:
                    console.print(f"  {k}: {d[k]}", markup=False, highlight=False)
            for name, v in (d.get("hashes") or {}).items():
                console.print(f"  {name}: {v}", markup=False, highlight=False)
            if d.get("fingerprint"):
                console.print(f"  fingerprint: {d['fingerprint']}", markup=False, highlight=False)
                for comp, fp in (d.get("components") or {}).items():
                    console.print(f"    {comp}: {fp[:16]}", markup=False, highlight=False)
            if civ := d.get("civitai"):
                how = (f"inherited from {civ['inherited_from'][:12]} (same tensors)" if civ["inherited"]
                       else f"matched by {civ['matched_by']}")
                console.print(f"  civitai: {civ['model_name']} / {civ['version_name']}  model {civ['model_id']} "
                              f"version {civ['version_id']}  [{how}]  {civ['revisions']} revision(s)"
                              f"  upstream: {civ['upstream_status']}", markup=False, highlight=False, soft_wrap=True)
                if civ["trigger_words"]:
                    console.print("    trigger words: " + ", ".join(civ["trigger_words"]), markup=False,
                                  highlight=False, soft_wrap=True)
                if civ["url"]:
                    console.print(f"    {civ['url']}", markup=False, highlight=False, soft_wrap=True)
            for key in ("same_bytes_as", "same_component_as", "sidecars"):
                if d.get(key):
                    console.print(f"  {key}: {json.dumps(d[key], ensure_ascii=False)}", markup=False,
                                  highlight=False)

    @app.command("dupes")
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

        with _catalog(db) as cat:
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

    @app.command("plan-space")
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
        with _catalog(db) as cat:
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

    @app.command("report")
    def report_cmd(
        fmt: str = typer.Option("table", "--format", help="table | json | csv | html"),
        output: Path = typer.Option(None, "-o", "--output", help="Write to this file (default: stdout)."),
        db: Path = db_option(),
    ) -> None:
        """The library inventory: totals, by kind / family / format / precision / size, pickles and verdicts."""
        import sys

        from ckptlab.errors import CkptlabError, OutputError
        from ckptlab.library.report import RENDERERS, build_inventory

        if fmt not in RENDERERS:
            raise CkptlabError(f"unknown report format {fmt!r} (use {', '.join(RENDERERS)})")
        with _catalog(db) as cat:
            text = RENDERERS[fmt](build_inventory(cat))
        if output is None:
            sys.stdout.write(text)
            return
        import contextlib
        import os
        import tempfile

        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent if str(output.parent) else ".")
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
                fh.write(text)
            os.replace(tmp, output)
        except BaseException as e:
            if tmp is not None:  # no leftover temp file (OUTPUT is a folder, disk full, Ctrl-C)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            if isinstance(e, OSError):
                raise OutputError(f"cannot write report: {e.strerror or e}", output) from None
            raise
