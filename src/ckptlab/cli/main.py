"""The ``ckptlab`` entry point. Each command group lives in its own ``cmd_*`` module with a
``register(app)`` function; this module only assembles them and maps errors to one line and an
exit code (no user-caused error ever prints a traceback)."""

from __future__ import annotations

import os
import sys

import typer

from ckptlab.errors import CkptlabError

app = typer.Typer(
    name="ckptlab",
    help="Identify, check, organise, transform and merge Stable Diffusion model files.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

_COMMAND_MODULES = (
    "cmd_inspect", "cmd_check", "cmd_convert", "cmd_library", "cmd_transform", "cmd_merge", "cmd_hub",
)


def _register_all() -> None:
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(f"ckptlab.cli.{name}").register(app)


@app.callback(invoke_without_command=True)
def _root(ctx: typer.Context, version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        from ckptlab import __version__

        typer.echo(f"ckptlab {__version__}")
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


_register_all()


def _during_interrupt(e: BaseException) -> bool:
    """Whether ``e`` was raised while a Ctrl-C unwound the stack. A KeyboardInterrupt that lands inside
    ``threading.Condition.wait`` (waiting on a worker) can surface as "RuntimeError: release unlocked
    lock" with the interrupt as its context; that is still the user's Ctrl-C, not an internal error."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, KeyboardInterrupt):
            return True
        e = e.__context__
    return False


def main(argv: list[str] | None = None) -> None:
    from ckptlab.cli.common import error_line

    try:
        rv = app(args=argv, prog_name="ckptlab", standalone_mode=False)
        if rv == 130:  # typer returns Ctrl-C as a silent exit code 130 (non-standalone mode)
            error_line("interrupted; no output was left half-written")
    except typer.Exit as e:
        rv = e.exit_code
    except typer.Abort:
        error_line("aborted")
        rv = 130
    except typer.TyperException as e:  # usage errors: typer's own message and exit code 2
        if hasattr(e, "show"):
            e.show()
        else:
            error_line(e.format_message())
        rv = e.exit_code
    except CkptlabError as e:
        error_line(str(e))
        rv = e.exit_code
    except KeyboardInterrupt:
        error_line("interrupted; no output was left half-written")
        rv = 130
    except BrokenPipeError:
        sys.stderr.close()
        rv = 0
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if _during_interrupt(e):
            error_line("interrupted; no output was left half-written")
            sys.exit(130)
        if os.environ.get("CKPTLAB_DEBUG"):
            raise
        error_line(f"internal error: {type(e).__name__}: {e} (set CKPTLAB_DEBUG=1 for a traceback)")
        rv = 70
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
