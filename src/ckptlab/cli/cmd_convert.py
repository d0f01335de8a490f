"""``ckptlab convert IN... [-o OUT | --out-dir DIR]``: pickles to ``.safetensors``, streamed.

Exit status: 0 when every input was converted; 4 when an input is refused as malicious or
suspicious (nothing is written); 1 for other errors (unreadable input, existing output...).
"""

from __future__ import annotations

from pathlib import Path

import typer

from ckptlab.cli.common import db_option


def convert_cmd(
    inputs: list[str] = typer.Argument(..., help="Pickle model files (.ckpt .pt .pth .bin) or folders."),
    output: Path = typer.Option(None, "--output", "-o", help="Output file (one input only)."),
    out_dir: Path = typer.Option(None, "--out-dir", help="Folder for the outputs (default: next to each input)."),
    allow_suspicious: bool = typer.Option(False, "--allow-suspicious",
                                          help="Convert files `ckptlab check` calls suspicious (never malicious)."),
    drop_ema: bool = typer.Option(False, "--drop-ema", help="Leave out the EMA weights (model_ema.*)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check and plan only; write nothing."),
    json_out: bool = typer.Option(False, "--json", help="JSON Lines: one object per converted file."),
    db: Path = db_option(),
) -> None:
    """Convert legacy pickle checkpoints to .safetensors without executing anything in them.

      ckptlab convert model.ckpt -o model.safetensors
    """
    from rich.markup import escape

    from ckptlab.cli.common import console, emit_json, err_console, expand_inputs, progress_bar
    from ckptlab.display import human_size
    from ckptlab.library.catalog import hash_cache
    from ckptlab.ops.convert import convert

    paths = expand_inputs(inputs, suffixes=(".ckpt", ".pt", ".pth", ".bin"), what="pickle files (.ckpt .pt .pth .bin)")
    with progress_bar("converting", enabled=not json_out) as cb:
        results = convert(paths, output, out_dir, allow_suspicious=allow_suspicious, drop_ema=drop_ema,
                          overwrite=overwrite, dry_run=dry_run, progress=cb, cache=hash_cache(db))
    for r in results:
        if json_out:
            emit_json(r)
            continue
        verb = "would write" if r.dry_run else "wrote"
        console.print(f"{escape(str(r.input))} -> {verb} [bold]{escape(str(r.output))}[/] "
                      f"[dim]({r.tensors_out} tensors, {human_size(r.bytes_out)})[/]",
                      soft_wrap=True, highlight=False)
        for d, n in r.dropped.items():
            console.print(f"  [dim]dropped {n} {d} entr{'y' if n == 1 else 'ies'}[/]", highlight=False)
        for w in r.warnings:
            err_console.print(f"  [yellow]warning:[/] {escape(w)}", soft_wrap=True, highlight=False)


def register(app) -> None:
    app.command("convert")(convert_cmd)
