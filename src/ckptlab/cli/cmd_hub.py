"""``ckptlab civitai link|show|info`` and ``ckptlab download``: thin wrappers over ``ckptlab.hub``.
Heavy imports (httpx, torch, sqlite work) happen inside the command functions.

Every text that came from a server or a file name is printed through ``display.printable``: control
characters and bidi overrides are shown as escapes, never sent to the terminal raw."""

from __future__ import annotations

from pathlib import Path

import typer

from ckptlab.cli.common import (
    console,
    db_option,
    emit_json,
    expand_paths,
    progress_bar,
    progress_phases,
    warning_line,
)

_BASE_URL = typer.Option(None, "--base-url", help="CivitAI site URL (env CKPTLAB_CIVITAI_URL, config \\[civitai] base_url).")


def _out(text: str) -> None:
    """One line on stdout, server/file text made terminal-safe."""
    from ckptlab.display import printable

    console.print(printable(text), markup=False, highlight=False, soft_wrap=True)


def _note(text: str) -> None:
    """A summary line on stderr (not an error), terminal-safe."""
    from ckptlab.cli.common import err_console
    from ckptlab.display import one_line

    err_console.print(one_line(text), markup=False, highlight=False, soft_wrap=True)


def civitai_link(
    paths: list[str] = typer.Argument(None, help="Files or folders (default: every file in the catalog)."),
    write_sidecars: bool = typer.Option(False, "--write-sidecars",
                                        help="Write <name>.civitai.info, <name>.json (if absent) and a preview."),
    refresh: bool = typer.Option(False, "--refresh", help="Re-check linked files; changes become new revisions."),
    nsfw_previews: bool = typer.Option(False, "--nsfw-previews", help="Allow R/X rated images as previews."),
    base_url: str = _BASE_URL,
    db: Path = db_option(),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per file (JSON Lines)."),
) -> None:
    """Look files up on CivitAI by SHA256 (AutoV3 for safetensors LoRAs) and store the links."""
    from ckptlab.hub import store
    from ckptlab.hub.civitai import CivitaiClient
    from ckptlab.hub.config import load_hub_config
    from ckptlab.hub.link import link_paths

    cfg = load_hub_config(base_url=base_url)
    # linking the whole catalog reads it: a mistyped --db is an error, not a new empty catalog; named files
    # are catalogued first, so then the catalog may be created
    with store.open_catalog(db, must_exist=not paths) as cat, CivitaiClient(cfg) as client, \
            progress_phases(not json_out) as phase:
        report = link_paths(cat, client, expand_paths(paths) if paths else None, named=[Path(p) for p in paths or []],
                            refresh=refresh, write_sidecars=write_sidecars, allow_nsfw=nsfw_previews,
                            progress=phase("linking", unit_bytes=False),
                            hash_progress=phase("cataloguing", unit_bytes=True))
    for o in report.outcomes:
        if json_out:
            emit_json(o)
            continue
        what = f"{o.model_name or '?'} / {o.version_name or '?'} (version {o.version_id})" if o.version_id else ""
        line = f"{o.status:10} {o.path}"
        if what:
            line += f"  ->  {what}"
        if o.matched_by and o.status in ("linked", "inherited"):
            line += f" [{o.matched_by}]"
        if o.message:
            line += f"  ({o.message})"
        if o.sidecars:
            line += f"  wrote {', '.join(o.sidecars)}"
        _out(line)
    if not json_out:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(report.counts().items())) or "no files"
        _note(f"{len(report.outcomes)} files: {counts}")
    if any(o.status == "error" for o in report.outcomes):  # each said in its row; the others were linked
        raise typer.Exit(1)


def civitai_show(
    target: str = typer.Argument(..., help="A model file, or its SHA256."),
    db: Path = db_option(),
    json_out: bool = typer.Option(False, "--json", help="JSON output."),
) -> None:
    """Show a file's CivitAI link and every stored revision of its version record."""
    from ckptlab.hub import store
    from ckptlab.hub.link import link_record

    with store.open_catalog(db) as cat:
        out = link_record(cat, target)
    link, revs = out["link"], out["revisions"]
    if json_out:
        emit_json(out)
        return
    v = out["latest"] if isinstance(out["latest"], dict) else {}
    m = v.get("model") if isinstance(v.get("model"), dict) else {}
    _out(f"{m.get('name')} / {v.get('name')}  model {link.model_id} version "
         f"{link.version_id}  [{link.matched_by}{', from ' + link.inherited_from[:12] if link.inherited_from else ''}]"
         f"  upstream: {link.upstream_status}")
    words = v.get("trainedWords")
    if isinstance(words, list) and words:
        _out("trigger words: " + ", ".join(str(w) for w in words))
    _out(f"{len(revs)} stored revision(s)")


def civitai_info_cmd(
    source: str = typer.Argument(..., help="civitai:ID, civitai:model/ID, a civitai.com URL or an AIR."),
    base_url: str = _BASE_URL,
    db: Path = db_option(),
    json_out: bool = typer.Option(False, "--json", help="JSON output."),
) -> None:
    """Look before you download: popularity, license, files and hashes, trigger words, previews,
    and which files the catalog already holds."""
    from ckptlab.display import human_size
    from ckptlab.hub.config import load_hub_config
    from ckptlab.hub.fetch import describe, mark_local_copies

    info = describe(source, config=load_hub_config(base_url=base_url))
    mark_local_copies(info, db)
    if json_out:
        emit_json(info)
        return
    out = _out

    out(f"{info.model_name} / {info.version_name}  ({info.type}, {info.base_model})  model {info.model_id} "
        f"version {info.version_id}" + (f"  [{info.mode}]" if info.mode else ""))
    out(f"by {info.creator or '?'}  downloads {info.downloads if info.downloads is not None else '?'}  "
        f"thumbs up {info.thumbs_up if info.thumbs_up is not None else '?'}" + ("  NSFW" if info.nsfw else ""))
    if info.license:
        out("license: " + ", ".join(f"{k}={v}" for k, v in info.license.items()))
    if info.trained_words:
        out("trigger words: " + ", ".join(info.trained_words))
    for f in info.files:
        size = human_size(f.size_bytes) if f.size_bytes is not None else "size ?"
        out(f"  file {f.id}: {f.name}  {size}  {f.type or ''} {f.format or ''} {f.fp or ''}"
            f"{'  primary' if f.primary else ''}  sha256 {f.sha256 or 'not published'}  "
            f"scans: pickle {f.pickle_scan or '?'}, virus {f.virus_scan or '?'}")
        for local in f.local_paths:
            out(f"    in the library: {local}")
    for i in info.images:
        out(f"  image (nsfw level {i['nsfw_level']}): {i['url']}")


def download_cmd(
    sources: list[str] = typer.Argument(..., help="civitai:ID | civitai:model/ID | URL | hf:ORG/REPO/PATH\\[@REV]"),
    dest: Path = typer.Option(None, "--dir", help="Library/install root (config \\[download] dir, else the current folder)."),
    layout: str = typer.Option(None, "--layout", help="auto | a1111 | comfyui | flat (default auto: from the folders present)."),
    model_type: str = typer.Option(None, "--type", help="Folder type for URL/hf sources (lora, checkpoint, vae...)."),
    file_id: int = typer.Option(None, "--file-id", help="CivitAI files[].id to take instead of the primary file."),
    jobs: int = typer.Option(None, "--jobs", "-j", help="Parallel downloads (capped at 4; default from config, 2)."),
    write_sidecars: bool = typer.Option(False, "--write-sidecars", help="Also write CivitAI sidecars and a preview."),
    no_catalog: bool = typer.Option(False, "--no-catalog", help="Do not catalog or link the downloaded files."),
    base_url: str = _BASE_URL,
    db: Path = db_option(),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per download."),
) -> None:
    """Download into the library: resumable (.part + Range), SHA256-verified, then catalogued."""
    from ckptlab.cli.common import error_line
    from ckptlab.errors import CkptlabError
    from ckptlab.hub.config import load_hub_config
    from ckptlab.hub.fetch import download_many

    cfg = load_hub_config(base_url=base_url, download_dir=dest, layout=layout, max_concurrent=jobs)
    with progress_bar("downloading", enabled=not json_out) as cb:
        results = download_many(sources, jobs=jobs, progress=cb, config=cfg, dest=dest, layout=layout,
                                model_type=model_type, catalog=not no_catalog, write_sidecars=write_sidecars,
                                file_id=file_id, db=db)
    failed = None
    for src, r in zip(sources, results, strict=True):
        if isinstance(r, CkptlabError):
            failed = failed or r
            if json_out:
                emit_json({"source": src, "error": str(r)})
            else:
                error_line(f"{src if len(src) <= 100 else src[:100] + '…'}: {r}")
            continue
        if json_out:
            emit_json(r)
            continue
        state = "already there" if r.skipped else (f"resumed at {r.resumed_from} B" if r.resumed_from else "downloaded")
        check = "sha256 verified" if r.expected_sha256 else "size checked (no published hash)"
        _out(f"{r.path}  {r.size} B  {state}, {check}")
        if r.extra.get("warning"):
            warning_line(r.extra["warning"])
    if failed is not None:
        raise typer.Exit(max(r.exit_code for r in results if isinstance(r, CkptlabError)))  # the worst failure


def register(app) -> None:
    civitai = typer.Typer(help="Link library files to CivitAI and manage their metadata.", no_args_is_help=True)
    civitai.command("link")(civitai_link)
    civitai.command("show")(civitai_show)
    civitai.command("info")(civitai_info_cmd)
    app.add_typer(civitai, name="civitai")
    app.command("download")(download_cmd)
