"""``ckptlab lora convert``: rename a LoRA into kohya, PEFT, diffusers or ComfyUI naming (``ckptlab.lora.convert``)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ckptlab.cli.common import db_option


class Style(str, Enum):
    """``lora convert --to`` (``ckptlab.lora.naming.STYLES``): an unknown value is a usage error (exit 2)."""

    kohya = "kohya"
    peft = "peft"
    diffusers = "diffusers"
    comfy = "comfy"


def register(group) -> None:
    @group.command("convert")
    def convert_cmd(
        lora: Path = typer.Argument(..., help="The LoRA file (.safetensors)."),
        to: Style = typer.Option(..., "--to", case_sensitive=False, help="Naming style to write."),
        output: Path = typer.Option(..., "-o", "--output", help="Output LoRA (.safetensors)."),
        family: Optional[str] = typer.Option(None, "--family", help="Model family when the LoRA does not say "
                                                                    "(sd1, sd2, sdxl, flux, sd3)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace the output if it exists."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Plan and check only; write nothing."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
        db: Optional[Path] = db_option(),
    ) -> None:
        """Convert a LoRA between naming styles; tensors are copied raw wherever the layouts allow
        (Flux/SD3 fused q/k/v are split or fused exactly).

          ckptlab lora convert flux-lora.safetensors --to diffusers -o flux-lora-diffusers.safetensors
        """
        from ckptlab.cli.common import emit_json, progress_bar
        from ckptlab.library.catalog import hash_cache
        from ckptlab.lora.combine import count
        from ckptlab.lora.convert import convert

        with progress_bar("convert", enabled=not (as_json or dry_run)) as progress:
            res = convert(lora, output, to=to.value, overwrite=overwrite, dry_run=dry_run, family=family,
                          progress=progress, cache=hash_cache(db))
        if as_json:
            emit_json(res.to_dict())
            return
        what = "would write" if dry_run else "wrote"
        extra = []
        if res.split:
            extra.append(f"{count(res.split, 'fused module')} split")
        if res.fused:
            grown = "" if not res.rank_grown else ", rank grows" if res.rank_grown == res.fused else \
                f", rank grows in {res.rank_grown}"
            extra.append(f"{res.fused} fused from parts{grown}")
        tail = f" ({'; '.join(extra)})" if extra else ""
        typer.echo(f"{what} {res.output}: {res.modules_out} {res.style} "
                   f"{'module' if res.modules_out == 1 else 'modules'} from {res.modules_in} ({res.family}){tail}")
