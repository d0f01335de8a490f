"""Merge blocks: which block a key belongs to, and per-block parameter values.

Block names follow supermerger (and sd-mecha's ``*-supermerger_blocks`` configs); each family's record holds
its own (``Family.merge_blocks``, built by ``arch.family.unet_blocks``):

- SD1 / SD2: 26 names ``BASE, IN00..IN11, M00, OUT00..OUT11``
- SDXL: 20 names ``BASE, IN00..IN08, M00, OUT00..OUT08``
- any other family: one ``BASE`` block

Key -> block (supermerger's rules, checked in this order; see docs/merge.md for where tools disagree):
``time_embed`` / ``label_emb`` -> IN00; ``model.diffusion_model.out.`` -> last OUT block;
``input_blocks.N`` -> IN{N}; ``middle_block`` -> M00; ``output_blocks.N`` -> OUT{N}; everything else
(text encoders, VAE, other diffusion-model keys) -> BASE. Diffusers UNet names map to the same blocks.

A parameter value is either a number (same everywhere) or a ``BlockValues`` (one number per block),
written as a preset name, a comma list of 26 (SD1/SD2) or 20 (SDXL) numbers with BASE first, or
``NAME=V`` pairs where NAME is a block or a group (``IN``, ``OUT``, ``M``/``MID``, ``BASE``). Nothing here
imports torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ckptlab.arch.families import FAMILIES, display_name, get
from ckptlab.arch.family import unet_blocks
from ckptlab.errors import BlockSpecError

#: the two UNet block layouts (12 and 9 input/output blocks)
SD1_BLOCKS: tuple[str, ...] = unet_blocks(12)
SDXL_BLOCKS: tuple[str, ...] = unet_blocks(9)


def _family_blocks(family: str | None) -> tuple[str, ...] | None:
    fam = get(family)
    return fam.merge_blocks if fam and fam.merge_blocks else None


def blocks_for(family: str | None) -> tuple[str, ...]:
    return _family_blocks(family) or ("BASE",)


def _n_out(names: tuple[str, ...]) -> int:
    return sum(1 for b in names if b.startswith("OUT"))


_DM = "model.diffusion_model."
_LDM_RE = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.")
_DIFF_RE = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")


def block_of(key: str, family: str | None) -> str:
    """The block ``key`` belongs to for ``family`` (BASE when the family has no block layout)."""
    names = _family_blocks(family)
    if names is None:
        return "BASE"
    n_out = _n_out(names)
    if key.startswith(_DM):
        rest = key[len(_DM):]
    elif key.startswith("unet."):
        rest = key[len("unet."):]
    elif key.startswith("model_ema.") or "." not in key:
        return "BASE"
    else:
        return "BASE"
    if rest.startswith(("time_embed.", "label_emb.", "time_embedding.", "add_embedding.")):
        return "IN00"
    if rest.startswith(("out.", "conv_norm_out.", "conv_out.")):
        return f"OUT{n_out - 1:02}"
    if rest.startswith("conv_in."):
        return "IN00"
    if rest.startswith("middle_block.") or rest.startswith("mid_block."):
        return "M00"
    m = _LDM_RE.match(rest)
    if m:
        n = int(m.group(2))
        return f"IN{n:02}" if m.group(1) == "input_blocks" else f"OUT{n:02}"
    m = _DIFF_RE.match(rest)
    if m:  # diffusers: 3 slots per down level (2 layers + downsampler), 3 layers per up level
        level, kind, j = int(m.group(2)), m.group(3), int(m.group(4))
        if m.group(1) == "down_blocks":
            return f"IN{3 * level + (3 if kind == 'downsamplers' else j + 1):02}"
        return f"OUT{3 * level + (2 if kind == 'upsamplers' else j):02}"
    return "BASE"


@dataclass(frozen=True)
class BlockValues:
    """One value per block name (all names of one family's layout)."""

    values: tuple[tuple[str, float], ...]
    source: str  # the text the user wrote (kept for the recipe)

    def get(self, block: str) -> float:
        return dict(self.values)[block]

    def as_dict(self) -> dict[str, float]:
        return dict(self.values)


def _grad_a(n_in: int) -> list[float]:
    """0 at IN00 rising linearly to 1 at M00 and back to 0 at the last OUT block (25 or 19 values)."""
    up = [i / n_in for i in range(n_in)]
    return up + [1.0] + up[::-1]


def _wrap(width: int, n: int) -> list[float]:
    half = width // 2
    return [1.0 if (i < half or i >= n - half) else 0.0 for i in range(n)]


def presets(family: str | None) -> dict[str, list[float]]:
    """Named presets (values for every block except BASE), after bbc-mc's MBW / supermerger names."""
    names = blocks_for(family)
    n = len(names) - 1
    if n == 0:
        return {}
    n_in = (n - 1) // 2
    grad_a = _grad_a(n_in)
    return {
        "GRAD_A": grad_a,
        "GRAD_V": [1.0 - v for v in grad_a],
        "FLAT_25": [0.25] * n,
        "FLAT_75": [0.75] * n,
        "ALL_A": [0.0] * n,
        "ALL_B": [1.0] * n,
        "WRAP08": _wrap(8, n),
        "WRAP12": _wrap(12, n),
        "WRAP14": _wrap(14, n),
        "WRAP16": _wrap(16, n),
    }


def _group_members(name: str, names: tuple[str, ...]) -> list[str]:
    up = name.upper()
    if up in names:
        return [up]
    if up in ("IN", "OUT"):
        return [b for b in names if b.startswith(up) and b[len(up):].isdigit()]
    if up in ("M", "MID", "MIDDLE"):
        return [b for b in names if b.startswith("M") and b[1:].isdigit()]
    m = re.fullmatch(r"(IN|OUT|M|MID)(\d+)", up)
    if m:
        prefix = "M" if m.group(1) in ("M", "MID") else m.group(1)
        cand = f"{prefix}{int(m.group(2)):02}"
        if cand in names:
            return [cand]
    return []


def _num(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise BlockSpecError(f"{what}: {text!r} is not a number") from None


def param_value(value):
    """A parameter as the command line gives it (text), in the form a recipe stores it: text that is one
    number becomes that number; anything else (block weights, a preset) stays as written, for
    ``parse_value`` to read once the model family is known."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_value(value, family: str | None, *, name: str = "alpha", unnamed: float = 0.0) -> float | BlockValues:
    """A parameter value: number, block string/list/dict -> float or BlockValues for ``family``.
    ``unnamed``: the value of blocks a ``NAME=V`` string leaves out (unless it starts with a bare default)."""
    if isinstance(value, BlockValues):
        value = value.source
    if isinstance(value, bool):
        raise BlockSpecError(f"--{name}: expected a number or block weights, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    names = blocks_for(family)
    fam = family or "this model family"
    if isinstance(value, (list, tuple)):
        return _from_list([float(v) for v in value], names, family, name, str(list(value)))
    if isinstance(value, dict):
        text = ",".join(f"{k}={v}" for k, v in value.items())
        return parse_value(text, family, name=name, unnamed=unnamed)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    pre = presets(family)
    head, _, base_txt = text.partition(":") if ":" in text and "," not in text and "=" not in text else (text, "", "")
    if head.upper() in pre:
        base = _num(base_txt, f"--{name} preset base") if base_txt else 0.0
        vals = [base, *pre[head.upper()]]
        return BlockValues(tuple(zip(names, vals, strict=True)), text)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if all(("=" not in p and ":" not in p) for p in parts):
        return _from_list([_num(p, f"--{name}") for p in parts], names, family, name, text)
    # NAME=V pairs; an optional leading bare number is the default for unnamed blocks
    default = unnamed
    vals: dict[str, float] = {}
    for i, p in enumerate(parts):
        if "=" not in p and ":" not in p:
            if i != 0:
                raise BlockSpecError(f"--{name}: {p!r} must be NAME=VALUE (only the first item may be a bare default)")
            default = _num(p, f"--{name}")
            continue
        k, _, v = p.replace(":", "=", 1).partition("=")
        members = _group_members(k.strip(), names)
        if not members:
            raise BlockSpecError(f"--{name}: unknown block {k.strip()!r} for {fam} (blocks: {', '.join(names)})")
        for b in members:
            vals[b] = _num(v.strip(), f"--{name} {k.strip()}")
    full = [vals.get(b, default) for b in names]
    return BlockValues(tuple(zip(names, full, strict=True)), text)


def _from_list(vals: list[float], names: tuple[str, ...], family: str | None, name: str,
               source: str) -> float | BlockValues:
    if len(vals) == 1:
        return vals[0]
    if len(vals) == len(names):
        return BlockValues(tuple(zip(names, vals, strict=True)), source)
    if len(names) > 1 and len(names) < len(SD1_BLOCKS) == len(vals) and set(names) <= set(SD1_BLOCKS):
        # an SD1 list on an SDXL model: take the blocks SDXL has, by name (supermerger's weighttoxl)
        sd1 = dict(zip(SD1_BLOCKS, vals, strict=True))
        return BlockValues(tuple((b, sd1[b]) for b in names), source)
    if len(names) == 1:
        with_blocks = "/".join(sorted(display_name(f.id) for f in FAMILIES if f.merge_blocks))
        raise BlockSpecError(f"--{name}: block weights need an {with_blocks} model; this family takes one number")
    raise BlockSpecError(f"--{name}: {len(vals)} values given; {family} takes {len(names)} "
                         f"({names[0]}, {names[1]}..{names[-1]})")


def numbers_in(value) -> list[float]:
    """Every number written in a parameter value (number, list, dict, ``NAME=V`` / list / ``PRESET:BASE``
    text), without knowing the model family: lets a recipe's ranges be checked before any file is opened.
    Words (preset names) are skipped; ``parse_value`` reports what it cannot understand."""
    if isinstance(value, BlockValues):
        return [v for _, v in value.values]
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in numbers_in(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in numbers_in(v)]
    out = []
    for part in str(value).split(","):
        text = re.split(r"[=:]", part)[-1].strip()
        try:
            out.append(float(text))
        except ValueError:
            pass
    return out


def resolve(value: float | BlockValues, key: str, family: str | None) -> float:
    if isinstance(value, BlockValues):
        return value.get(block_of(key, family))
    return float(value)
