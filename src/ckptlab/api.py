"""The public Python API: what ``ckptlab`` exports (``import ckptlab; ckptlab.convert(...)``).

Each function here is the command of the same name as one call, with keyword arguments named like the
command's options (``out_dir=`` for ``--out-dir``, ``overwrite=``, ``dry_run=``, ``db=`` for ``--db``) and
a ``progress=`` callback (``ckptlab.progress.Progress``: ``progress(advance, total=None,
description=None)``). They return the records ``--json`` prints and raise ``CkptlabError`` (its
``exit_code`` is the command's) for every problem with the input; nothing is printed.

The catalog is passed in: ``db`` is a catalog file, or an open ``Catalog`` (used as it is, not
closed). Where the command reads the default catalog when ``--db`` is not given, so do these functions
(``$CKPTLAB_DB``, else the platform's data folder); ``hash_file`` uses a catalog only when given one.

Everything heavy (torch, httpx, SQLite work) is imported inside the functions: ``import ckptlab`` stays
cheap. See docs/api.md for a worked example.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from ckptlab.arch.identify import ModelInfo
    from ckptlab.formats.base import TensorSource
    from ckptlab.hashes import HashCache, Hashes
    from ckptlab.hub.download import DownloadResult
    from ckptlab.hub.link import LinkReport
    from ckptlab.imaging.grid import GridResult
    from ckptlab.imaging.images import ImageReport
    from ckptlab.imaging.preview import PreviewResult
    from ckptlab.imaging.render import GenerateResult
    from ckptlab.library.catalog import Catalog
    from ckptlab.library.dupes import DupesResult
    from ckptlab.library.scanner import ScanSummary
    from ckptlab.lora.bake import BakeResult
    from ckptlab.lora.combine import LoraMergeResult
    from ckptlab.lora.convert import LoraConvertResult
    from ckptlab.lora.extract import ExtractResult
    from ckptlab.lora.info import LoraInfo
    from ckptlab.lora.resize import ResizeResult
    from ckptlab.merging.engine import MergeResult
    from ckptlab.ops.diffusers_io import FolderResult
    from ckptlab.ops.stream import TransformResult
    from ckptlab.progress import Progress
    from ckptlab.security import CheckResult

PathLike = str | os.PathLike


def _paths(inputs: PathLike | Iterable[PathLike]) -> list[Path]:
    """One path or many, as a list of ``Path`` (a single str is one path, not its characters)."""
    if isinstance(inputs, (str, os.PathLike)):
        return [Path(inputs)]
    return [Path(p) for p in inputs]


def _db_path(db: PathLike | Catalog | None) -> Path | None:
    """The catalog file ``db`` names (an open ``Catalog``: its file)."""
    if db is None:
        return None
    return Path(db.path) if hasattr(db, "conn") else Path(db)


def _hash_cache(db: PathLike | Catalog | None) -> HashCache:
    """The catalog ``db`` names as the sha256 cache of a transform or merge; no cache when ``db`` is None (library
    calls never read the default catalog on their own)."""
    from ckptlab.hashes import NO_CACHE

    if db is None:
        return NO_CACHE
    from ckptlab.library.catalog import hash_cache

    return hash_cache(_db_path(db))


@contextlib.contextmanager
def _catalog(db: PathLike | Catalog | None, *, must_exist: bool = False) -> Iterator[Catalog]:
    """An open catalog for ``db``: the caller's own ``Catalog`` (left open), else one opened and closed here."""
    from ckptlab.library.catalog import Catalog

    if isinstance(db, Catalog):
        yield db
        return
    with Catalog(db, must_exist=must_exist) as cat:
        yield cat


# ----------------------------------------------------------------------------------------------- files


def open_model(path: PathLike, *, variant: str | None = None) -> TensorSource:
    """Open a model file or diffusers folder as a read-only mapping ``key -> tensor`` (header read now,
    tensors read one at a time on access; nothing in a pickle is executed).

    Args:
        path: a .safetensors, .ckpt/.pt/.pth/.bin pickle, .gguf file or a diffusers folder.
        variant: a diffusers weight variant to prefer (``fp16``).

    Returns:
        A ``TensorSource``: ``keys()``, ``info(key)`` (dtype, shape), ``get(key)`` (the tensor), ``metadata``;
        use it as a context manager or call ``close()``.

    Raises:
        FormatError / UnsupportedFormatError: not a model file ckptlab reads. UnsafeFileError: a pickle
        that would need code execution.
    """
    from ckptlab.formats import open_model as _open

    return _open(path, variant=variant)


def identify(path: PathLike | TensorSource, *, heuristics: bool = False) -> ModelInfo:
    """What a model file is, from its header: kind, family, variant, prediction, components, dtypes, VRAM.

    Args:
        path: a model file or diffusers folder, or an open ``TensorSource``.
        heuristics: also apply rules that read a tensor (SD2 v/eps by ComfyUI's rule).

    Returns:
        A ``ModelInfo`` (as ``ckptlab inspect --json`` prints it).

    Raises:
        CkptlabError: the file cannot be read as a model (exit 1), or is refused as unsafe (exit 4).
    """
    from ckptlab.arch.identify import identify as _identify

    return _identify(path, heuristics=heuristics)


def check(path: PathLike, *, deep: bool = False) -> CheckResult:
    """A safety verdict for one model file, without executing anything in it.

    Args:
        path: a pickle (.ckpt .pt .pth .bin), .safetensors or .gguf file.
        deep: also read every tensor: zip record CRCs of pickles, NaN/Inf values (reads the whole file).

    Returns:
        A ``CheckResult``: ``verdict`` (``safe``, ``suspicious``, ``malicious`` or ``corrupt``), the
        ``findings`` (``issues``: those that decided the verdict), and the globals a pickle imports.

    Raises:
        Nothing for hostile, broken or missing files: that is the verdict (a missing or unreadable path is
        ``corrupt`` with an ``unreadable`` finding).
    """
    from ckptlab.security import check as _check

    return _check(path, deep=deep)


# ------------------------------------------------------------------------------------------ transforms


def convert(inputs: PathLike | Iterable[PathLike], out: PathLike | None = None, *, out_dir: PathLike | None = None,
            allow_suspicious: bool = False, drop_ema: bool = False, overwrite: bool = False, dry_run: bool = False,
            progress: Progress | None = None, db: PathLike | Catalog | None = None) -> list[TransformResult]:
    """Convert pickle checkpoints (.ckpt .pt .pth .bin) to .safetensors without executing anything in them.

    Args:
        inputs: one pickle file or several.
        out: the output file (one input only); default ``<stem>.safetensors`` next to the input or in ``out_dir``.
        out_dir: folder for the outputs.
        allow_suspicious: also convert files ``check`` calls suspicious (never malicious ones).
        drop_ema: leave out the EMA weights (``model_ema.*``).
        overwrite: replace existing outputs.
        dry_run: check and plan only; write nothing.
        progress: called with the bytes written.
        db: the catalog whose known sha256 of each input is reused for the provenance metadata.

    Returns:
        One ``TransformResult`` per input (output path, tensors and bytes, dropped entries, warnings).

    Raises:
        UnsafeFileError: an input is malicious or suspicious (exit 4); nothing is written for it.
        CkptlabError: unreadable input, existing output without ``overwrite``, ``out`` with several inputs.
    """
    from ckptlab.ops.convert import convert as _convert

    return _convert(_paths(inputs), out, out_dir, allow_suspicious=allow_suspicious, drop_ema=drop_ema,
                    overwrite=overwrite, dry_run=dry_run, progress=progress, cache=_hash_cache(db))


def prune(inputs: PathLike | Iterable[PathLike], *, ema: str = "drop", precision: str | None = None,
          clamp: bool = False, out_dir: PathLike | None = None, overwrite: bool = False, dry_run: bool = False,
          progress: Progress | None = None, db: PathLike | Catalog | None = None) -> list[TransformResult]:
    """Drop training state and EMA weights (or keep / use EMA), optionally changing precision.

    Args:
        inputs: one model file or several; each writes ``<stem>-pruned[-ema|-emaonly][-<precision>].safetensors``.
        ema: ``drop`` (default), ``keep``, or ``use`` (the EMA weights replace the UNet: "emaonly").
        precision: also convert: ``fp16``, ``bf16`` or ``fp32``.
        clamp: clamp values that overflow fp16 instead of refusing.
        out_dir: folder for the outputs (default: next to each input).
        overwrite: replace existing outputs.
        dry_run: plan and check only; write nothing.
        progress: called with the bytes written.
        db: the catalog whose known sha256s of the inputs are reused.

    Returns:
        One ``TransformResult`` per input; an input with nothing to prune is not written and its result's
        ``unchanged`` says why.

    Raises:
        CkptlabError: unreadable or unsafe input, an existing output, a bad ``ema`` or ``precision``.
    """
    from ckptlab.ops.prune import prune as _prune

    return _prune(_paths(inputs), ema=ema, precision=precision, clamp=clamp,
                  out_dir=Path(out_dir) if out_dir else None, overwrite=overwrite, dry_run=dry_run,
                  progress=progress or _null(), cache=_hash_cache(db), skip_unchanged=True)


def precision(inputs: PathLike | Iterable[PathLike], to: str, *, only: str | list[str] | None = None, clamp: bool = False,
              out_dir: PathLike | None = None, overwrite: bool = False, dry_run: bool = False,
              progress: Progress | None = None, db: PathLike | Catalog | None = None) -> list[TransformResult]:
    """Convert weights exactly (as ``tensor.to(dtype)``) into ``<stem>-<to>.safetensors``; the VAE stays fp32
    unless ``only=["vae"]``.

    Args:
        inputs: one model file or several.
        to: ``fp16``, ``bf16``, ``fp32`` or ``fp8_e4m3fn``.
        only: convert only these components: ``unet``, ``vae``, ``te`` (one name or a list).
        clamp: clamp values that overflow the target instead of refusing.
        out_dir, overwrite, dry_run, progress, db: as for ``prune``.

    Returns:
        One ``TransformResult`` per input (``unchanged`` set where nothing would change; nothing written then).

    Raises:
        CkptlabError: unreadable or unsafe input, an existing output, an unknown dtype, an overflow.
    """
    from ckptlab.ops.precision import convert_precision

    return convert_precision(_paths(inputs), to, only=[only] if isinstance(only, str) else only, clamp=clamp, out_dir=Path(out_dir) if out_dir else None,
                             overwrite=overwrite, dry_run=dry_run, progress=progress or _null(), cache=_hash_cache(db),
                             skip_unchanged=True)


def extract(inputs: PathLike | Iterable[PathLike], component: str, *, out: PathLike | None = None,
            out_dir: PathLike | None = None, overwrite: bool = False, dry_run: bool = False,
            progress: Progress | None = None, db: PathLike | Catalog | None = None) -> list[TransformResult]:
    """Write one component of a checkpoint as a standalone file (``<stem>-<component>.safetensors``).

    Args:
        inputs: one checkpoint or several.
        component: ``unet``, ``vae``, ``clip_l``, ``clip_g``, ``openclip_h``, ``t5xxl`` or ``ema``.
        out: the output file (one input only).
        out_dir, overwrite, dry_run, progress, db: as for ``prune``.

    Returns:
        One ``TransformResult`` per input.

    Raises:
        CkptlabError: the component is not in the file, unreadable or unsafe input, an existing output.
    """
    from ckptlab.ops.components import extract as _extract

    return _extract(_paths(inputs), component, out=Path(out) if out else None,
                    out_dir=Path(out_dir) if out_dir else None, overwrite=overwrite, dry_run=dry_run,
                    progress=progress or _null(), cache=_hash_cache(db))


def replace(inputs: PathLike | Iterable[PathLike], *, vae: PathLike | None = None, clip_l: PathLike | None = None,
            clip_g: PathLike | None = None, unet: PathLike | None = None, out: PathLike | None = None,
            out_dir: PathLike | None = None, overwrite: bool = False, dry_run: bool = False,
            progress: Progress | None = None, db: PathLike | Catalog | None = None) -> list[TransformResult]:
    """Bake components into checkpoints (``<stem>-baked.safetensors``), checking family and every shape first.

    Args:
        inputs: one checkpoint or several.
        vae, clip_l, clip_g, unet: the component files to bake in (at least one).
        out: the output file (one input only).
        out_dir, overwrite, dry_run, progress, db: as for ``prune``.

    Returns:
        One ``TransformResult`` per input (``converted``: tensors replaced).

    Raises:
        MismatchError: a component of another family or shape. CkptlabError: nothing to replace,
        unreadable or unsafe input, an existing output.
    """
    from ckptlab.ops.components import replace as _replace

    def p(x):
        return Path(x) if x is not None else None

    return _replace(_paths(inputs), vae=p(vae), clip_l=p(clip_l), clip_g=p(clip_g), unet=p(unet), out=p(out),
                    out_dir=p(out_dir), overwrite=overwrite, dry_run=dry_run, progress=progress or _null(),
                    cache=_hash_cache(db))


def to_diffusers(input: PathLike, out: PathLike | None = None, *, out_dir: PathLike | None = None, ema: str = "drop",
                 precision: str | None = None, clamp: bool = False, overwrite: bool = False, dry_run: bool = False,
                 progress: Progress | None = None, db: PathLike | Catalog | None = None) -> FolderResult:
    """Write a diffusers folder that ``StableDiffusion(XL)Pipeline.from_pretrained`` loads offline.

    Args:
        input: an SD1/SD2/SDXL single-file checkpoint.
        out: the output folder; default ``<stem>-diffusers`` next to the input or in ``out_dir``.
        out_dir: the folder to put the output folder in (created when missing).
        ema: ``drop`` (default) or ``use`` the EMA weights for the UNet.
        precision: cast UNet and text encoders: ``fp16``, ``bf16`` or ``fp32``.
        clamp: clamp values that overflow fp16 instead of refusing.
        overwrite, dry_run, progress, db: as for ``prune``.

    Returns:
        A ``FolderResult`` (family, files written and their tensor counts, warnings).

    Raises:
        CkptlabError: not a convertible checkpoint, unsafe input, an existing output folder.
    """
    from ckptlab.ops.diffusers_io import to_diffusers as _to
    from ckptlab.ops.stream import output_path

    src = Path(input)
    target = Path(out) if out is not None else output_path(src, Path(out_dir) if out_dir else None, "-diffusers", ext="")
    return _to(src, target, ema=ema, precision=precision, clamp=clamp, overwrite=overwrite, dry_run=dry_run,
               progress=progress or _null(), cache=_hash_cache(db), create_parent=out is None)


def from_diffusers(input: PathLike, out: PathLike | None = None, *, out_dir: PathLike | None = None,
                   overwrite: bool = False, dry_run: bool = False, progress: Progress | None = None,
                   db: PathLike | Catalog | None = None) -> TransformResult:
    """Write a single-file checkpoint (A1111/ComfyUI layout) from a diffusers pipeline folder.

    Args:
        input: the diffusers folder (with a ``model_index.json``).
        out: the output ``.safetensors``; default ``<folder name>.safetensors`` next to it or in ``out_dir``.
        out_dir, overwrite, dry_run, progress, db: as for ``to_diffusers``.

    Returns:
        A ``TransformResult``.

    Raises:
        FormatError: not a diffusers pipeline folder. CkptlabError: an existing output, nothing to write.
    """
    from ckptlab.ops.diffusers_io import from_diffusers as _from
    from ckptlab.ops.stream import output_path

    src = Path(input)
    target = Path(out) if out is not None else output_path(src, Path(out_dir) if out_dir else None, "")
    return _from(src, target, overwrite=overwrite, dry_run=dry_run, progress=progress or _null(), cache=_hash_cache(db),
                 create_parent=out is None)


def merge(method: str, models: Iterable[PathLike], output: PathLike, *, alpha: float | str | None = None,
          beta: float | str | None = None, gamma: float | None = None, density: float | str | None = None,
          seed: int | None = None, precision: str | None = None, merge_dtype: str | None = None,
          missing: str | None = None, vae: PathLike | None = None, prune: bool = False, threads: int = 2,
          device: str = "cpu", overwrite: bool = False, progress: Progress | None = None,
          db: PathLike | Catalog | None = None) -> MergeResult:
    """Merge models, streaming one tensor at a time (needs torch: ``pip install ckptlab[merge]``).

    Args:
        method: ``weighted_sum``, ``add_difference``, ``triple_sum``, ``sum_twice``, ``slerp``,
            ``train_difference``, ``ties``, ``dare``, ``add_cosine``, ``subtract``, ``extract``.
        models: A, B [, C ...]; A decides layout and dtype.
        output: the output ``.safetensors``.
        alpha: a number, or block weights (a preset such as ``GRAD_V``, 26/20 values, ``"IN=0.2,OUT=0.8"``).
        beta, gamma, density, seed: the method's other parameters (see ``ckptlab merge --list-methods``).
        precision: output dtype: ``fp16``, ``bf16``, ``fp32``, ``fp64``, ``fp8_e4m3fn``, ``fp8_e5m2`` (default A's).
        merge_dtype: math dtype: ``fp32`` (default), ``fp64``, ``fp16``, ``bf16``.
        missing: keys not in every input: ``keep-a`` (default), ``union``, ``intersect``, ``error``.
        vae: bake this VAE into the output.
        prune: drop EMA weights and training state.
        threads, device: compute threads and device (``cpu``, ``cuda``, ``cuda:N``); output bytes do not
            depend on ``threads``.
        overwrite, progress, db: as for ``prune``.

    Returns:
        A ``MergeResult`` (output, family, tensors, bytes, per-step counts, pinned inputs, warnings).

    Raises:
        CkptlabError: an unknown method or parameter, incompatible models, an existing output; a one-line
        error naming ``ckptlab[merge]`` when torch is not installed.
    """
    from ckptlab.merging import merge as _merge

    params = {"alpha": alpha, "beta": beta, "gamma": gamma, "density": density}
    return _merge(method, _paths(models), output, params=params, dtype=precision, merge_dtype=merge_dtype,
                  missing=missing, seed=seed, prune=prune, vae=vae, overwrite=overwrite, threads=threads,
                  device=device, progress=progress, cache=_hash_cache(db))


# ------------------------------------------------------------------------------------------- library


def scan(roots: PathLike | Iterable[PathLike], *, db: PathLike | Catalog | None = None, hash: bool = False,
         fingerprint: bool = False, extra_model_paths: PathLike | None = None, jobs: int | None = None,
         progress: Progress | None = None) -> ScanSummary:
    """Walk model folders into the catalog (incremental: unchanged files are not read again).

    Args:
        roots: one folder or several (A1111/ComfyUI roots, or any folder).
        db: the catalog (created when missing).
        hash: also compute the six CivitAI hashes (one read per file).
        fingerprint: also compute tensor fingerprints (for duplicates across forms).
        extra_model_paths: a ComfyUI ``extra_model_paths.yaml`` whose folders to scan too.
        jobs: processes reading new files (default: CPUs, at most 8).
        progress: called with the bytes read.

    Returns:
        A ``ScanSummary`` (files, new / changed / moved / missing counts, errors, unsafe counts, bad roots).

    Raises:
        CatalogError: the catalog cannot be opened or written. CkptlabError: nothing to scan.
    """
    from ckptlab.library.scanner import scan as _scan

    with _catalog(db) as cat:
        return _scan(_paths(roots), cat, hash=hash, fingerprint=fingerprint, extra_model_paths=extra_model_paths,
                     progress=progress, workers=jobs)


def hash_file(path: PathLike, *, db: PathLike | Catalog | None = None, progress: Progress | None = None) -> Hashes:
    """SHA256, AutoV1, AutoV2, AutoV3, CRC32 and BLAKE3 of one file, in one read (UPPER-case, as CivitAI).

    Args:
        path: the file.
        db: a catalog used as a hash cache: a file it knows unchanged (same device, inode, size and
            mtime) is not read again, and new hashes are stored there. None: always computed, no catalog.
        progress: called with the bytes read.

    Returns:
        ``Hashes`` (``sha256``, ``autov1``, ``autov2``, ``autov3`` (None for non-safetensors), ``crc32``,
        ``blake3``, ``size``).

    Raises:
        CkptlabError: the file cannot be read (or is a folder).
    """
    from ckptlab.hashes import Hashes
    from ckptlab.hashes import hash_file as _hash

    if db is None:
        return _hash(path, progress=progress)
    from ckptlab.library.scanner import hash_paths

    with _catalog(db) as cat:
        d = hash_paths([path], cat, progress=progress)[0]
    return Hashes(**{k: d[k] for k in Hashes.__dataclass_fields__})


def dupes(*, db: PathLike | Catalog | None = None, prefer_smaller: bool = False, components: bool = False,
          link: str = "auto") -> DupesResult:
    """Every model the catalog holds more than once (same bytes, or the same weights in another form), with
    the copy to keep and what would happen to each other copy. Nothing is changed.

    Args:
        db: the catalog (it must exist; run ``scan`` with ``hash=True`` / ``fingerprint=True`` first).
        prefer_smaller: keep the lower-precision copy of same-weight files.
        components: also list models sharing one component (same UNet, other VAE).
        link: what copies in UI folders become: ``auto`` (hard link on the same filesystem, else
            symlink), ``hard``, ``sym``, or ``none`` (removed).

    Returns:
        A ``DupesResult``: ``groups`` (each with ``copies``, ``keep`` and ``bytes_freed``), ``bytes_freed``,
        and how many files were not hashed / fingerprinted.

    Raises:
        CatalogError: no catalog there. CkptlabError: an unknown ``link``.
    """
    from ckptlab.library.dupes import find_dupes

    with _catalog(db, must_exist=True) as cat:
        return find_dupes(cat, prefer_smaller=prefer_smaller, components=components, link=link)


def show(target: PathLike, *, db: PathLike | Catalog | None = None) -> list[dict]:
    """Everything known about one file: identification, hashes, fingerprints, sidecars, copies, CivitAI link.

    Args:
        target: a catalogued path, or a hash (SHA256, AutoV1/2/3, CRC32, BLAKE3; a prefix of 8+ hex digits).
        db: the catalog (it must exist).

    Returns:
        One dict per matching file, as ``ckptlab show --json`` prints them.

    Raises:
        CkptlabError: nothing in the catalog matches (exit 1), or no catalog there.
    """
    from ckptlab.library.show import show_file

    with _catalog(db, must_exist=True) as cat:
        # imported after opening, as by `ckptlab show`: reading a catalog adds none of the hub's tables
        from ckptlab.hub.link import link_lookup

        return show_file(cat, os.fspath(target), civitai=link_lookup(cat))


# ----------------------------------------------------------------------------------------------- hub


def link(paths: PathLike | Iterable[PathLike] | None = None, *, db: PathLike | Catalog | None = None,
         write_sidecars: bool = False, refresh: bool = False, nsfw_previews: bool = False,
         base_url: str | None = None, progress: Progress | None = None) -> LinkReport:
    """Look files up on CivitAI by SHA256 (AutoV3 for safetensors LoRAs) and store the links in the catalog.

    Args:
        paths: files or folders (scanned into the catalog first, with hashes); None: every catalogued file.
        db: the catalog.
        write_sidecars: write ``<name>.civitai.info``, ``<name>.json`` (if absent) and a preview image.
        refresh: re-check linked files; changed records become new revisions (nothing is ever lost).
        nsfw_previews: allow R/X rated images as previews.
        base_url: the CivitAI site (default: ``$CKPTLAB_CIVITAI_URL``, the config file, civitai.com).
        progress: called once per file linked.

    Returns:
        A ``LinkReport``: one ``LinkOutcome`` per file (``status`` linked, inherited, already, refreshed,
        updated, not_found, kept or error, with the model and version names and ids).

    Raises:
        CkptlabError: a path that does not exist, nothing to link, a bad base URL. Network failures are
        reported per file (status ``error``), not raised.
    """
    from ckptlab.hub.civitai import CivitaiClient
    from ckptlab.hub.config import load_hub_config
    from ckptlab.hub.link import link_paths

    cfg = load_hub_config(base_url=base_url)
    named = _paths(paths) if paths is not None else []
    with _catalog(db, must_exist=paths is None) as cat, CivitaiClient(cfg) as client:
        return link_paths(cat, client, None, named=named, refresh=refresh, write_sidecars=write_sidecars,
                          allow_nsfw=nsfw_previews, progress=progress)


def download(source: str, *, dest: PathLike | None = None, layout: str | None = None, model_type: str | None = None,
             file_id: int | None = None, write_sidecars: bool = False, catalog: bool = True,
             base_url: str | None = None, db: PathLike | Catalog | None = None,
             progress: Progress | None = None) -> DownloadResult:
    """Download one model into the library: resumable (``.part`` + Range), SHA256-verified, then catalogued.

    Args:
        source: ``civitai:ID``, ``civitai:model/ID``, a civitai.com URL or AIR, ``hf:ORG/REPO/PATH[@REV]`` or a URL.
        dest: the library / install root (default: the config's ``[download] dir``, else the current folder).
        layout: ``auto`` (from the folders present), ``a1111``, ``comfyui`` or ``flat``.
        model_type: the folder type for URL/hf sources (``lora``, ``checkpoint``, ``vae`` ...).
        file_id: the CivitAI ``files[].id`` to take instead of the primary file.
        write_sidecars: also write CivitAI sidecars and a preview.
        catalog: catalog (and link) the downloaded file.
        base_url: the CivitAI site.
        db: the catalog.
        progress: called with the bytes received.

    Returns:
        A ``DownloadResult`` (path, size, sha256, whether it was already there or resumed, source ids).

    Raises:
        NetworkError: the transfer failed (a partial file stays for a resume). VerificationError: the
        bytes do not match the published hash. CkptlabError: a bad source, an existing different file.
    """
    from ckptlab.hub.config import load_hub_config
    from ckptlab.hub.fetch import download as _download

    cfg = load_hub_config(base_url=base_url, download_dir=dest, layout=layout)
    return _download(source, dest=dest, layout=layout, model_type=model_type, config=cfg, catalog=catalog,
                     write_sidecars=write_sidecars, file_id=file_id, progress=progress, db=_db_path(db))


# ------------------------------------------------------------------------------------------- LoRA


def lora_bake(base: PathLike, loras: PathLike | Iterable[PathLike], output: PathLike, *,
              strengths: float | Iterable[float] | None = None, te_strengths: float | Iterable[float] | None = None,
              precision: str | None = None, overwrite: bool = False, dry_run: bool = False,
              progress: Progress | None = None, db: PathLike | Catalog | None = None) -> BakeResult:
    """Bake LoRAs into a checkpoint (or a standalone UNet/DiT/text encoder), streaming (``ckptlab lora bake``).

    Args:
        base: the model the LoRAs are baked into.
        loras: one LoRA / LyCORIS file or several (kohya, PEFT, diffusers, ComfyUI, XLabs namings).
        output: the output ``.safetensors``.
        strengths: one per LoRA in order, or one for all (default 1.0).
        te_strengths: the same for text-encoder weights (default: the strengths).
        precision: ``fp16``, ``bf16`` or ``fp32`` for the output's float weights (default: the base's).
        overwrite, dry_run, progress, db: as for ``prune``.

    Returns:
        A ``BakeResult``: per LoRA the modules matched and the names that matched nothing, warnings.

    Raises:
        CkptlabError: a LoRA of another family or one that matches nothing, unsafe inputs, an existing output;
        a one-line error naming ``ckptlab[torch]`` when torch is not installed.
    """
    from ckptlab.lora.bake import bake

    return bake(Path(base), _paths(loras), Path(output), strengths=_floats(strengths),
                te_strengths=_floats(te_strengths), dtype=precision, overwrite=overwrite, dry_run=dry_run,
                progress=progress or _null(), cache=_hash_cache(db))


def lora_extract(tuned: PathLike, base: PathLike, output: PathLike, *, rank: int, conv_rank: int | None = None,
                 sv_fro: float | None = None, sv_ratio: float | None = None, clamp_quantile: float | None = None,
                 min_diff: float | None = None, precision: str | None = None, overwrite: bool = False,
                 dry_run: bool = False, progress: Progress | None = None,
                 db: PathLike | Catalog | None = None) -> ExtractResult:
    """Extract a kohya LoRA of ``tuned - base`` by SVD, one module at a time (``ckptlab lora extract``).

    Args:
        tuned, base: the fine-tuned model and the model it was tuned from (one family).
        output: the output ``.safetensors``.
        rank: the rank of every linear / 1x1 module (the cap when ``sv_fro`` / ``sv_ratio`` choose it).
        conv_rank: also extract 3x3 convs (LoCon) at this rank.
        sv_fro, sv_ratio: choose each module's rank from its singular values (kohya's rules).
        clamp_quantile: kohya's quantile clamp (off by default: it costs accuracy).
        min_diff: text encoders are skipped when no weight moved more than this (default 0.01, kohya's).
        precision, overwrite, dry_run, progress, db: as for ``lora_bake``.

    Returns:
        An ``ExtractResult`` with each module's relative Frobenius error and the total.

    Raises:
        CkptlabError: models of different families, a bad rank option, unsafe inputs, an existing output.
    """
    from ckptlab.lora.extract import MIN_DIFF, extract

    return extract(Path(tuned), Path(base), Path(output), rank=rank, conv_rank=conv_rank, sv_fro=sv_fro,
                   sv_ratio=sv_ratio, clamp_quantile=clamp_quantile,
                   min_diff=MIN_DIFF if min_diff is None else min_diff, dtype=precision, overwrite=overwrite,
                   dry_run=dry_run, progress=progress or _null(), cache=_hash_cache(db))


def lora_resize(lora: PathLike, output: PathLike, *, rank: int | None = None, sv_ratio: float | None = None,
                sv_cumulative: float | None = None, sv_fro: float | None = None, precision: str | None = None,
                overwrite: bool = False, dry_run: bool = False, progress: Progress | None = None,
                db: PathLike | Catalog | None = None) -> ResizeResult:
    """Change a LoRA's rank by SVD, keeping alpha/rank (``ckptlab lora resize``).

    Args:
        lora: the LoRA to resize.
        output: the output ``.safetensors``.
        rank: the new rank (the cap when a dynamic rule is given too).
        sv_ratio, sv_cumulative, sv_fro: kohya's dynamic rules (singular values above max/ratio; cumulative sum;
            Frobenius share).
        precision, overwrite, dry_run, progress, db: as for ``lora_bake``.

    Returns:
        A ``ResizeResult`` with each module's old and new rank and the share of it retained.

    Raises:
        CkptlabError: no rank option or a bad one, a file that is no LoRA, an existing output.
    """
    from ckptlab.lora.resize import resize

    return resize(Path(lora), Path(output), rank=rank, sv_ratio=sv_ratio, sv_cumulative=sv_cumulative,
                  sv_fro=sv_fro, dtype=precision, overwrite=overwrite, dry_run=dry_run,
                  progress=progress or _null(), cache=_hash_cache(db))


def lora_merge(loras: Iterable[PathLike], output: PathLike, *, strengths: float | Iterable[float] | None = None,
               rank: int | None = None, precision: str | None = None, overwrite: bool = False,
               dry_run: bool = False, progress: Progress | None = None,
               db: PathLike | Catalog | None = None) -> LoraMergeResult:
    """Merge LoRAs into one LoRA (``ckptlab lora merge``).

    Args:
        loras: the LoRAs (one family).
        output: the output ``.safetensors``.
        strengths: one per LoRA, or one for all (default 1.0); negative values subtract.
        rank: re-factor the exact sum by SVD to this rank (default: exact, ranks concatenated with each LoRA's
            strength and alpha/rank folded in, so the result loads as the weighted sum).
        precision, overwrite, dry_run, progress, db: as for ``lora_bake``.

    Returns:
        A ``LoraMergeResult`` (modules, output rank, errors when re-factored).

    Raises:
        CkptlabError: LoRAs of different families, a strength count that fits neither rule, an existing output.
    """
    from ckptlab.lora.combine import merge

    return merge(_paths(loras), Path(output), strengths=_floats(strengths), rank=rank, dtype=precision,
                 overwrite=overwrite, dry_run=dry_run, progress=progress or _null(), cache=_hash_cache(db))


def lora_convert(lora: PathLike, output: PathLike, *, to: str, family: str | None = None, overwrite: bool = False,
                 dry_run: bool = False, progress: Progress | None = None,
                 db: PathLike | Catalog | None = None) -> LoraConvertResult:
    """Rename a LoRA to another naming style (``ckptlab lora convert``).

    Args:
        lora: the LoRA to convert.
        output: the output ``.safetensors``.
        to: ``kohya``, ``peft``, ``diffusers`` or ``comfy``; tensors are copied unchanged where the layout
            allows, so round trips are bit-exact.
        family: the family where the file cannot tell (a PEFT file of SD1 or SD2).
        overwrite, dry_run, progress, db: as for ``lora_bake``.

    Returns:
        A ``LoraConvertResult`` (modules in and out, fused or split modules).

    Raises:
        CkptlabError: an unknown style or family, module names that match nothing, an existing output.
    """
    from ckptlab.lora.convert import convert

    return convert(Path(lora), Path(output), to=to, family=family, overwrite=overwrite, dry_run=dry_run,
                   progress=progress or _null(), cache=_hash_cache(db))


def lora_info(path: PathLike) -> LoraInfo:
    """What a LoRA is (``ckptlab lora info``).

    Args:
        path: a LoRA / LyCORIS file.

    Returns:
        A ``LoraInfo``: naming and algorithms, family, rank/alpha, the blocks and text encoders it covers, the
        kohya training summary, ranked trigger words, and whether ``sshs_model_hash`` matches the file.

    Raises:
        CkptlabError: a file that is no LoRA, unreadable or unsafe.
    """
    from ckptlab.lora.info import info

    return info(Path(path))


# ------------------------------------------------------------------------------------------- images


def _settings(prompt: str, negative: str, seed: int, steps: int, cfg: float, size, sampler: str | None,
              schedule: str | None, clip_skip: int, refiner_switch: float = 0.8):
    from ckptlab.imaging.render import Settings, parse_size

    if size is None:
        width = height = None
    elif isinstance(size, int):
        width = height = size
    elif isinstance(size, str):
        width, height = parse_size(size)
    else:
        width, height = (int(v) for v in size)
    return Settings(prompt, negative, seed, steps, cfg, width, height, sampler, schedule, clip_skip, refiner_switch)


def _loras(loras) -> list[tuple[Path, float]]:
    """``FILE``, ``"FILE:S"``, ``(FILE, S)`` or a list of them -> ``[(path, strength)]``."""
    from ckptlab.imaging.render import parse_lora

    if loras is None:
        return []
    if isinstance(loras, (str, os.PathLike)) or (isinstance(loras, tuple) and len(loras) == 2
                                                  and isinstance(loras[1], (int, float))):
        loras = [loras]
    out = []
    for x in loras:
        if isinstance(x, tuple):
            out.append((Path(x[0]), float(x[1])))
        elif isinstance(x, os.PathLike):
            out.append((Path(x), 1.0))
        else:
            out.append(parse_lora(str(x)))
    return out


def generate(model: PathLike, output: PathLike, prompt: str, *, negative: str = "", seed: int = -1,
             steps: int = 20, cfg: float = 7.0, size: str | int | tuple[int, int] | None = None,
             sampler: str | None = None, schedule: str | None = None, vae: PathLike | None = None,
             loras=None, refiner: PathLike | None = None, refiner_switch: float = 0.8, clip_skip: int = 1,
             device: str = "auto", precision: str | None = None, count: int = 1, overwrite: bool = False,
             progress: Progress | None = None, db: PathLike | Catalog | None = None) -> GenerateResult:
    """Render images from a model, offline, each with A1111's infotext (``ckptlab generate``).

    Args:
        model: a checkpoint (SD1, SD2 eps/v, SDXL, SD3/3.5), a diffusers folder, or a catalog hash or name
            (looked up in ``db``).
        output: the image (``.png``, ``.jpg``, ``.webp``); with ``count`` > 1, ``<stem>-<seed><suffix>``.
        prompt, negative: the prompts.
        seed: the first image's seed (-1: random); image i uses seed + i. Latents come from a CPU
            ``torch.Generator`` seeded with it, as diffusers and A1111's "RNG source: CPU" do.
        steps, cfg: sampling steps and CFG scale.
        size: ``"WxH"``, ``(w, h)`` or one side (default: the family's native size).
        sampler, schedule: as A1111 names them (default DPM++ 2M, Automatic; Euler on SD3).
        vae: a VAE file used instead of the model's (refused before any weight loads when it does not fit).
        loras: LoRA files: ``"FILE"``, ``"FILE:S"``, ``(FILE, S)`` or a list of them.
        refiner, refiner_switch: an SDXL refiner and the fraction of steps the base runs first.
        clip_skip: A1111's Clip skip (1: the last layer).
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        precision: the compute dtype ``fp32``/``fp16``/``bf16`` (default fp32 on CPU, fp16 on CUDA).
        count: how many images.
        overwrite: replace existing images.
        progress: a callback for the sampling steps.
        db: the catalog: hashes it knows are not computed again, and hashes/names given as ``model`` resolve.

    Returns:
        A ``GenerateResult``: the images written, their seeds and infotexts, warnings (an fp16 VAE decoded
        again in fp32, SD3 without T5...).

    Raises:
        CkptlabError: a model diffusers has no pipeline for, a LoRA or VAE of another family, unknown sampler,
        bad values, an existing output; a one-line error naming ``ckptlab[generate]`` when torch/diffusers are
        missing.
    """
    from ckptlab.imaging.models import resolve_model
    from ckptlab.imaging.render import generate as run

    settings = _settings(prompt, negative, seed, steps, cfg, size, sampler, schedule, clip_skip, refiner_switch)
    path = resolve_model(model, db=_db_path(db))
    return run(path, Path(output), settings, count=count, vae=Path(vae) if vae else None, loras=_loras(loras),
               refiner=Path(refiner) if refiner else None, device=device, dtype=precision, overwrite=overwrite,
               cache=_hash_cache(db), progress=progress or _null())


def grid(model: PathLike | None, output: PathLike, prompt: str, *, x: str, y: str | None = None,
         z: str | None = None, merge: PathLike | None = None, cells: PathLike | None = None, legend: bool = True,
         negative: str = "", seed: int = -1, steps: int = 20, cfg: float = 7.0,
         size: str | int | tuple[int, int] | None = None, sampler: str | None = None, schedule: str | None = None,
         vae: PathLike | None = None, loras=None, refiner: PathLike | None = None, refiner_switch: float = 0.8,
         clip_skip: int = 1, device: str = "auto", precision: str | None = None, overwrite: bool = False,
         progress: Progress | None = None, db: PathLike | Catalog | None = None) -> GridResult:
    """Render an X/Y/Z comparison grid (``ckptlab grid``): the same prompt and seed across models, in-memory merge
    ratios, LoRA strengths, VAEs and settings.

    Args:
        model: the model of every cell, unless an axis is ``model`` or ``merge`` is given (then None).
        output: the grid image; re-saved after every row.
        prompt: the prompt (``prompt`` axes search and replace in it).
        x, y, z: axes as ``"AXIS=V1,V2,..."`` (A1111's ranges ``1-5``, ``1-5 (+2)``, ``1-10 [5]``); axes: model,
            merge:PARAM (or the recipe's PARAM), lora, lora:NAME, seed, steps, cfg, sampler, schedule, vae,
            clip-skip, size, prompt.
        merge: a merge recipe (``.toml``, or a model made by ``merge``) computed in memory, never written.
        cells: a folder where each cell is saved with its own infotext.
        legend: draw the line of shared settings under the grid.
        negative, seed, steps, cfg, size, sampler, schedule, vae, loras, refiner, refiner_switch, clip_skip,
            device, precision, overwrite, progress, db: as for ``generate`` (``seed`` -1: one random seed for
            the whole grid).

    Returns:
        A ``GridResult``: the grid's size and shape, the cells written, model loads, warnings.

    Raises:
        CkptlabError: an unknown axis or bad range, a model or VAE that cannot render, an existing output.
    """
    from ckptlab.imaging.grid import grid as run
    from ckptlab.imaging.grid_axes import parse_axis

    settings = _settings(prompt, negative, seed, steps, cfg, size, sampler, schedule, clip_skip, refiner_switch)
    params: tuple[str, ...] = ()
    if merge is not None:
        from ckptlab.imaging.grid_merge import load_recipe, swept_params

        params = tuple(swept_params(load_recipe(Path(merge))))
    axes = [parse_axis(a, f"--{n}", merge_params=params) if a is not None else None
            for n, a in (("x", x), ("y", y), ("z", z))]
    return run(model, Path(output), settings, axes, merge=Path(merge) if merge else None,
               vae=Path(vae) if vae else None, loras=_loras(loras), refiner=Path(refiner) if refiner else None,
               device=device, dtype=precision, cells_dir=Path(cells) if cells else None, overwrite=overwrite,
               legend=legend, db=_db_path(db), cache=_hash_cache(db), progress=progress or _null())


def images(paths: PathLike | Iterable[PathLike], *, db: PathLike | Catalog | None = None,
           record: bool = True) -> list[ImageReport]:
    """What made these images, and where the library has each model (``ckptlab images``).

    Args:
        paths: images (``.png``, ``.jpg``, ``.webp``) or folders (searched recursively).
        db: the catalog the models are looked up in (None: no lookup; every model stays unresolved).
        record: keep "images made with this model" in the catalog.

    Returns:
        One ``ImageReport`` per image: prompt, negative, parameters, and each model used (checkpoint, VAE,
        LoRAs, embeddings) with the hashes as written and the catalog file it resolves to (sha256[:10],
        AutoV3[:12], sha256[:12], AutoV1, CivitAI version ids, names), or missing / ambiguous.

    Raises:
        CkptlabError: a file that is not a readable image (truncated, a decompression bomb...), a catalog that
        cannot be read.
    """
    from ckptlab.errors import FormatError
    from ckptlab.imaging.images import catalog_index, read_images, record_links

    index, db_path = catalog_index(_db_path(db)) if db is not None else (None, None)

    def fail(path: str, message: str) -> None:
        raise FormatError(message, path)

    reports = list(read_images([str(p) for p in _paths(paths)], index, fail))
    if record and index is not None:
        record_links(db_path, reports)
    return reports


def preview(models: PathLike | Iterable[PathLike], *, prompt: str = "", negative: str = "", seed: int = 42,
            steps: int = 20, cfg: float = 7.0, size: str | int | tuple[int, int] | None = None,
            sampler: str | None = None, schedule: str | None = None, vae: PathLike | None = None, loras=None,
            base: PathLike | None = None, clip_skip: int = 1, device: str = "auto", precision: str | None = None,
            overwrite: bool = False, progress: Progress | None = None,
            db: PathLike | Catalog | None = None) -> list[PreviewResult]:
    """Render a preview per model and store it as ``<stem>.preview.png`` beside it, recorded in the catalog
    (``ckptlab preview``).

    Args:
        models: model files, diffusers folders, or catalog hashes / names.
        prompt: the prompt (empty: the catalog's trigger words for the model, then a neutral prompt).
        seed: 42 by default, so the preview can be made again.
        base: the checkpoint a LoRA given as a model renders on.
        overwrite: replace an existing ``<stem>.preview.png`` (without it, a model with any preview is skipped).
        negative, steps, cfg, size, sampler, schedule, vae, loras, clip_skip, device, precision, progress, db:
            as for ``generate``.

    Returns:
        One ``PreviewResult`` per model: written, skipped or failed (with the one-line error), the file and
        infotext; a failure does not stop the others.

    Raises:
        CkptlabError: bad options (before any model is touched).
    """
    from ckptlab.imaging.preview import preview as run

    settings = _settings(prompt, negative, seed, steps, cfg, size, sampler, schedule, clip_skip)
    names = [str(m) for m in ([models] if isinstance(models, (str, os.PathLike)) else models)]
    return run(names, settings, db=_db_path(db), base=Path(base) if base else None, vae=Path(vae) if vae else None,
               loras=_loras(loras), device=device, dtype=precision, overwrite=overwrite, cache=_hash_cache(db),
               progress=progress or _null())


def _floats(values: float | Iterable[float] | None) -> list[float] | None:
    """One number or several, as a list (None stays None)."""
    if values is None:
        return None
    if isinstance(values, (int, float)):
        return [float(values)]
    return [float(v) for v in values]


def _null():
    from ckptlab.progress import null_progress

    return null_progress
