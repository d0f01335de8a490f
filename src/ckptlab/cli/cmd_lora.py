"""``ckptlab lora …``: bake, extract, resize, merge, convert and info (docs/lora.md).

The group is assembled here; each command lives in its own ``lora_*`` module (options parsed by typer, one
call into ``ckptlab.lora``, output formatted) and is added by that module's ``register(group)``.
"""

from __future__ import annotations

import typer

#: the modules whose ``register(group)`` add the ``lora`` sub-commands, in help order
_LORA_MODULES = ("lora_bake", "lora_svd", "lora_convert", "lora_info")


def register(app) -> None:
    import importlib

    group = typer.Typer(help="Bake, extract, resize, merge, convert and explain LoRAs (streaming).",
                        no_args_is_help=True)
    for name in _LORA_MODULES:
        mod = importlib.import_module(f"ckptlab.cli.{name}")
        mod.register(group)
    app.add_typer(group, name="lora")
