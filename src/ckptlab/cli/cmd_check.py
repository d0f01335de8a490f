"""``ckptlab check PATH...``: a safety verdict per file, without executing anything.

Exit status: 0 only when every file is ``safe``; otherwise the worst verdict decides:
3 suspicious, 4 malicious, 5 corrupt (malicious > suspicious > corrupt); 2 usage error.
"""

from __future__ import annotations

import typer

_STYLE = {"safe": "green", "suspicious": "yellow", "malicious": "bold red", "corrupt": "magenta"}


def check_cmd(
    paths: list[str] = typer.Argument(..., help="Model files or folders (searched recursively; a diffusers "
                                                "folder is checked file by file)."),
    json_out: bool = typer.Option(False, "--json", help="JSON Lines: one object per file."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also list every global and informational finding."),
    deep: bool = typer.Option(False, "--deep", help="Also read every tensor: zip record CRCs of pickles, NaN/Inf values (reads the whole file)."),
) -> None:
    """Scan pickles (.ckpt/.pt/.pth/.bin) and safetensors for hostile content: safe, suspicious, malicious or corrupt."""
    from rich.markup import escape as _escape

    from ckptlab.cli.common import console, emit_json, expand_paths
    from ckptlab.remote import expand_targets
    from ckptlab.security import VERDICT_EXIT_CODES, check_many, worst_verdict

    targets = expand_targets(paths, expand_paths)
    if not targets:  # an empty folder is not a clean bill of health
        from ckptlab.errors import CkptlabError

        raise CkptlabError("no model files found under " + ", ".join(paths))
    from ckptlab.display import one_line, printable

    def escape(text) -> str:  # file names, global names and details come from the file: no raw control chars
        return _escape(printable(text))

    verdicts = []
    for r in check_many(targets, deep=deep):
        verdicts.append(r.verdict)
        if json_out:
            emit_json(r)
            continue
        where = f"{r.format}, {r.container}" if r.container else r.format
        console.print(f"[{_STYLE[r.verdict]}]{r.verdict:<10}[/] {escape(str(r.path))} [dim]({where})[/]",
                      soft_wrap=True, highlight=False)
        for f in (r.findings if verbose else r.issues):
            loc = f" [dim]\\[{escape(f.location)}][/]" if f.location else ""
            console.print(f"  [{_STYLE.get(f.severity, 'dim')}]{f.severity}[/] {escape(f.kind)}: "
                          f"{_escape(one_line(f.detail))}{loc}", soft_wrap=True, highlight=False)
        if verbose and r.globals:
            console.print(f"  [dim]globals: {escape(', '.join(r.globals))}[/]", soft_wrap=True, highlight=False)
    raise typer.Exit(VERDICT_EXIT_CODES[worst_verdict(verdicts)])


def register(app) -> None:
    app.command("check")(check_cmd)
