"""``ckptlab lora convert``: rename a LoRA into kohya, PEFT, diffusers or ComfyUI naming (``ckptlab.lora.convert``)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(group) -> None:
    @group.command("convert")
    def convert_cmd(
        lora: Path = typer.Argument(..., help="LoRA file (.safetensors)"),
        to: str = typer.Option(..., "--to", help="naming style: kohya, peft, diffusers or comfy"),
        output: Path = typer.Option(..., "-o", "--output", help="output .safetensors"),
        family: str = typer.Option(None, "--family", help="model family when the LoRA does not say (sd1, sd2, "
                                                          "sdxl, flux, sd3)"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output"),
        dry_run: bool = typer.Option(False, "--dry-run", help="plan and check, write nothing"),
        as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
    ) -> None:
        """Convert a LoRA between naming styles; tensors are copied raw wherever the layouts allow
        (Flux/SD3 fused q/k/v are split or fused exactly)."""
        from ckptlab.cli.common import emit_json, progress_bar
        from ckptlab.lora.convert import convert

        with progress_bar("convert", enabled=not (as_json or dry_run)) as progress:
            res = convert(lora, output, to=to.lower(), overwrite=overwrite, dry_run=dry_run, family=family,
                          progress=progress)
        if as_json:
            emit_json(res.to_dict())
            return
        what = "would write" if dry_run else "wrote"
        extra = []
        if res.split:
            extra.append(f"{res.split} fused module(s) split")
        if res.fused:
            extra.append(f"{res.fused} fused from parts (rank grows)")
        tail = f" ({'; '.join(extra)})" if extra else ""
        typer.echo(f"{what} {res.output}: {res.modules_out} {res.style} modules from {res.modules_in} "
                   f"({res.family}){tail}")
