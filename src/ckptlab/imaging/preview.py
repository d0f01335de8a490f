"""``ckptlab preview``: one preview image per model, stored where the UIs look for it, recorded in the catalog.

Where: ``<stem>.preview.png`` next to the model file (``model.safetensors`` -> ``model.preview.png``). Every
tool that shows model cards reads that name: A1111/Forge (``<stem>.<ext>`` then ``<stem>.preview.<ext>``, png
first), ComfyUI-Lora-Manager, Civitai Helper, sd_civitai_extension, Stability Matrix and SD.Next. For a diffusers
folder ``models/foo/`` the preview is ``models/foo.preview.png`` beside the folder (its "stem" is the folder name;
the folder itself is an input and is never written into).

A preview a user already has is never replaced without ``overwrite``: any image A1111 would show for the model
(``<stem>.<ext>`` or ``<stem>.preview.<ext>``, ext png/jpg/jpeg/webp/gif) makes the model "skipped". With
``overwrite`` only ``<stem>.preview.png`` is (re)written; other previews that some UI shows first are named in
a warning and left alone.

The prompt, unless given: the model's trigger words where the catalog knows them (its CivitAI link's trained
words, a sidecar's, else the first words of a LoRA's own metadata), followed by ``NEUTRAL_PROMPT``. The seed,
unless given: ``DEFAULT_SEED`` (a fixed seed: the same command makes the same preview again).

A LoRA (or LyCORIS) as MODEL renders on ``base`` (``--base``) at strength 1; without a base it fails like any
model that cannot render (a VAE, Flux...): one line, the other models go on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ckptlab.errors import CkptlabError, MismatchError, OutputError
from ckptlab.hashes import NO_CACHE, HashCache
from ckptlab.progress import Progress, null_progress

NEUTRAL_PROMPT = "a scenic landscape with mountains and a lake at sunset, highly detailed"
DEFAULT_SEED = 42
#: what A1111 reads as a preview, in its order (``ui_extra_networks.find_preview``)
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "gif")
MAX_TRIGGER_WORDS = 5
LORA_KINDS = ("lora", "lycoris")


def preview_path(model: Path) -> Path:
    """Where the preview of ``model`` goes: ``<stem>.preview.png`` next to a file, ``<name>.preview.png`` beside a
    diffusers folder."""
    model = Path(model)
    stem = model.name if model.is_dir() else model.stem
    return model.parent / f"{stem}.preview.png"


def existing_previews(model: Path) -> list[Path]:
    """The images next to ``model`` that A1111 would show as its preview, in the order it looks for them."""
    model = Path(model)
    stem = model.name if model.is_dir() else model.stem
    out = []
    for ext in IMAGE_EXTS:
        for name in (f"{stem}.{ext}", f"{stem}.preview.{ext}"):
            p = model.parent / name
            if p.is_file() or p.is_symlink():
                out.append(p)
    return out


@dataclass
class PreviewResult:
    """What happened to one MODEL argument (one entry of ``--json``)."""

    model: str
    path: Path | None = None
    status: str = "failed"  # written | skipped | failed
    preview: Path | None = None
    seed: int | None = None
    prompt: str | None = None
    family: str | None = None
    base: Path | None = None
    recorded: bool = False
    infotext: str | None = None
    error: str | None = None
    exit_code: int = 0
    warnings: list[str] = field(default_factory=list)


def trigger_words(model: Path, db: Path | None) -> list[str]:
    """The model's trigger words the catalog knows (none when it has no catalog or no record for the file): its
    CivitAI link's trained words and the sidecars' first; else the first three of its own metadata's."""
    from ckptlab.library.catalog import Catalog, default_db_path

    where = Path(db) if db is not None else default_db_path()
    if not where.is_file():
        return []
    try:
        from ckptlab.hub.link import link_lookup
        from ckptlab.library import sidecars
        from ckptlab.library.show import trigger_sources

        with Catalog(where, must_exist=True) as cat:
            rec = cat.get_by_path(model)
            if rec is None:
                return []
            link = link_lookup(cat)(rec) if rec.sha256 else None
            found = trigger_sources(rec, link, sidecars.read(rec.path) if Path(rec.path).is_file() else None)
    except CkptlabError:
        return []
    stated = [t["word"] for t in found if any(s == "civitai link" or s.startswith("sidecar") for s in t["sources"])]
    words = stated[:MAX_TRIGGER_WORDS] or [t["word"] for t in found][:3]
    return [w.strip() for w in words if w.strip()]


def default_prompt(model: Path, db: Path | None) -> str:
    """``NEUTRAL_PROMPT``, after the model's trigger words where the catalog knows them."""
    words = trigger_words(model, db)
    return ", ".join([*words, NEUTRAL_PROMPT])


def _kind(path: Path) -> str | None:
    from ckptlab.arch.layout import file_layout
    from ckptlab.imaging.models import open_model_source

    with open_model_source(path) as src:
        return file_layout(src).kind


def _record(db: Path | None, model: Path, target: Path, seed: int, text: str) -> tuple[bool, str | None]:
    """Record the preview in the catalog (only one that exists: a preview does not make a catalog)."""
    from ckptlab.library.catalog import Catalog, default_db_path
    from ckptlab.library.previews import record_preview

    where = Path(db) if db is not None else default_db_path()
    if not where.is_file():
        return False, None
    try:
        with Catalog(where, must_exist=True) as cat:
            if record_preview(cat, model, target, seed=seed, infotext=text):
                return True, None
            return False, f"{model} is not in the catalog: the preview is not recorded (scan its folder)"
    except CkptlabError as e:
        return False, f"the preview is not recorded: {e}"


def preview_one(text: str, settings, *, db: Path | None = None, base: Path | None = None, vae: Path | None = None,
                loras: list[tuple[Path, float]] = (), device: str = "auto", dtype: str | None = None,
                overwrite: bool = False, cache: HashCache = NO_CACHE,
                progress: Progress = null_progress) -> PreviewResult:
    """Render and store the preview of the MODEL argument ``text`` (a path, diffusers folder, catalog hash or
    name) with ``settings`` (a ``render.Settings``; an empty prompt: the default prompt). Every failure is in the
    result (``status`` failed, ``error`` one line, ``exit_code``), never raised, except Ctrl-C."""
    from ckptlab.imaging.imagefile import save_image
    from ckptlab.imaging.models import resolve_model
    from ckptlab.imaging.render import Session, Settings

    res = PreviewResult(str(text))
    try:
        path = resolve_model(text, db=db)
        res.path = path
        target = preview_path(path)
        res.preview = target
        have = existing_previews(path)
        if have and not overwrite:
            res.status = "skipped"
            res.warnings.append(f"{path}: has a preview ({have[0].name}); --overwrite replaces it")
            return res
        others = [p for p in have if p != target]
        if others:
            res.warnings.append(f"{path}: other previews remain that some UIs show first: "
                                f"{', '.join(p.name for p in others)}")
        if os.path.lexists(target) and not target.is_file():
            raise OutputError("something other than a file is in the way of the preview", target)
        if not os.access(target.parent, os.W_OK):
            raise OutputError("cannot write the preview here (the folder is not writable)", target.parent)
        model, lora_list = path, list(loras)
        kind = _kind(path) if not path.is_dir() else "checkpoint"
        if kind in LORA_KINDS:
            if base is None:
                raise MismatchError("a LoRA cannot render alone: give --base MODEL to render it on", path)
            model = resolve_model(base, db=db)
            base_kind = _kind(model) if not model.is_dir() else "checkpoint"
            if base_kind != "checkpoint":
                what = base_kind or "file of unknown kind"
                raise MismatchError(f"--base takes a checkpoint to render the LoRA on; this is a {what}", model)
            res.base = model
            lora_list = [(path, 1.0), *lora_list]
        prompt = settings.prompt or default_prompt(path, db)
        s = Settings(**{**settings.__dict__, "prompt": prompt})
        with Session(model, vae=vae, loras=lora_list, device=device, dtype=dtype, cache=cache,
                     settings=s) as ses:
            image, seed, size = ses.render(s, progress=progress)
            info = ses.infotext(s, seed, size)
            res.family = ses.family
            res.warnings.extend(ses.warnings)
        save_image(target, image, info, overwrite=overwrite)
        res.status, res.seed, res.prompt, res.infotext = "written", seed, prompt, info
        res.recorded, note = _record(db, path, target, seed, info)
        if note:
            res.warnings.append(note)
    except CkptlabError as e:
        res.status, res.error, res.exit_code = "failed", str(e), e.exit_code
    return res


def preview(models: list[str], settings, *, db: Path | None = None, base: Path | None = None, vae=None,
            loras=(), device: str = "auto", dtype: str | None = None, overwrite: bool = False,
            cache: HashCache = NO_CACHE, progress: Progress = null_progress, each=None) -> list[PreviewResult]:
    """``preview_one`` for every MODEL argument in turn (a failure does not stop the others); ``each(result)`` is
    called after each one (the CLI prints as it goes)."""
    from ckptlab.imaging.pipeline import pick_device, pick_dtype
    from ckptlab.imaging.samplers import find_sampler, find_schedule

    settings.check()
    find_sampler(settings.sampler)
    find_schedule(settings.schedule)
    pick_dtype(dtype, pick_device(device))  # a wrong --device/--precision stops before any model
    out = []
    for m in models:
        r = preview_one(m, settings, db=db, base=base, vae=vae, loras=loras, device=device, dtype=dtype,
                        overwrite=overwrite, cache=cache, progress=progress)
        out.append(r)
        if each is not None:
            each(r)
    return out
