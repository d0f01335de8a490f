"""``ckptlab preview``: a preview image per model, stored as ``<stem>.preview.png`` where A1111, ComfyUI's
managers and the others look for it, recorded in the catalog (``ckptlab.imaging.preview``)."""

from __future__ import annotations

from typing import Optional

import typer

from ckptlab.cli.gen_options import compute_dtype, settings_from, with_generate_options


def _own(
    models: list[str] = typer.Argument(..., help="Model files, diffusers folders, or catalog hashes / names."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The prompt (default: the model's trigger "
                                                                     "words the catalog knows, then a neutral "
                                                                     "landscape prompt)."),
    seed: int = typer.Option(42, "--seed", help="Seed (-1: random; default 42, so a preview can be made again)."),
    base: Optional[str] = typer.Option(None, "--base", help="The checkpoint a LoRA given as MODEL renders on "
                                                            "(strength 1)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing <stem>.preview.png (without it, a "
                                                            "model that has any preview is skipped)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object per model."),
) -> None:
    """(the parameters of preview that generate does not have, or has with another default)"""


def preview_cmd(**kw) -> None:
    """Render a preview for each model and store it as <stem>.preview.png next to it (the name A1111, Forge,
    ComfyUI-Lora-Manager, Civitai Helper and Stability Matrix read), with A1111's infotext, recorded in the
    catalog. A model that cannot render is reported and the others go on; the exit status is then non-zero.

      ckptlab preview models/Stable-diffusion/*.safetensors --steps 20
      ckptlab preview 6ce0161689 --prompt "a corgi on a beach" --overwrite
    """
    from ckptlab.cli.common import console, emit_json, error_line, progress_bar, warning_line
    from ckptlab.imaging.preview import preview
    from ckptlab.library.catalog import hash_cache

    json_out, db = kw["json_out"], kw["db"]
    settings, loras = settings_from(kw, kw["prompt"] or "")
    codes: list[int] = []

    def each(r) -> None:
        if json_out:
            emit_json(r)
        else:
            for w in r.warnings:
                warning_line(w)
            if r.status == "written":
                on = f" on {r.base.name}" if r.base else ""
                console.print(f"wrote {r.preview} (seed {r.seed}, {r.family}{on}"
                              f"{', recorded' if r.recorded else ''})", highlight=False, markup=False,
                              soft_wrap=True)
            elif r.status == "skipped":
                console.print(f"skipped {r.path}", highlight=False, markup=False, soft_wrap=True)
        if r.status == "failed":
            error_line(r.error)
            codes.append(r.exit_code)

    with progress_bar("preview", unit_bytes=False, enabled=not json_out) as cb:
        preview(kw["models"], settings, db=db, base=kw["base"], vae=kw["vae"], loras=loras, device=kw["device"],
                dtype=compute_dtype(kw), overwrite=kw["overwrite"], cache=hash_cache(db), progress=cb, each=each)
    if codes:
        raise typer.Exit(codes[0])


with_generate_options(preview_cmd, _own, after=("overwrite", "json_out", "db"),
                      exclude=("prompt_file", "refiner", "refiner_switch"))


def register(app) -> None:
    app.command("preview")(preview_cmd)
