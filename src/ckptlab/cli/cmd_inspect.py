"""``ckptlab inspect PATH...``: what each model file is, from its header (``ckptlab.arch.identify``).

Exit status: 0 when every path was read; otherwise the highest error exit code among the failed paths
(1 for unreadable/unsupported files, 4 for files refused as unsafe, 70 for an internal error), after reporting
every other path.
"""

from __future__ import annotations

import os

import typer

from ckptlab.display import human_size, one_line, printable


def _fmt_params(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} K"
    return str(n)


_SHOWN_METADATA = ("modelspec.title", "modelspec.architecture", "modelspec.prediction_type", "modelspec.author",
                   "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_output_name",
                   "ss_sd_model_name", "general.architecture", "format")


def render(info, console, *, all_metadata: bool = False) -> None:
    """The readable summary of one ``ModelInfo``. Everything that came from the file (its name, metadata, key names in
    evidence and warnings) goes through ``printable``: terminal escapes, carriage returns and bidi overrides are shown
    as ``\\x1b``, ``\\r``, ``\\u202e``, never sent to the terminal; evidence and warning lines are capped."""
    from rich.markup import escape

    def e(text) -> str:
        return escape(printable(text))

    def line(text) -> str:
        return escape(one_line(text))

    def out(text: str = "") -> None:
        console.print(text, soft_wrap=True, highlight=False)
    out(f"[bold]{e(info.path)}[/]  [dim]{info.format}, {human_size(info.size, precision=2)}, {info.tensors} tensors, "
                  f"{_fmt_params(info.params)} params[/]")
    what = " / ".join(x for x in (info.kind, info.family or "family unknown", info.variant) if x)
    shown_pred = info.prediction or ("unknown" if info.kind in ("checkpoint", "unet") else None)
    out(f"  [cyan]{e(what)}[/]" + (f"   prediction: [cyan]{shown_pred}[/]" if shown_pred else ""))
    if info.components:
        out(f"  components: {e(', '.join(info.components))}")
    if info.dtypes:
        out("  dtypes: " + ", ".join(f"{e(k)} {_fmt_params(v)}" for k, v in info.dtypes.items()))
    flags = [f"EMA {'yes' if info.has_ema else 'no'}", f"training state {'yes' if info.training_state else 'no'}",
             "pruned" if info.pruned else "not pruned"]
    out("  " + ", ".join(flags))
    if info.vram:
        v = info.vram
        where = f" at {v.resolution}x{v.resolution}" if v.resolution else ""
        gib = f"{v.gib:.1f}" if v.gib >= 1 else f"{v.gib:.2f}"
        out(f"  VRAM estimate: ~{gib} GiB{where} [dim](weights {v.weights_gib:.2f}, working "
                      f"{v.working_gib:.2f}, reserve {v.reserve_gib:.1f})[/]")
    for text in info.evidence:
        out(f"  [dim]- {line(text)}[/]")
    for text in info.warnings:
        out(f"  [yellow]warning:[/] {line(text)}")
    if info.metadata:
        keys = list(info.metadata) if all_metadata else [k for k in _SHOWN_METADATA if k in info.metadata]
        rest = len(info.metadata) - len(keys)
        for k in keys:
            v = info.metadata[k]
            text = v if isinstance(v, str) else __import__("json").dumps(v)
            text = printable(text if all_metadata else text[:400])  # a value may be megabytes: cut before escaping
            if len(text) > 100 and not all_metadata:
                text = text[:97] + "..."
            out(f"  [dim]{e(k)}:[/] {escape(text)}")
        if rest > 0:
            out(f"  [dim]({rest} more metadata keys; --metadata shows them)[/]")
    out()


def inspect_cmd(
    paths: list[str] = typer.Argument(..., metavar="PATH",
                                      help="Model files, folders (searched recursively) or globs."),
    json_out: bool = typer.Option(False, "--json", help="JSON Lines: one object per path, in order."),
    metadata: bool = typer.Option(False, "--metadata", help="Show every metadata key in the summary."),
    heuristics: bool = typer.Option(False, "--heuristics",
                                    help="Also apply rules that read a tensor (SD2 v/eps by ComfyUI's rule)."),
) -> None:
    """Identify model files from their headers: kind, family, variant, prediction, components, VRAM."""
    from ckptlab.arch.identify import identify
    from ckptlab.cli.common import console, emit_json, error_line, expand_paths
    from ckptlab.errors import EXIT_INTERNAL, CkptlabError
    from ckptlab.remote import expand_targets

    targets = expand_targets(paths, expand_paths)
    if not targets:
        error_line("no model files found under " + ", ".join(paths))
        raise typer.Exit(1)
    worst = 0
    for p in targets:
        try:
            info = _identify(identify, p, heuristics)
        except CkptlabError as err:
            error_line(str(err) if err.path or str(err).startswith(f"{p}: ") else f"{p}: {err}")  # named once
            worst = max(worst, err.exit_code)
            if json_out:
                emit_json({"path": str(p), "error": err.message})
            continue
        except Exception as err:  # noqa: BLE001 - a bug on one file must not hide the report on the others
            if os.environ.get("CKPTLAB_DEBUG"):
                raise
            msg = f"internal error: {type(err).__name__}: {err} (set CKPTLAB_DEBUG=1 for a traceback)"
            error_line(f"{p}: {msg}")
            worst = max(worst, EXIT_INTERNAL)
            if json_out:
                emit_json({"path": str(p), "error": msg})
            continue
        if json_out:
            emit_json(info)
        else:
            render(info, console, all_metadata=metadata)
    if worst:
        raise typer.Exit(worst)


def _identify(identify, p, heuristics: bool):
    """``identify`` (a remote URL's reads share one session: the format sniff and the header cost one GET)."""
    if isinstance(p, str):
        from ckptlab.remote.reader import session

        with session():
            return identify(p, heuristics=heuristics)
    return identify(p, heuristics=heuristics)


def register(app) -> None:
    app.command("inspect")(inspect_cmd)
