"""``generate``: one model (with its VAE, LoRAs, refiner) loaded once, images rendered from settings.

``Session`` holds what a grid reuses between cells: the loaded pipeline and the identity the infotext needs
(model sha256, VAE sha256, LoRA AutoV3), hashed in the background while the weights load. ``render`` runs one
image: latents from a CPU ``torch.Generator`` seeded with the seed (diffusers' convention, A1111's
"RNG source: CPU"), the sampler as A1111 names it, the VAE decoded by us so that an fp16 VAE that overflows to
NaN (the "black image") is detected and decoded again in fp32, with a warning naming the VAE.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from ckptlab.errors import CkptlabError, MismatchError, OutputError, UsageError
from ckptlab.hashes import NO_CACHE, HashCache
from ckptlab.progress import Progress, null_progress

MAX_SEED = 2**32 - 1
MAX_SIDE = 8192


@dataclass
class Settings:
    """What one image is made from, besides the model (A1111's txt2img fields)."""

    prompt: str
    negative: str = ""
    seed: int = -1
    steps: int = 20
    cfg: float = 7.0
    width: int | None = None
    height: int | None = None
    #: A1111's name; None: the family's default (DPM++ 2M; Euler for SD3's flow matching)
    sampler: str | None = None
    schedule: str | None = None
    clip_skip: int = 1
    refiner_switch: float = 0.8

    def check(self) -> None:
        """Refuse values no pipeline can use (one line each)."""
        if not 1 <= self.steps <= 1000:
            raise UsageError(f"--steps {self.steps}: use 1 to 1000")
        if not (self.cfg == self.cfg) or not 0 <= self.cfg <= 100:
            raise UsageError(f"--cfg {self.cfg}: use 0 to 100")
        if self.seed < -1 or self.seed > MAX_SEED:
            raise UsageError(f"--seed {self.seed}: use -1 (random) or 0 to {MAX_SEED}")
        for side in (self.width, self.height):
            if side is not None and (side < 8 or side > MAX_SIDE or side % 8):
                raise UsageError(f"--size: {side} must be a multiple of 8 from 8 to {MAX_SIDE}")
        if not 1 <= self.clip_skip <= 12:
            raise UsageError(f"--clip-skip {self.clip_skip}: use 1 to 12")
        if not 0 < self.refiner_switch < 1:
            raise UsageError(f"--refiner-switch {self.refiner_switch}: use a fraction between 0 and 1")


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` (or a single number for a square) -> ``(width, height)``."""
    t = str(text).lower().replace("×", "x").strip()
    try:
        w, _, h = t.partition("x")
        width, height = int(w), int(h or w)
    except ValueError:
        raise UsageError(f"--size {text!r}: write WIDTHxHEIGHT, e.g. 512x768") from None
    return width, height


def parse_lora(text: str) -> tuple[Path, float]:
    """``FILE[:STRENGTH]`` -> ``(path, strength)`` (strength 1 when absent)."""
    path, sep, tail = str(text).rpartition(":")
    if sep:
        try:
            s = float(tail)
        except ValueError:
            if Path(path).is_file() and not Path(text).exists():
                raise UsageError(f"--lora {text!r}: the strength {tail!r} is not a number (FILE:STRENGTH)") from None
            return Path(text), 1.0
        if s != s or abs(s) == float("inf"):
            raise UsageError(f"--lora {text!r}: the strength must be a finite number")
        return Path(path), s
    return Path(text), 1.0


@dataclass
class Identity:
    """Who made an image: names and hashes as the infotext writes them."""

    model: Path
    model_sha256: str | None = None
    vae: Path | None = None
    vae_sha256: str | None = None
    #: ``(path, strength, AutoV3 or full sha256)``
    loras: list[tuple[Path, float, str]] = field(default_factory=list)
    refiner: Path | None = None
    refiner_sha256: str | None = None


@dataclass
class GenerateResult:
    """What ``generate`` did (the ``--json`` record)."""

    model: Path
    family: str
    device: str
    dtype: str
    images: list[Path] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def lora_hash(path: Path) -> str:
    """A1111's LoRA hash: AutoV3 (SHA-256 of the bytes after the safetensors header) for safetensors, the file's
    SHA-256 otherwise; lower case."""
    from ckptlab.hashes import safetensors_data_offset, sha256_file

    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
        start = safetensors_data_offset(head, Path(path).stat().st_size) or 0
        return sha256_file(path, start=start)  # one pass: AutoV3 alone, not the six CivitAI hashes
    except OSError as e:
        raise CkptlabError(f"cannot read the LoRA: {e.strerror or e}", path) from None


class Session:
    """One model loaded for rendering, with its VAE, LoRAs and refiner (all checked before any weight loads)."""

    def __init__(self, model: Path, *, vae: Path | None = None, loras: list[tuple[Path, float]] = (),
                 refiner: Path | None = None, device: str = "auto", dtype: str | None = None,
                 cache: HashCache = NO_CACHE, source=None, settings: Settings | None = None):
        from ckptlab.imaging.pipeline import go_offline, pick_device, pick_dtype

        go_offline()
        from ckptlab.ops.run import open_checked
        from ckptlab.ops.stream import FileHasher

        self.warnings: list[str] = []
        self.device = pick_device(device)
        self.opened: list = []
        self.loaded = self.refined = None
        try:
            from ckptlab.imaging.models import open_model_source

            src = source if source is not None else open_model_source(Path(model))
            self.opened.append(src)
            fam = _family(src)
            _check_kind(src, fam)
            self.dtype = pick_dtype(dtype, self.device, fam)
            vae_src = None
            if vae is not None:
                from ckptlab.arch.vae_fit import check_vae_fits

                vae_src = open_checked(Path(vae))
                self.opened.append(vae_src)
                w = check_vae_fits(vae_src, fam, path=model)
                if w:
                    self.warnings.append(w)
            patches = self._match_loras(src, fam, loras)
            ref_src = None
            if refiner is not None:
                ref_src = open_checked(Path(refiner))
                self.opened.append(ref_src)
                if _family(ref_src) != "sdxl_refiner" or fam != "sdxl":
                    raise MismatchError("--refiner takes an SDXL refiner, after an SDXL base model", refiner)
            if settings is not None and fam == "sd3":
                from ckptlab.imaging.pipeline_sd3 import check_flow

                check_flow(settings.sampler, settings.schedule)  # before the model loads, not after
            self._hashers = hashers = {"model": FileHasher(src.path, cache=cache) if src.path.is_file() else None}
            if vae is not None:
                hashers["vae"] = FileHasher(Path(vae), cache=cache)
            if refiner is not None:
                hashers["refiner"] = FileHasher(Path(refiner), cache=cache)
            from ckptlab.imaging.pipeline import load

            self.loaded = load(src, device=self.device, dtype=self.dtype, vae=vae_src, loras=patches)
            self.warnings.extend(self.loaded.warnings)  # the plan's (a guessed prediction, SD3 without T5)
            self.opened.remove(src)
            if vae_src is not None:
                self.opened.remove(vae_src)
            if ref_src is not None:
                self.refined = load(ref_src, device=self.device, dtype=self.dtype, refiner=True)
                self.opened.remove(ref_src)
            self.identity = Identity(Path(model), vae=Path(vae) if vae else None, refiner=refiner,
                                     loras=[(Path(p), s, lora_hash(Path(p))) for p, s in loras])
        except BaseException:
            self.close()
            raise

    def _match_loras(self, src, fam, loras):
        if not loras:
            return None
        from ckptlab.lora.bake import BakeResult, match_loras
        from ckptlab.lora.file import LoraFile

        files = []
        for p, _ in loras:
            lf = LoraFile.open(Path(p))
            self.opened.append(lf)
            files.append(lf)
        report = BakeResult("generate", src.path, None, False, fam, [])
        weights, biases = match_loras(src.infos(), fam, files, [(s, s) for _, s in loras], report)
        self.warnings.extend(report.warnings)
        self.lora_files = files
        self._lora_target = (src.infos(), fam)
        return weights, biases

    def set_lora_strengths(self, strengths: list[float]) -> int:
        """Render with these LoRA strengths from now on (one per ``--lora``, in order; unet and text encoder
        alike): only the weights the LoRAs touch are read again, in place. Returns how many were reloaded."""
        from ckptlab.lora.bake import BakeResult, match_loras

        strengths = [float(x) for x in strengths]
        if len(strengths) != len(self.identity.loras):
            raise UsageError(f"{len(strengths)} strength(s) for {len(self.identity.loras)} LoRA(s)")
        if not strengths:
            return 0
        infos, fam = self._lora_target
        patches = match_loras(infos, fam, self.lora_files, [(x, x) for x in strengths],
                              BakeResult("generate", self.identity.model, None, False, fam, []))
        n = self.loaded.set_loras(*patches)
        self.identity.loras = [(p, x, h) for (p, _, h), x in zip(self.identity.loras, strengths, strict=True)]
        return n

    def forget_hash(self, what: str) -> None:
        """Stop filling ``<what>_sha256`` from the background hash of the file the session started with (a grid
        swapped the VAE: the identity now names another file, hashed by the caller)."""
        self._hashers.pop(what, None)

    def hashes(self) -> Identity:
        """The identity with every hash filled in (waits for the background hashing)."""
        ident = self.identity
        for what, h in self._hashers.items():
            if h is not None and getattr(ident, f"{what}_sha256") is None:
                setattr(ident, f"{what}_sha256", h.result())
        return ident

    @property
    def family(self) -> str:
        return self.loaded.family

    def close(self) -> None:
        for h in getattr(self, "_hashers", {}).values():
            if h is not None:
                h.cancel()  # a session that failed or ended stops reading multi-GB files for its infotext
        for o in reversed(self.opened):
            o.close()
        self.opened = []
        for L in (self.loaded, self.refined):
            if L is not None:
                L.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- rendering ---------------------------------------------------------------------------------
    def sampler(self, s: Settings):
        """``(Sampler, schedule key)`` of ``s`` on this model: A1111's samplers, or for a flow-matching model
        (SD3) the ones that work on it (default Euler)."""
        from ckptlab.imaging.samplers import find_schedule, resolve

        if self.loaded.prediction == "flow":
            from ckptlab.imaging.pipeline_sd3 import flow_sampler

            return flow_sampler(s.sampler or "Euler"), find_schedule(s.schedule)
        return resolve(s.sampler, s.schedule)

    def render(self, s: Settings, *, progress: Progress = null_progress):
        """``(Pillow image, seed used)`` for settings ``s``."""
        import torch

        from ckptlab.imaging.samplers import scheduler_for

        s.check()
        seed = s.seed if s.seed >= 0 else random.randrange(MAX_SEED + 1)
        fam = self.loaded.family
        pipe = self.loaded.pipe
        # the pipeline's own default: the model config's sample size (SD2 512 eps / 768 v, SDXL and SD3 1024)
        native = (getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size) * pipe.vae_scale_factor
        width, height = s.width or native, s.height or native
        sampler, schedule = self.sampler(s)
        base_cfg = dict(self.loaded.scheduler_config)
        if self.loaded.prediction == "flow":
            from ckptlab.imaging.pipeline_sd3 import flow_scheduler

            pipe.scheduler = flow_scheduler(base_cfg, sampler, schedule)
        else:
            pipe.scheduler = scheduler_for(base_cfg, sampler, schedule)
        gen = torch.Generator("cpu").manual_seed(seed)
        progress(0, total=s.steps, description=f"{self.identity.model.name} seed {seed}")

        def step(_pipe, _i, _t, kwargs):
            progress(1)
            return kwargs

        kw = dict(prompt=s.prompt, negative_prompt=s.negative or None, num_inference_steps=s.steps,
                  guidance_scale=s.cfg, height=height, width=width, generator=gen, output_type="latent",
                  clip_skip=(s.clip_skip - 1) or None, callback_on_step_end=step)
        if self.refined is not None:
            kw["denoising_end"] = s.refiner_switch
        with torch.inference_mode():
            if s.clip_skip > 1 and fam in ("sd1", "sd2"):
                # A1111 applies Clip skip to the negative prompt too; diffusers' pipeline only to the prompt
                # (its negative branch reads the last layer): encode both here, each as a prompt
                def embed(text):
                    return pipe.encode_prompt(text, pipe.device, 1, False, clip_skip=s.clip_skip - 1)[0]

                kw.update(prompt=None, negative_prompt=None, clip_skip=None, prompt_embeds=embed(s.prompt),
                          negative_prompt_embeds=embed(s.negative or ""))
            latents = pipe(**kw).images
            if self.refined is not None:
                rpipe = self.refined.pipe
                rpipe.scheduler = scheduler_for(dict(self.refined.scheduler_config), sampler, schedule)
                latents = rpipe(prompt=s.prompt, negative_prompt=s.negative or None, image=latents,
                                num_inference_steps=s.steps, guidance_scale=s.cfg, denoising_start=s.refiner_switch,
                                generator=gen, output_type="latent").images
            # A1111 and diffusers' base+refiner chain decode with the model loaded last: the refiner's VAE,
            # unless --vae replaced the VAE
            refined = self.refined is not None and self.identity.vae is None
            image = self.decode(latents, self.refined if refined else None)
        return image, seed, (width, height)

    def decode(self, latents, loaded=None):
        """The image of ``latents`` with the VAE of ``loaded`` (default: the model's); an fp16/bf16 VAE that
        gives NaN is switched to fp32 (weights read again from the file) and run again."""
        import torch

        owner = self.identity.model if loaded is None else Path(self.identity.refiner)
        loaded = loaded if loaded is not None else self.loaded
        vae = loaded.pipe.vae
        lat = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)  # SD3: shift
        out = vae.decode(lat.to(vae.dtype), return_dict=False)[0]
        if not bool(torch.isfinite(out).all()):
            if vae.dtype == torch.float32:
                raise MismatchError("the VAE decoded NaN or infinite values even in fp32 (broken weights?)",
                                    self.identity.vae or owner)
            name = self.identity.vae.name if self.identity.vae else f"the VAE of {owner.name}"
            self.warnings.append(f"{name} overflowed to NaN in {str(vae.dtype).replace('torch.', '')} (the "
                                 "'black image' problem); it was decoded again in fp32 and stays fp32")
            loaded.upcast_vae()
            out = vae.decode(lat.to(torch.float32), return_dict=False)[0]
            if not bool(torch.isfinite(out).all()):
                raise MismatchError("the VAE decoded NaN or infinite values even in fp32 (broken weights?)",
                                    self.identity.vae or owner)
        return self.loaded.pipe.image_processor.postprocess(out, output_type="pil")[0]

    def infotext(self, s: Settings, seed: int, size: tuple[int, int]) -> str:
        """A1111's infotext of an image rendered with ``s`` and ``seed``."""
        from ckptlab.imaging.infotext import format_infotext, join_hashes
        from ckptlab.imaging.samplers import SCHEDULES
        from ckptlab.version import __version__

        ident = self.hashes()
        prompt = s.prompt
        sampler, schedule = self.sampler(s)
        for p, w, _ in ident.loras:
            prompt += f" <lora:{p.stem}:{_num(w)}>"
        params = {
            "Steps": s.steps, "Sampler": sampler.name, "Schedule type": SCHEDULES[schedule][0], "CFG scale": _num(s.cfg), "Seed": seed,
            "Size": f"{size[0]}x{size[1]}",
            "Model hash": ident.model_sha256[:10] if ident.model_sha256 else None, "Model": ident.model.stem,
            "VAE hash": ident.vae_sha256[:10] if ident.vae_sha256 else None,
            "VAE": ident.vae.name if ident.vae else None,
            "Clip skip": s.clip_skip if s.clip_skip > 1 else None,
            "Lora hashes": join_hashes({p.stem: h[:12] for p, _, h in ident.loras}) if ident.loras else None,
        }
        if ident.refiner is not None:
            params["Refiner"] = f"{ident.refiner.stem} [{ident.refiner_sha256[:10]}]"
            params["Refiner switch at"] = _num(s.refiner_switch)
        params["Version"] = f"ckptlab {__version__}"
        return format_infotext(prompt, s.negative, params)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _check_kind(src, fam) -> None:
    """Refuse a file that is not a whole model (a LoRA, a VAE, a UNet alone...) in one line, naming the option
    that takes it, before anything loads."""
    from ckptlab.arch.families import display_name
    from ckptlab.arch.identify import identify

    kind = identify(src).kind
    if kind in ("checkpoint", None, "unknown"):
        return
    hint = {"lora": "; give it with --lora", "lycoris": "; give it with --lora", "vae": "; give it with --vae"}
    what = {"lora": "LoRA", "lycoris": "LyCORIS"}.get(kind, kind.replace("_", " "))
    fam_name = f"{display_name(fam)} " if fam else ""
    raise MismatchError(f"this is a {fam_name}{what} file, not a checkpoint: generate needs a whole model"
                        f"{hint.get(kind, '')}", src.path)


def _family(src) -> str | None:
    from ckptlab.arch.layout import file_layout

    return file_layout(src).family_id


def count_paths(out: Path, seeds: list[int]) -> list[Path]:
    """Output names: ``out`` itself for one image, ``<stem>-<seed><suffix>`` for several."""
    if len(seeds) == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{seed}{out.suffix}") for seed in seeds]


def generate(model: Path, out: Path, settings: Settings, *, count: int = 1, vae: Path | None = None,
             loras: list[tuple[Path, float]] = (), refiner: Path | None = None, device: str = "auto",
             dtype: str | None = None, overwrite: bool = False, cache: HashCache = NO_CACHE,
             progress: Progress = null_progress) -> GenerateResult:
    """Render ``count`` images of ``model`` (seeds ``seed``, ``seed + 1``...; seed -1: a random first seed) to
    ``out`` (``.png``/``.jpg``/``.webp``; with several, ``<stem>-<seed>``), each with A1111's infotext."""
    from ckptlab.imaging.imagefile import image_format, save_image
    from ckptlab.imaging.samplers import check_schedule, resolve

    out = Path(out)
    image_format(out)
    settings.check()
    check_schedule(*resolve(settings.sampler, settings.schedule))
    if count < 1 or count > 10000:
        raise UsageError(f"--count {count}: use 1 to 10000")
    first = settings.seed if settings.seed >= 0 else random.randrange(MAX_SEED + 1)
    seeds = [(first + i) % (MAX_SEED + 1) for i in range(count)]
    paths = count_paths(out, seeds)
    if not overwrite:
        for p in paths:
            if p.exists():
                raise CkptlabError("exists; pass --overwrite to replace it", p)
    if not out.parent.is_dir():
        raise CkptlabError("the output folder does not exist", out.parent)
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise OutputError("cannot write in the output folder (checked before rendering)", out.parent)
    with Session(model, vae=vae, loras=loras, refiner=refiner, device=device, dtype=dtype, cache=cache,
                 settings=settings) as ses:
        res = GenerateResult(Path(model), ses.family, ses.device, str(ses.dtype).replace("torch.", ""))
        for seed, path in zip(seeds, paths, strict=True):
            s = Settings(**{**settings.__dict__, "seed": seed})
            image, used, size = ses.render(s, progress=progress)
            text = ses.infotext(s, used, size)
            save_image(path, image, text, overwrite=overwrite)
            res.images.append(path)
            res.seeds.append(used)
            res.infotexts.append(text)
        res.warnings = list(ses.warnings)
        return res
