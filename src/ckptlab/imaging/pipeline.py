"""A diffusers pipeline built in memory from any model ckptlab reads: no folder on disk, no second copy in RAM.

The weights come from ``ops.diffusers_io``'s plan (the same single-file -> diffusers names ``to-diffusers``
writes, checked there against diffusers' own converter), the configs from the tensor shapes
(``ops.diffusers_config``), the tokenizers from the CLIP files ckptlab ships. Every module is built on the
``meta`` device (``accelerate.init_empty_weights``: no memory) and each weight is read from the
``TensorSource``, cast to the compute dtype and put in place one tensor at a time, so the peak is the weights at
the compute dtype plus one tensor. Nothing is fetched: the hub libraries are switched offline before they load.

LoRAs are applied with the bake's own per-key step (``lora.bake.baked``) through ``PatchedSource``; changing
their strengths re-reads only the weights they touch (``Loaded.set_loras``), in place.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass, field

from ckptlab.arch.families import display_name, get
from ckptlab.errors import MismatchError, UsageError
from ckptlab.formats.base import TensorInfo, TensorSource
from ckptlab.ops.stream import Out

#: families generate can build a pipeline for (diffusers' StableDiffusion(XL)Pipeline)
TXT2IMG = ("sd1", "sd2", "sdxl")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DIFFUSERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "DISABLE_TELEMETRY": "1",
            # the libraries' own chatter (torchvision fallbacks, config notes) is not the user's business
            "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}


def go_offline() -> None:
    """Switch huggingface_hub / transformers / diffusers offline and quiet (before they are imported: they read it
    once)."""
    for k, v in _OFFLINE.items():
        os.environ[k] = v


def pick_device(device: str) -> str:
    """``auto`` -> cuda, then mps, then cpu; a named device that is not there is a usage error."""
    import torch

    if device not in DEVICES:
        raise UsageError(f"--device {device!r}: use one of {', '.join(DEVICES)}")
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if device == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if device == "cuda" and not cuda:
        raise UsageError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if device == "mps" and not mps:
        raise UsageError("--device mps: no MPS device is available")
    return device


def pick_dtype(dtype: str | None, device: str, family: str | None = None):
    """The compute dtype: given, else fp32 on CPU and fp16 on CUDA/MPS (bf16 for the families that need it)."""
    import torch

    if dtype is None:
        if device == "cpu":
            return torch.float32
        fam = get(family)
        return torch.bfloat16 if fam and fam.id in ("flux", "sd3") else torch.float16
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[dtype])


class PatchedSource(TensorSource):
    """``base`` with LoRA patches applied to the weights they touch (``lora.bake.baked``, fp32); every other key
    reads through. ``set_patches`` swaps the patch set (a new strength) without reopening anything."""

    format = "patched"

    def __init__(self, base: TensorSource):
        super().__init__(base.path)
        self.base = base
        self.metadata = base.metadata
        self.extra = base.extra
        self.weights: dict[str, list] = {}
        self.biases: dict[str, list] = {}

    def set_patches(self, weights: dict[str, list], biases: dict[str, list]) -> set[str]:
        """Use these patches from now on; returns every key whose value changes (the old and new touched keys)."""
        changed = set(self.weights) | set(self.biases) | set(weights) | set(biases)
        self.weights, self.biases = weights, biases
        return changed

    def infos(self) -> dict[str, TensorInfo]:
        return self.base.infos()

    def array(self, key: str):
        from ckptlab.formats.arrays import as_array
        from ckptlab.lora.bake import baked

        if key in self.weights or key in self.biases:
            bias = key in self.biases
            patches = self.biases[key] if bias else self.weights[key]
            return as_array(baked(self.base.get, self.base.__contains__, key, patches, "F32", self.path, bias=bias))
        return self.base.array(key)

    def close(self) -> None:
        self.base.close()


@dataclass
class Loaded:
    """A pipeline ready to run, and where each of its weights came from."""

    pipe: object
    family: str
    prediction: str
    source: PatchedSource
    device: str
    dtype: object
    #: component name -> planned items (diffusers key <- source key)
    items: dict[str, list[Out]]
    vae_source: TensorSource | None = None
    warnings: list[str] = field(default_factory=list)
    #: the model's own scheduler config (samplers are built on it: prediction type, betas, spacing)
    scheduler_config: dict = field(default_factory=dict)

    def set_loras(self, weights: dict[str, list], biases: dict[str, list]) -> int:
        """Apply this patch set (``lora.bake.match_loras``' output) instead of the current one; re-reads only
        the weights either set touches. Returns how many weights were reloaded."""
        changed = self.source.set_patches(weights, biases)
        return self.reload(changed)

    def reload(self, keys: set[str] | None = None) -> int:
        """Read the weights derived from source ``keys`` again (all when None), in place."""
        n = 0
        for comp, items in self.items.items():
            module = getattr(self.pipe, comp)
            for it in items:
                if keys is None or it.src_key in keys:
                    put(module, it, self.device, self.dtype)
                    n += 1
        return n

    def upcast_vae(self) -> None:
        """Switch the VAE to fp32 with its weights read again from the file (not the fp16-rounded copies): what
        the VAE computes when an fp16 decode overflowed."""
        import torch

        vae = self.pipe.vae
        vae.to(torch.float32)
        for it in self.items["vae"]:
            put(vae, it, self.device, torch.float32)

    def close(self) -> None:
        self.source.close()
        if self.vae_source is not None:
            self.vae_source.close()


def value_of(it: Out):
    """The tensor of a planned item (derived items call ``produce``): a view of the source's memory where the
    reader maps the file (no copy: the mapping is copy-on-write, so the array is writable and ``as_tensor`` takes
    it as it is)."""
    from ckptlab.formats.arrays import as_tensor

    return as_tensor(it.produce() if it.produce is not None else it.source.array(it.src_key), "generate")


#: CPU tensors at least this big get memory of their own, 2 MiB aligned, with transparent huge pages asked for
_HUGE = 2 << 20


def _empty_cpu(shape: tuple[int, ...], dtype):
    """An uninitialised CPU tensor. A big one gets its own anonymous mapping, aligned to 2 MiB and marked
    ``MADV_HUGEPAGE``: filling 4 GB of fp32 weights then takes ~2,000 page faults instead of ~1,000,000 (half the
    time of a load on Linux, where THP is usually ``madvise``). The mapping ends where the data ends, so no huge
    page reaches past it; each tensor keeps its own storage (no arena shared between weights). Elsewhere, or if
    any step is refused: ``torch.empty``."""
    import math
    import mmap

    import torch

    n = math.prod(shape)
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    if nbytes < _HUGE or not hasattr(mmap, "MADV_HUGEPAGE") or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.empty(shape, dtype=dtype)
    try:
        import ctypes

        mm = mmap.mmap(-1, nbytes + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        probe = ctypes.c_char.from_buffer(mm)
        pad = -ctypes.addressof(probe) % _HUGE
        del probe  # an exported buffer would block the resize
        mm.resize(pad + nbytes)  # mremap shrinks in place: the mapping now ends with the data
        mm.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError, SystemError, TypeError):
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mm, dtype=dtype, count=n, offset=pad).view(shape)


def _cast(t, device: str, dtype):
    """The final tensor of source tensor ``t`` (``value_of``): a new tensor on ``device``, floating point at
    ``dtype`` (other dtypes kept), made by one copy from the source's mapped memory (the cast happens in the
    copy)."""
    want = dtype if t.is_floating_point() else t.dtype
    if str(device) == "cpu" and t.device.type == "cpu":
        out = _empty_cpu(tuple(t.shape), want)
        out.copy_(t)
        return out
    return t.to(device=device, dtype=want, copy=True)


def put(module, it: Out, device: str, dtype, value=None) -> None:
    """Put one planned weight into ``module`` (a diffusers/transformers model) at ``dtype`` on ``device``: replace
    a meta parameter, or copy into a loaded one (no new allocation when the strengths of a LoRA change).
    ``value``: the weight already made by ``_cast`` (read ahead), used as it is."""
    import torch

    t = value if value is not None else value_of(it)
    key = it.key
    if key.startswith("text_model.") and not hasattr(module, "text_model"):
        key = key[len("text_model."):]  # transformers 5 dropped the CLIPTextModel.text_model wrapper
    owner_name, _, name = key.rpartition(".")
    try:
        owner = module.get_submodule(owner_name) if owner_name else module
    except AttributeError:
        raise MismatchError(f"{it.key}: the model built from the shapes has no such weight",
                            it.source.path if it.source else None) from None
    current = owner._parameters.get(name) if name in owner._parameters else owner._buffers.get(name)
    if current is None and name not in owner._buffers:
        raise MismatchError(f"{it.key}: the model built from the shapes has no such weight",
                            it.source.path if it.source else None)
    if current is not None and tuple(current.shape) != tuple(t.shape):
        raise MismatchError(f"{it.key}: shape {tuple(t.shape)} does not fit the model's {tuple(current.shape)}",
                            it.source.path if it.source else None)
    if current is not None and not current.is_meta:
        with torch.no_grad():
            current.copy_(t)
        return
    if value is None:
        value = _cast(t, device, dtype)
    if name in owner._parameters:
        owner._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[name] = value


#: threads that read and cast ahead (two: one shares a core with the imports, both work once they are done)
_WORKERS = 2


class _ReadAhead:
    """Reads and casts every planned weight of one ``load`` in worker threads, submitted in the order ``_fill``
    puts them, while the main thread imports diffusers/transformers and builds the empty modules (an import is
    Python work on one core; the copy is memory work that releases the GIL). What the workers make is the final
    weights themselves (``put`` installs them without another copy), so running ahead costs no memory beyond
    what the loaded model holds.

    Torch's intra-op threads are set to one for the load (restored when the last list is taken or on
    ``cancel``): two OpenMP threads for a memory-bound cast gain little on an idle machine and spin for seconds on
    a busy one (measured: 7 s against 1.7 s for SD1.5's weights on a loaded 2-core machine)."""

    def __init__(self, lists: list[list[Out]], device: str, dtype, workers: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        import torch

        _one_thread(torch)
        self.restored = False
        self.pool = ThreadPoolExecutor(max_workers=workers or _WORKERS, thread_name_prefix="ckptlab-load")
        self.futures = {id(lst): [self.pool.submit(_cast_item, it, device, dtype) for it in lst] for lst in lists}

    def has(self, lst: list[Out]) -> bool:
        return id(lst) in self.futures

    def take(self, lst: list[Out]):
        """The values of ``lst``, in order, as the workers make them (a worker's exception is raised here)."""
        futures = self.futures[id(lst)]
        for k in range(len(futures)):
            value = futures[k].result()
            futures[k] = None  # the module holds the value from here on
            yield value
        del self.futures[id(lst)]
        if not self.futures:
            self.pool.shutdown(wait=False)
            self._restore()

    def cancel(self) -> None:
        self.futures.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._restore()

    def _restore(self) -> None:
        if not self.restored:
            self.restored = True
            _threads_back()

    def __del__(self) -> None:
        # a load that failed before ``_fill`` took everything (a config refused, an import error): stop the
        # workers and give torch its threads back when the load's frame lets go of this object
        if not getattr(self, "restored", True):
            self.cancel()


def _cast_item(it: Out, device: str, dtype):
    return _cast(value_of(it), device, dtype)


#: [loads under way, torch's intra-op thread setting before the first of them]: loads in several threads (a
#: grid preparing its next model) restore the user's setting when the last one ends, not one another's "1"
_THREADS: list = [0, None]
_THREADS_LOCK = threading.Lock()


def _one_thread(torch) -> None:
    with _THREADS_LOCK:
        if _THREADS[0] == 0:
            _THREADS[1] = torch.get_num_threads()
            torch.set_num_threads(1)
        _THREADS[0] += 1


def _threads_back() -> None:
    import torch

    with _THREADS_LOCK:
        _THREADS[0] -= 1
        if _THREADS[0] == 0:
            torch.set_num_threads(_THREADS[1])


#: planned-items list id -> the read-ahead making its values (weak: a load that fails drops it with its frame)
_AHEAD: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _read_ahead(items: dict[str, list[Out]], files: dict[str, list[Out]], fam: str, device: str, dtype):
    """Start reading ``load``'s weights ahead (UNet, VAE, then the text encoders: the order ``_fill`` is called
    in); ``_fill`` takes the values of each list from it. The caller keeps the returned object alive until the
    modules are filled."""
    from ckptlab.ops.diffusers_io import TEXT_ENCODERS

    lists = [items["unet"], items["vae"]] + [files[f"{folder}/model.safetensors"] for folder, _, _ in
                                             TEXT_ENCODERS[fam] if f"{folder}/model.safetensors" in files]
    ahead = _ReadAhead(lists, device, dtype)
    for lst in lists:
        _AHEAD[id(lst)] = ahead
    return ahead


def _tokenizer(pad: str):
    from importlib import resources

    from transformers import CLIPTokenizer

    data = resources.files("ckptlab") / "data" / "clip_tokenizer"
    with resources.as_file(data / "vocab.json") as vocab, resources.as_file(data / "merges.txt") as merges:
        return CLIPTokenizer(str(vocab), str(merges), pad_token=pad, model_max_length=77)


def _empty(build):
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build()


def _fill(module, items: list[Out], device: str, dtype, name: str, where) -> None:
    """Put every planned weight of ``items`` into ``module`` (from the read-ahead when ``load`` started one for
    this list), then check that none is left on the meta device. Every weight is made on ``device``, so the
    final ``module.to(device)`` only moves buffers the plan has no value for (no copy of a weight)."""
    ahead = _AHEAD.get(id(items))
    try:
        if ahead is not None and ahead.has(items):
            for it, value in zip(items, ahead.take(items), strict=True):
                put(module, it, device, dtype, value)
        else:
            for it in items:
                put(module, it, device, dtype)
    except BaseException:
        if ahead is not None:
            ahead.cancel()
        raise
    missing = [n for n, p in module.named_parameters() if p.is_meta]
    if missing:
        raise MismatchError(f"{name}: {len(missing)} weight(s) missing from the file (first: {missing[0]})", where)
    module.to(device)
    module.eval()
    module.requires_grad_(False)


def vae_plan(vae: TensorSource):
    """``(items, config)`` of a standalone VAE file (LDM names, with or without ``first_stage_model.``, or
    diffusers' ``AutoencoderKL`` names)."""
    from ckptlab.ops.diffusers_io import VAE_PREFIX, plan_vae

    keys = vae.infos()
    prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in keys) else ""
    if f"{prefix}encoder.down_blocks.0.resnets.0.conv1.weight" in keys:
        raise MismatchError("a VAE in diffusers' layout: convert it with `ckptlab from-diffusers` first, or give "
                            "the single-file VAE", vae.path)
    items, lay, shapes, _ = plan_vae(vae, prefix)
    return items, lay, shapes


def load(src: TensorSource, *, device: str = "cpu", dtype=None, vae: TensorSource | None = None,
         loras: tuple[dict, dict] | None = None, refiner: bool = False) -> Loaded:
    """Build the pipeline of ``src`` (SD1, SD2 eps/v, SDXL base) on ``device`` at ``dtype`` (default: fp32 on
    CPU, fp16 on CUDA). ``vae``: a VAE file that replaces the model's (already checked to fit); ``loras``:
    ``(weight patches, bias patches)`` from ``lora.bake.match_loras``. Raises ``MismatchError`` for a model
    diffusers has no text-to-image pipeline for. ``refiner``: ``src`` is an SDXL refiner, built as diffusers'
    ``StableDiffusionXLImg2ImgPipeline`` (it takes the base's latents)."""
    go_offline()
    from ckptlab.arch.layout import file_layout
    from ckptlab.ops import diffusers_config as cfgs
    from ckptlab.ops.diffusers_io import TEXT_ENCODERS, plan_to_diffusers

    fam = file_layout(src).family_id
    if fam == "sdxl_refiner" and not refiner:
        raise MismatchError("this is an SDXL refiner: it refines an SDXL base's image; give the base model and "
                            "--refiner with this file", src.path)
    if refiner and fam != "sdxl_refiner":
        raise MismatchError(f"--refiner takes an SDXL refiner; this is {display_name(fam)}", src.path)
    if fam not in TXT2IMG and not refiner:
        what = display_name(fam) if fam else "an unrecognised model"
        raise MismatchError(f"generate supports SD1, SD2 and SDXL checkpoints; this is {what}", src.path)
    dtype = dtype if dtype is not None else pick_dtype(None, device, fam)
    patched = PatchedSource(src)
    if loras is not None:
        patched.set_patches(*loras)
    fam, files, configs, warnings, _ = plan_to_diffusers(patched)
    items = {"unet": files["unet/diffusion_pytorch_model.safetensors"],
             "vae": files["vae/diffusion_pytorch_model.safetensors"]}
    vae_cfg = configs["vae/config.json"]
    if vae is not None:
        items["vae"], lay, shapes = vae_plan(vae)
        vae_cfg = cfgs.vae_config(lay, shapes, fam)
    prediction = configs["scheduler/scheduler_config.json"]["prediction_type"]
    ahead = _read_ahead(items, files, fam, device, dtype)  # noqa: F841 - alive until _fill has taken its values

    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def clean(cfg: dict) -> dict:
        return {k: v for k, v in cfg.items() if not k.startswith("_")}

    unet = _empty(lambda: diffusers.UNet2DConditionModel.from_config(clean(configs["unet/config.json"])))
    _fill(unet, items["unet"], device, dtype, "UNet", src.path)
    vae_model = _empty(lambda: diffusers.AutoencoderKL.from_config(clean(vae_cfg)))
    _fill(vae_model, items["vae"], device, dtype, "VAE", vae.path if vae is not None else src.path)
    parts: dict[str, object] = {"unet": unet, "vae": vae_model}
    for folder, _, kind in TEXT_ENCODERS[fam]:
        cfg = dict(configs[f"{folder}/config.json"])
        cfg.pop("architectures", None)
        cls = CLIPTextModelWithProjection if folder == "text_encoder_2" else CLIPTextModel
        te = _empty(lambda cls=cls, cfg=cfg: cls(CLIPTextConfig(**cfg)))
        items[folder] = files[f"{folder}/model.safetensors"]
        _fill(te, items[folder], device, dtype, folder.replace("_", " "), src.path)
        if not hasattr(te, "text_model"):
            # transformers 5 dropped the ``text_model`` wrapper that diffusers' clip-skip path still reads
            # (``text_encoder.text_model.final_layer_norm``): point it at the model itself, unregistered
            object.__setattr__(te, "text_model", te)
        parts[folder] = te
        parts[folder.replace("text_encoder", "tokenizer")] = _tokenizer("<|endoftext|>" if kind == "hf" else "!")
    sched_cfg = configs["scheduler/scheduler_config.json"]
    parts["scheduler"] = getattr(diffusers, sched_cfg["_class_name"]).from_config(clean(sched_cfg))
    if refiner:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**parts, text_encoder=None, tokenizer=None,
                                                          requires_aesthetics_score=True, add_watermarker=False)
    elif fam == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True, add_watermarker=False)
    else:
        pipe = diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return Loaded(pipe, fam, prediction, patched, device, dtype, items, vae, warnings, dict(sched_cfg))

