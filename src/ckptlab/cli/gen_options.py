"""The options ``generate`` and ``grid`` share, declared once: in ``cmd_generate.generate_cmd``'s signature.

``with_generate_options(own)`` builds a command whose parameters are ``own`` plus every option of ``generate``
except those it names as its own (the same typer ``Option`` objects, so help texts and defaults cannot drift).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

#: generate's parameters that are generate's alone (its MODEL argument, --count, -o)
NOT_SHARED = ("model", "count", "output")


def generate_options(exclude: tuple[str, ...] = NOT_SHARED) -> list[inspect.Parameter]:
    """``generate``'s option parameters (annotations evaluated), less ``exclude``."""
    from ckptlab.cli.cmd_generate import generate_cmd

    sig = inspect.signature(generate_cmd, eval_str=True)
    return [p for n, p in sig.parameters.items() if n not in exclude]


def with_generate_options(fn: Callable, own: Callable, *, after: tuple[str, ...] = (),
                          exclude: tuple[str, ...] = ()) -> Callable:
    """``fn`` (called with keyword arguments) given the signature of ``own``'s parameters, then generate's
    shared options (less ``exclude``), then the parameters (own or shared) named in ``after`` (help order)."""
    mine = dict(inspect.signature(own, eval_str=True).parameters)
    shared = {p.name: p for p in generate_options(NOT_SHARED + exclude) if p.name not in mine}
    every = {**mine, **shared}
    first = [p for n, p in mine.items() if n not in after]
    middle = [p for n, p in shared.items() if n not in after]
    last = [every[n] for n in after]
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in (*first, *middle, *last)]
    fn.__signature__ = inspect.Signature(params)
    return fn


def settings_from(kw: dict, prompt: str):
    """``(Settings, [(LoRA path, strength)])`` from generate's shared options as a command received them."""
    from ckptlab.imaging.render import Settings, parse_lora, parse_size

    width, height = parse_size(kw["size"]) if kw.get("size") else (None, None)
    settings = Settings(prompt, kw["negative"], kw["seed"], kw["steps"], kw["cfg"], width, height, kw["sampler"],
                        kw["schedule"], kw["clip_skip"], kw.get("refiner_switch", 0.8))
    return settings, [parse_lora(v) for v in kw.get("lora") or ()]


def compute_dtype(kw: dict) -> str | None:
    """The compute dtype option's value (``--precision``; ``--dtype`` is its hidden alias)."""
    return next((kw[n] for n in ("precision", "dtype") if n in kw), None)
