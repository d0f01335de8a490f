"""The ``ckptlab`` entry point. Each command group lives in its own ``cmd_*`` module: its commands are
module-level functions (options parsed by typer, one library call, output formatted), and its
``register(app)`` adds each with ``app.command(NAME)(function)`` (a sub-group: a ``typer.Typer`` built
there the same way). This module only assembles them and maps errors to one line and an exit code (no
user-caused error ever prints a traceback)."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import get_args, get_origin

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from ckptlab.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, CkptlabError

# --------------------------------------------------------------------------- one CLI language
# Help shows plain flags: typer 0.2x renders every parameter's Python type (``--json <bool>``,
# ``inputs... <list[str]>``, ``{inputs}...``). The classes below render flags bare, options with a classic
# upper-case value name (TEXT, PATH, keep|drop|use) and arguments in upper case; they are applied to every
# command in ``_plain_everywhere`` so the command modules need no change.

#: argument names shown in help and usage (the Python parameter names differ between modules)
ARGUMENT_NAMES = {"paths": "PATH", "inputs": "PATH", "roots": "ROOT", "models": "MODEL", "sources": "SOURCE"}

#: spellings unified across commands: (command path, old option) -> new spellings shown first. The old
#: spelling keeps working but is left out of the help (a hidden alias); entries whose old spelling a
#: command no longer has are ignored.
OPTION_ALIASES: dict[tuple[str, str], tuple[str, ...]] = {
    ("apply-plan", "--catalog"): ("--db",),      # every other catalog command says --db
    ("scan", "--workers"): ("--jobs", "-j"),       # download says --jobs/-j for "how many files at once"
    ("merge", "--dtype"): ("--precision",),      # prune and to-diffusers say --precision for the output dtype
    ("generate", "--dtype"): ("--precision",),   # the issue's --dtype keeps working; help says --precision
    ("preview", "--dtype"): ("--precision",),    # the compute dtype; one spelling with merge/prune
    ("grid", "--dtype"): ("--precision",),       # grid takes generate's options
}

_VALUE_NAMES = {int: "INTEGER", float: "FLOAT", str: "TEXT"}


def _value_name(param: TyperOption) -> str:
    desc = param.type_descriptor
    if desc.is_choice:
        return "|".join(str(getattr(c, "value", c)) for c in desc.choices or ())
    if desc.is_path:
        return "PATH"
    ann = desc.annotation
    if get_origin(ann) is list and get_args(ann):
        ann = get_args(ann)[0]
    return _VALUE_NAMES.get(ann, "VALUE")


class PlainOption(TyperOption):
    """A flag shows no type; an option with a value shows a classic value name."""

    hidden_opts: frozenset[str] = frozenset()

    def display_type_rich(self, ctx):
        if self.is_flag or self.count:
            return None
        if self.metavar is not None:
            return self.metavar
        return _value_name(self) + ("..." if self.nargs != 1 else "")


class PlainArgument(TyperArgument):
    """An argument is shown by its upper-case name (``PATH...``), without a type."""

    @property
    def display_name_raw(self) -> str:
        if self.metavar is not None:
            return self.metavar
        return ARGUMENT_NAMES.get(self.name, self.name.upper())

    def display_type_rich(self, ctx):
        return None

    def _usage_display_name(self) -> str:
        name = self.display_name_raw + ("..." if self.nargs != 1 else "")
        return name if self.required else f"[{name}]"


def _plain_params(command, path: str) -> None:
    for p in command.params:
        if type(p) is TyperOption:
            p.__class__ = PlainOption
        elif type(p) is TyperArgument:
            p.__class__ = PlainArgument
        if isinstance(p, PlainOption):
            for old in [o for o in p.opts if (path, o) in OPTION_ALIASES]:
                new = [n for n in OPTION_ALIASES[(path, old)] if n not in p.opts]
                p.opts[:] = [*new, *p.opts]
                p.hidden_opts = p.hidden_opts | {old}


@contextlib.contextmanager
def _aliases_hidden(params):
    """Help lists each option's spellings from ``opts``; leave the hidden aliases out while it renders."""
    saved = [(p, list(p.opts)) for p in params if getattr(p, "hidden_opts", None)]
    try:
        for p, opts in saved:
            p.opts[:] = [o for o in opts if o not in p.hidden_opts]
        yield
    finally:
        for p, opts in saved:
            p.opts[:] = opts


class _PlainMixin:
    def _plain(self, path: str) -> None:
        _plain_params(self, path)

    def get_help_option(self, ctx):
        opt = super().get_help_option(ctx)
        if opt is not None and type(opt) is TyperOption:
            opt.__class__ = PlainOption
        return opt

    def format_help(self, ctx, formatter):
        with _aliases_hidden(self.get_params(ctx)):
            return super().format_help(ctx, formatter)


class PlainCommand(_PlainMixin, TyperCommand):
    pass


class PlainGroup(_PlainMixin, TyperGroup):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._plain(self.name or "")
        for name, sub in self.commands.items():  # commands are built before their group
            if isinstance(sub, _PlainMixin):
                sub._plain(name if not self.name or self.name == "ckptlab" else f"{self.name} {name}")


app = typer.Typer(
    name="ckptlab",
    help="Identify, check, organise, transform and merge Stable Diffusion model files.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    cls=PlainGroup,
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every sub-command
)

_COMMAND_MODULES = (
    "cmd_inspect", "cmd_check", "cmd_convert", "cmd_library", "cmd_transform", "cmd_merge", "cmd_hub", "cmd_lora",
    "cmd_generate", "cmd_grid", "cmd_preview", "cmd_images", "cmd_serve",
)


def _register_all() -> None:
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(f"ckptlab.cli.{name}").register(app)


@app.callback(invoke_without_command=True)
def _root(ctx: typer.Context, version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        from ckptlab.version import __version__

        typer.echo(f"ckptlab {__version__}")
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


def _plain_everywhere(typer_app: typer.Typer) -> None:
    """Every command and sub-group of ``typer_app`` renders its help through the plain classes."""
    for info in typer_app.registered_commands:
        if info.cls is None or info.cls is TyperCommand:
            info.cls = PlainCommand
    for group in typer_app.registered_groups:
        if not (isinstance(group.cls, type) and issubclass(group.cls, PlainGroup)):
            group.cls = PlainGroup
        _plain_everywhere(group.typer_instance)


_register_all()
_plain_everywhere(app)


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


def _usage_message(e: Exception) -> str:
    """typer's message for a usage error, and where the help is (typer printed three to five lines: the
    usage, a hint and the error - and only the error when the context was already gone)."""
    msg = e.format_message() if hasattr(e, "format_message") else str(e)
    ctx = getattr(e, "ctx", None)
    if ctx is not None:
        msg = f"{msg.rstrip('.')} (see '{ctx.command_path} -h')"
    return msg


def _stdout_pipe_closed_by_typer() -> bool:
    # by name: typer may use its own vendored copy of click (typer._click), a different class object
    return type(sys.stdout).__name__ in ("PacifyFlushWrapper", "_PacifyFlushWrapper")


def _stdout_to_devnull() -> None:
    """After EPIPE on stdout, point file descriptor 1 at /dev/null (as Python's docs on SIGPIPE advise), so
    the flush at interpreter exit cannot fail again and print "Exception ignored ... BrokenPipeError"."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.__stdout__.fileno())
        os.close(devnull)
    except (OSError, AttributeError, ValueError):
        pass


def main(argv: list[str] | None = None) -> None:
    from ckptlab.cli.common import StdoutClosed, error_line

    try:
        try:
            rv = app(args=argv, prog_name="ckptlab", standalone_mode=False)
        except SystemExit:
            # typer catches an OSError(EPIPE) from a command itself and calls sys.exit(1) after wrapping
            # sys.stdout in click's PacifyFlushWrapper: that is a closed pipe, not a failure
            if _stdout_pipe_closed_by_typer():
                raise StdoutClosed() from None
            raise
        if rv == EXIT_INTERRUPTED:  # typer returns Ctrl-C as a silent exit code 130 (non-standalone mode)
            error_line("interrupted; no output was left half-written")
    except typer.Exit as e:
        rv = e.exit_code
    except typer.Abort:
        error_line("aborted")
        rv = EXIT_INTERRUPTED
    except typer.TyperException as e:  # usage errors: one line, typer's message, exit code 2
        if type(e).__name__ == "NoArgsIsHelpError":  # a group called without a command: its help
            e.show()
        else:
            error_line(_usage_message(e))
        rv = getattr(e, "exit_code", 2)
    except CkptlabError as e:
        error_line(str(e))
        rv = e.exit_code
    except KeyboardInterrupt:
        error_line("interrupted; no output was left half-written")
        rv = EXIT_INTERRUPTED
    except (BrokenPipeError, StdoutClosed):
        _stdout_to_devnull()
        rv = 0
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if _during_interrupt(e):
            error_line("interrupted; no output was left half-written")
            sys.exit(EXIT_INTERRUPTED)
        if os.environ.get("CKPTLAB_DEBUG"):
            raise
        error_line(f"internal error: {type(e).__name__}: {e} (set CKPTLAB_DEBUG=1 for a traceback)")
        rv = EXIT_INTERNAL
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
