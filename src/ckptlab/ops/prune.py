"""``ckptlab prune``: drop what inference does not use, streaming tensor by tensor.

Always dropped: training state (optimizer / scheduler / Lightning loop tensors). EMA (``model_ema.*``,
the LDM flattened-name copy of the UNet): ``keep`` it, ``drop`` it (the usual "pruned" file), or
``use`` it - the EMA values replace the UNet weights under the UNet names and the EMA copy goes
("pruned-emaonly", like SD1.5's ``v1-5-pruned-emaonly``). Schedule buffers and marker tensors are
kept as the field keeps them (A1111/ComfyUI recompute or read them); float ``position_ids`` are
repaired to int64 with a warning. ``precision`` converts at the same time (see ``ops.precision``).
"""

from __future__ import annotations

from pathlib import Path

from ckptlab.arch.components import ema_pairs, is_ema, split_components
from ckptlab.arch.layout import file_layout
from ckptlab.errors import BadChoiceError, MismatchError
from ckptlab.formats.base import TensorSource
from ckptlab.hashes import NO_CACHE, HashCache
from ckptlab.ops.precision import parse_only, precision_items, target_dtype
from ckptlab.ops.run import is_identity, run_each
from ckptlab.ops.stream import TransformResult
from ckptlab.progress import Progress, null_progress

EMA_CHOICES = ("keep", "drop", "use")
NOTHING_TO_PRUNE = "nothing to prune (no EMA weights or training state)"


def check_ema(ema: str, choices: tuple[str, ...] = EMA_CHOICES) -> None:
    """Refuse an unknown ``ema`` mode (one-line error) before any work."""
    if ema not in choices:
        raise BadChoiceError(f"--ema {ema!r}: use one of {', '.join(choices)}")


def pruned_keys(keys, ema: str = "drop", training=None) -> dict[str, str]:
    """``{key: "training" | "ema"}`` for the keys pruning drops: training state always (what
    ``arch.components.split_components`` calls ``training``; pass ``training`` when the keys were split
    already), every ``model_ema.*`` key (EMA weights and their ``decay``/``num_updates`` bookkeeping) unless
    ``ema == "keep"``. A pure function of the key names: the ``prune`` command and ``merge --prune`` both drop
    exactly these."""
    keys = list(keys)
    training = set(split_components(keys).get("training", ()) if training is None else training)
    out = {}
    for k in keys:
        if k in training:
            out[k] = "training"
        elif is_ema(k) and ema != "keep":
            out[k] = "ema"
    return out


def prune_plan(src: TensorSource, result: TransformResult, ema: str = "drop", precision: str | None = None,
               only: list[str] | None = None, clamp: bool = False):
    check_ema(ema)
    layout = file_layout(src)
    drop = pruned_keys(src.keys(), ema, training=layout.components.get("training", ()))
    ema_keys = {k for k in src.keys() if is_ema(k)}
    pairs: dict[str, str] = {}
    if ema == "use":
        if not ema_keys:
            raise MismatchError("--ema use: this file has no EMA weights (no model_ema.* keys)", src.path)
        pairs, missing = ema_pairs(src)
        if missing:
            raise MismatchError(f"--ema use: {len(missing)} UNet tensor(s) have no EMA copy (first: "
                                f"{missing[0]}); the EMA set is incomplete", src.path)
        for unet_key, e in pairs.items():
            a, b = src.info(unet_key), src.info(e)
            if a.shape != b.shape:
                raise MismatchError(f"--ema use: {e} is {list(b.shape)} but {unet_key} is {list(a.shape)}",
                                    src.path)
    keys: list[tuple[str, str]] = []
    dropped = {"training": 0, "ema": 0}
    for k in src.keys():
        if k in drop:
            dropped[drop[k]] += 1
        else:
            keys.append((k, pairs.get(k, k)))
    result.dropped = {k: v for k, v in dropped.items() if v}
    target = target_dtype(precision) if precision else None
    items = precision_items(src, layout, keys, target, parse_only(only), clamp, result)
    return items, {"ema": ema, "precision": precision, "clamp": clamp}


def prune_suffix(ema: str, precision: str | None) -> str:
    suffix = {"keep": "-pruned-ema", "drop": "-pruned", "use": "-pruned-emaonly"}[ema]
    return suffix + (f"-{precision.lower()}" if precision else "")


def prune(inputs: list[Path], *, ema: str = "drop", precision: str | None = None, clamp: bool = False,
          out_dir: Path | None = None, outputs: list[Path] | None = None, overwrite: bool = False,
          dry_run: bool = False, progress: Progress = null_progress, cache: HashCache = NO_CACHE,
          skip_unchanged: bool = False) -> list[TransformResult]:
    """Prune each input into ``<stem><suffix>.safetensors`` (see ``prune_suffix``).

    An input with nothing to prune (no EMA or training state to drop, no tensor to convert or repair):
    with ``skip_unchanged`` (the CLI) nothing is written for it and its result says why (``unchanged``);
    without it the output is written as a plain copy, with a warning."""
    check_ema(ema)
    # --ema keep keeps the EMA weights: only training state could have been dropped
    base = "nothing to prune (no training state; --ema keep keeps the EMA weights)" if ema == "keep" \
        else NOTHING_TO_PRUNE
    reason = base if precision is None else f"{base} or convert to {precision.lower()}"

    def one(path: Path, src: TensorSource, result: TransformResult):
        items, options = prune_plan(src, result, ema, precision, None, clamp)
        if not skip_unchanged and is_identity(src, items):
            result.warnings.append(f"{reason}; the output is a plain copy")
        return items, options, True

    return run_each(inputs, "prune", prune_suffix(ema, precision), one, out_dir=out_dir, outputs=outputs, overwrite=overwrite,
                    dry_run=dry_run, progress=progress, cache=cache, skip_unchanged=reason if skip_unchanged else None)
