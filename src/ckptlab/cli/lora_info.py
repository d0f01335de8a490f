"""``ckptlab lora info LORA [--json]``: what a LoRA file is, what it adapts, how it was trained, its trigger
words and whether its ``sshs_model_hash`` matches (``ckptlab.lora.info``; docs/lora.md)."""

from __future__ import annotations

import re
from pathlib import Path

import typer

#: trigger words / unmatched modules shown in the human output (``--json`` has them all)
SHOW_TRIGGERS = 10
SHOW_UNMATCHED = 10


def _counts(d: dict) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in d.items())


def _blocks(blocks: dict[str, int]) -> str:
    """``IN01-02 ×12, IN04 ×12 …`` style: consecutive blocks of one kind and count joined into a range."""
    runs: list[list] = []  # [prefix, first, last, count, width]
    for b, n in blocks.items():
        m = re.match(r"^(IN|OUT|double |single |joint )(\d+)$", b)
        if m is None:
            runs.append([b, None, None, n, 0])
            continue
        prefix, num = m.group(1), int(m.group(2))
        last = runs[-1] if runs else None
        if last and last[0] == prefix and last[2] is not None and last[2] == num - 1 and last[3] == n:
            last[2] = num
        else:
            runs.append([prefix, num, num, n, len(m.group(2))])
    parts = []
    for prefix, first, last, n, width in runs:
        if first is None:
            parts.append(f"{prefix} ×{n}")
        elif first == last:
            parts.append(f"{prefix}{first:0{width}d} ×{n}")
        else:
            parts.append(f"{prefix}{first:0{width}d}-{last:0{width}d} ×{n} each")
    return ", ".join(parts)


def render(r) -> list[str]:
    """The human summary of a ``LoraInfo`` (every value from the file made printable)."""
    from ckptlab.display import human_size, printable

    p = printable
    out = [p(r.path)]
    out.append(f"  format: {r.kind}; naming: {_counts(r.styles)}; algorithms: {_counts(r.algos)}")
    fam = r.family_name or "not recognised"
    srcs = ", ".join(f"{k}: {v or '?'}" for k, v in r.family_from.items())
    out.append(f"  family: {fam} (from {srcs})")
    if r.family_note:
        out.append(f"    {p(r.family_note)}")
    if r.base_model:
        out.append("  base model: " + p("; ".join(f"{k} = {v}" for k, v in r.base_model.items())))

    def dist(value, counts: dict) -> str:
        return str(value) if value != "Dynamic" else f"Dynamic ({_counts(counts)})"

    out.append(f"  rank: {dist(r.rank if r.rank is not None else '-', r.ranks)}; "
               f"alpha: {dist(r.alpha if r.alpha is not None else 'none (scale 1)', r.alphas)}; "
               f"α/r: {next(iter(r.scales)) if len(r.scales) == 1 else 'Dynamic (' + _counts(r.scales) + ')'}")
    comps = []
    for c, n in r.components.items():
        label = {"unet": "UNet", "dit": "DiT"}.get(c, c)
        if c in r.text_encoders:
            label += f" ({r.text_encoders[c]})"
        comps.append(f"{label} {n}")
    out.append(f"  modules: {r.modules} ({', '.join(comps)})" + (f"; {r.extras} other keys" if r.extras else ""))
    if r.blocks:
        out.append("  blocks: " + _blocks(r.blocks))
    out.append(f"  conv modules (LoCon): {'yes, ' + str(r.conv_modules) if r.conv_modules else 'no'}")
    if r.unmatched is None:
        out.append(f"  unmatched modules: not checked (no reference layout for {r.family_name or 'this family'})")
    elif r.unmatched_total:
        shown = ", ".join(p(n) for n in r.unmatched[:SHOW_UNMATCHED])
        more = r.unmatched_total - min(SHOW_UNMATCHED, len(r.unmatched))
        out.append(f"  unmatched modules: {r.unmatched_total}: {shown}" + (f" … {more} more" if more > 0 else ""))
    else:
        out.append("  unmatched modules: none")
    if r.training:
        out.append("  training:")
        for k, v in r.training.items():
            out.append(f"    {k.removeprefix('ss_')}: {p(v)}")
    for d in r.datasets[:10]:
        imgs = d["img_count"] if d["img_count"] is not None else "?"
        reps = d["n_repeats"] if d["n_repeats"] is not None else "?"
        out.append(f"    dataset {p(d['folder'])}: {imgs} images × {reps} repeats")
    if r.triggers:
        words = []
        for t in r.triggers[:SHOW_TRIGGERS]:
            src = ", ".join(f"{x} {t.count}" if x == "tag frequency" and t.count else x for x in t.sources)
            words.append(f"{p(t.word)} ({src})")
        out.append("  trigger words: " + "; ".join(words))
    else:
        out.append("  trigger words: none in the metadata")
    for n in r.trigger_notes:
        out.append(f"    note: {p(n)}")
    out.append(f"  sshs_model_hash: {p(r.hash_check)}")
    out.append(f"  size: {human_size(r.size)}")
    for w in r.warnings:
        out.append(f"  warning: {p(w)}")
    return out


def info_cmd(
    lora: Path = typer.Argument(..., help="A LoRA / LyCORIS file (.safetensors; pickles are checked first)."),
    json_out: bool = typer.Option(False, "--json", help="The full record (every module too) as one JSON object."),
) -> None:
    """Explain a LoRA: naming, algorithms, family, rank/alpha, blocks covered, training, trigger words, hash.

      ckptlab lora info my_char.safetensors
      ckptlab lora info my_char.safetensors --json
    """
    from ckptlab.cli.common import console, emit_json
    from ckptlab.lora.info import info

    r = info(lora)
    if json_out:
        emit_json(r)
        return
    for line in render(r):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def register(group) -> None:
    group.command("info")(info_cmd)
