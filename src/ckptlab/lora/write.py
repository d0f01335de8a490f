"""The LoRA output writer: the metadata the ecosystem reads, then the one write path of ``ops.stream``.

- kohya ``ss_network_module`` / ``ss_network_dim`` / ``ss_network_alpha`` (the common value, or ``Dynamic`` when
  modules differ: ``train_util.build_minimum_network_metadata``), ``ss_base_model_version`` and ``ss_v2``;
- SAI ModelSpec: ``modelspec.architecture = "<family's modelspec id>/lora"``, ``modelspec.title``;
- ``sshs_model_hash``: SHA-256 of the tensor data *as written* (the writer hashes the bytes it writes and patches
  the header; kohya's ``merge_lora.py`` hashes before its final cast and disagrees with the file);
- provenance (``ckptlab.operation`` / ``inputs`` with each input's sha256 / ``options``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ckptlab.formats.base import TensorInfo
from ckptlab.hashes import NO_CACHE, HashCache
from ckptlab.ops.stream import FileHasher, Out, placeholder, provenance, write_plan
from ckptlab.progress import Progress, null_progress

#: stands in for ``sshs_model_hash`` until the data is written (same length as a hex SHA-256)
DATA_HASH_PLACEHOLDER = "pending-sha256-of-the-written-tensor-data".ljust(64, "~")
SS_MODULE = "networks.lora"


#: alphas are written as fp32 whatever the factors' dtype, so α/r stays exact
ALPHA_DTYPE = "F32"


def factor_items(name: str, shape: tuple[int, ...], rank: int, dtype: str, alpha: float, factors) -> list[Out]:
    """The planned tensors of one kohya module of ``rank`` on a weight of ``shape``: ``.alpha`` (fp32),
    ``.lora_down.weight`` ``[rank, in(, kh, kw)]`` and ``.lora_up.weight`` ``[out, rank(, 1, 1)]`` in ``dtype``.
    ``factors()`` returns ``{"down": …, "up": …}``; it is called once for each of the two (callers cache the pair)."""
    import numpy as np

    if len(shape) == 4:
        dshape, ushape = (rank, *shape[1:]), (shape[0], rank, 1, 1)
    else:
        dshape, ushape = (rank, shape[1]), (shape[0], rank)
    return [Out(f"{name}.alpha", TensorInfo(ALPHA_DTYPE, ()), produce=lambda: np.array(alpha, dtype=np.float32)),
            Out(f"{name}.lora_down.weight", TensorInfo(dtype, dshape), produce=lambda: factors()["down"]),
            Out(f"{name}.lora_up.weight", TensorInfo(dtype, ushape), produce=lambda: factors()["up"])]


#: metadata that described the input's bytes or its own provenance: never carried into an output
STALE_META = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256", "modelspec.hash_legacy",
              "lora_adapter_metadata")


def carried_metadata(meta: dict[str, str]) -> dict[str, str]:
    """An input's metadata minus ``STALE_META`` and earlier ``ckptlab.*`` provenance (rewritten for the output)."""
    return {k: v for k, v in meta.items() if k not in STALE_META and not k.startswith("ckptlab.")}


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def lora_metadata(family: str | None, ranks_alphas: Iterable[tuple[int, float | None]], *, title: str,
                  network_module: str = SS_MODULE, base: dict[str, str] | None = None) -> dict[str, str]:
    """kohya + ModelSpec metadata of a LoRA file whose modules have these ``(rank, alpha)`` (alpha None: rank)."""
    from ckptlab.arch.families import get

    meta = carried_metadata(base or {})
    pairs = [(r, r if a is None else a) for r, a in ranks_alphas]
    dims = {r for r, _ in pairs}
    alphas = {float(a) for _, a in pairs}
    meta["ss_network_module"] = network_module
    meta["ss_network_dim"] = str(next(iter(dims))) if len(dims) == 1 else "Dynamic"
    meta["ss_network_alpha"] = _number(next(iter(alphas))) if len(alphas) == 1 else "Dynamic"
    fam = get(family)
    if fam is not None and fam.kohya:
        meta["ss_base_model_version"] = fam.kohya[0]
        meta["ss_v2"] = str(fam.id == "sd2")
    if fam is not None and fam.modelspec:
        meta["modelspec.sai_model_spec"] = "1.0.0"
        meta["modelspec.architecture"] = f"{fam.modelspec[0]}/lora"
        meta["modelspec.implementation"] = "https://github.com/kohya-ss/sd-scripts"
        meta["modelspec.title"] = title
    meta["sshs_model_hash"] = DATA_HASH_PLACEHOLDER  # (kohya's sshs_legacy_hash is not recomputed: not carried)
    return meta


def write_lora(path: Path, items: list[Out], metadata: dict[str, str], *, operation: str, inputs: list[Path],
               options: dict | None = None, overwrite: bool = False, progress: Progress = null_progress,
               cache: HashCache = NO_CACHE) -> int:
    """Write a LoRA (or any adapter) file atomically; input sha256s and ``sshs_model_hash`` are patched in as the
    write finishes. Returns the bytes of tensor data written."""
    hashers = [FileHasher(p, cache=cache) for p in inputs]
    pending = {placeholder(i): h for i, h in enumerate(hashers)}
    meta = provenance(operation, [(p, placeholder(i)) for i, p in enumerate(inputs)], options, base=metadata)
    return write_plan(Path(path), items, meta, progress=progress, overwrite=overwrite, pending=pending,
                      data_hash=DATA_HASH_PLACEHOLDER if DATA_HASH_PLACEHOLDER in meta.values() else None)
