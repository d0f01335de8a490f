"""``ckptlab generate``: images from any model in the library, offline, with A1111's infotext
(``ckptlab.imaging``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ckptlab.cli.common import db_option


def generate_cmd(
    model: Path = typer.Argument(..., help="A checkpoint file (SD1, SD2, SDXL), a diffusers folder, or a catalog hash (SHA-256 prefix, AutoV2, AutoV3) or name."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The prompt."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prompt from this UTF-8 file."),
    negative: str = typer.Option("", "--negative", "-n", help="The negative prompt."),
    seed: int = typer.Option(-1, "--seed", help="Seed of the first image (-1: random); image i uses seed + i."),
    steps: int = typer.Option(20, "--steps", help="Sampling steps."),
    cfg: float = typer.Option(7.0, "--cfg", help="CFG scale."),
    size: Optional[str] = typer.Option(None, "--size", help="WIDTHxHEIGHT (default: the family's native size: "
                                                            "512, 768 for SD2 768-v, 1024 for SDXL)."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="Sampler as A1111 names it (default DPM++ 2M; "
                                                                   "Euler on SD3; Euler a, DPM++ 2M SDE, DDIM, UniPC, ...); A1111's k_* aliases "
                                                              "and ComfyUI's names (euler_ancestral, dpmpp_2m) too."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="Schedule type: automatic (default: the "
                                                                    "scheduler's own spacing), karras, exponential, "
                                                                    "beta, sgm_uniform, simple, uniform, normal."),
    vae: Optional[Path] = typer.Option(None, "--vae", help="A VAE file to decode with instead of the model's."),
    lora: Optional[list[str]] = typer.Option(None, "--lora", help="FILE[:STRENGTH], repeatable (strength 1)."),
    refiner: Optional[Path] = typer.Option(None, "--refiner", help="An SDXL refiner that finishes the base's "
                                                                   "image."),
    refiner_switch: float = typer.Option(0.8, "--refiner-switch", help="Fraction of the steps the base runs "
                                                                        "before the refiner takes over."),
    clip_skip: int = typer.Option(1, "--clip-skip", help="A1111's Clip skip (1: the last layer)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Compute dtype: fp32, fp16 or bf16 (default: fp32 on CPU, fp16 on "
                                                              "CUDA/MPS)."),
    count: int = typer.Option(1, "--count", help="How many images (seeds seed, seed+1, ...)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output image (.png, .jpg, .webp); with --count > 1, "
                                                            "<stem>-<seed><suffix>."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing images."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    db: Optional[Path] = db_option(),
) -> None:
    """Render images from a model file, offline, each with A1111-compatible metadata.

      ckptlab generate model.safetensors -p "a lighthouse at dusk" --seed 42 --steps 20 -o lighthouse.png
    """
    from ckptlab.cli.common import console, emit_json, progress_bar, warning_line
    from ckptlab.cli.gen_options import settings_from
    from ckptlab.imaging.models import resolve_model
    from ckptlab.imaging.render import generate
    from ckptlab.library.catalog import hash_cache

    text = read_prompt(prompt, prompt_file)
    model = resolve_model(model, db=db)
    settings, loras = settings_from(dict(size=size, negative=negative, seed=seed, steps=steps, cfg=cfg,
                                         sampler=sampler, schedule=schedule, clip_skip=clip_skip,
                                         refiner_switch=refiner_switch, lora=lora), text)
    with progress_bar("generate", unit_bytes=False, enabled=not json_out) as cb:
        r = generate(model, output, settings, count=count, vae=vae, loras=loras, refiner=refiner, device=device,
                     dtype=dtype, overwrite=overwrite, cache=hash_cache(db), progress=cb)
    if json_out:
        emit_json(r)
        return
    for w in r.warnings:
        warning_line(w)
    for path, s in zip(r.images, r.seeds, strict=True):
        console.print(f"wrote {path} (seed {s}, {r.family}, {r.device} {r.dtype})", highlight=False, markup=False,
                      soft_wrap=True)


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """The prompt from ``--prompt`` or ``--prompt-file`` (exactly one)."""
    from ckptlab.errors import CkptlabError, UsageError

    if (prompt is None) == (prompt_file is None):
        raise UsageError("give the prompt with --prompt or --prompt-file (one of them)")
    if prompt_file is None:
        return prompt
    try:
        return Path(prompt_file).read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise CkptlabError("the prompt file is not UTF-8 text", prompt_file) from None
    except OSError as e:
        raise CkptlabError(f"cannot read the prompt file: {e.strerror or e}", prompt_file) from None


def register(app) -> None:
    app.command("generate")(generate_cmd)
