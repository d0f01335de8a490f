"""Tensor fingerprints: an identity for a model's weights that survives format changes.

For each component (``split_components``: ``unet``, ``vae``, ``clip_l``...; LoRAs, embeddings and
other single-purpose files are one component, ``model``) the fingerprint is SHA-256 over the sorted
lines ``<canonical key> TAB <shape> TAB <BLAKE3 of the canonical values>``. Canonicalisation makes
these transforms invisible:

- **keys**: the group prefix is dropped (``model.diffusion_model.``, ``first_stage_model.``,
  ``cond_stage_model.transformer.``, ``conditioner.embedders.N.``..., so a checkpoint's VAE equals the
  same VAE saved alone); old CLIP-L naming without ``text_model.`` is mapped to the HF naming;
  ``position_ids`` (optional, often corrupted by merges) are left out.
- **left out**: EMA weights and training state (``model_ema.*``, optimizer/Lightning state), LDM
  schedule buffers and marker keys -- pruning removes them, they are not the model.
- **values**: floating tensors are cast to fp16 (round to nearest even) before hashing, so an fp32
  file and the fp16 file made from it give the same bytes; integers hash as int64, bools as uint8.
- metadata and container (pickle ``.ckpt`` vs safetensors) never enter the hash.
- a diffusers pipeline folder is read under the single-file names and shapes ``from-diffusers`` maps
  it to (``ops.diffusers_io.plan_from_diffusers``: VAE attention linear -> 1x1 conv, OpenCLIP q/k/v
  fused), so the folder ``to-diffusers`` wrote has the fingerprint of the file it came from.

The file fingerprint is SHA-256 over the sorted ``component:fingerprint`` lines.

**bf16**: no single canonical form can equate fp32, its fp16 copy and its bf16 copy (double rounding:
``bf16(fp16(x)) != bf16(x)`` for some ``x``, and fp16's narrower range and subnormals lose what bf16
keeps; see docs/library.md). So a second, *bf16 fingerprint* is computed the same way with floats
rounded to bf16 (round to nearest even, as ``torch.Tensor.to(torch.bfloat16)``): defined for files
whose float tensors are all F32/F64/BF16 (a BF16 tensor hashes as it is), ``None`` as soon as one is
F16 or FP8 (their values cannot be brought back to what bf16 rounding of the source gives). Equal bf16
fingerprints mean every BF16 tensor is exactly the bf16 rounding of the other file's F32 tensor.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ckptlab.progress import Progress, null_progress

IGNORED_COMPONENTS = frozenset({"ema", "training"})
_CLIP_HF_TOP = ("text_model.", "text_projection", "logit_scale")


@dataclass(frozen=True)
class Fingerprint:
    fingerprint: str
    components: dict[str, str]
    n_tensors: int
    bf16: str | None = None  # the bf16 fingerprint (module doc), None when not defined for this file
    bf16_components: dict[str, str] | None = None

_BF16_SOURCES = frozenset({"F32", "F64", "BF16"})  # float dtypes whose bf16 rounding is well defined


def canonical_keys(keys) -> dict[str, dict[str, str]]:
    """``{component: {canonical key: original key}}`` for the keys that take part in the fingerprint."""
    from ckptlab.arch.components import MARKER_KEYS, SCHEDULE_KEYS, component_prefix, split_components

    comps = split_components(list(keys))
    primary = [c for c in comps if c not in IGNORED_COMPONENTS and c != "other"]
    out: dict[str, dict[str, str]] = {}
    for comp, ks in comps.items():
        if comp in IGNORED_COMPONENTS or (comp == "other" and primary):
            continue
        name = "model" if comp == "other" else comp
        for k in ks:
            if k in SCHEDULE_KEYS or k in MARKER_KEYS or k.endswith("position_ids"):
                continue
            rest = k[len(component_prefix(k)):] if comp != "other" else k
            if comp == "clip_l" and not rest.startswith(_CLIP_HF_TOP) and rest.startswith(
                    ("embeddings.", "encoder.", "final_layer_norm.")):
                rest = "text_model." + rest
            out.setdefault(name, {})[rest] = k
    return out


#: float dtypes a fingerprint rounds (torch's ``is_floating_point``): the fp8 kinds ckptlab only reads included
_ROUNDED = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"})


def _tensor_digest(tensor, bf16: bool = False) -> str:
    """BLAKE3 of the canonical values: floats rounded to fp16 (or to bf16 with ``bf16=True``) with torch's
    rounding (``formats.cast``), booleans as bytes, complex numbers as fp16 pairs, integers as int64. Takes a
    numpy array or a torch tensor; needs no torch."""
    import blake3
    import numpy as np

    from ckptlab.formats.arrays import as_array
    from ckptlab.formats.cast import cast
    from ckptlab.formats.dtypes import dtype_of

    a = as_array(tensor)
    name = dtype_of(a)
    if name in _ROUNDED:
        a = cast(a, "BF16" if bf16 else "F16")
    elif name == "BOOL":
        a = a.view(np.uint8)
    elif name == "C64":
        a = cast(np.ascontiguousarray(a).view(np.float32), "F16")  # torch.view_as_real, then fp16
    else:
        a = a.astype(np.int64)
    if a.size == 0:
        return blake3.blake3(b"").hexdigest()
    return blake3.blake3(np.ascontiguousarray(a).reshape(-1).view(np.uint8)).hexdigest()


def _plan(infos) -> tuple[dict[str, dict[str, str]], bool]:
    """The components and keys a fingerprint hashes, and whether its bf16 form is defined."""
    from ckptlab.formats.dtypes import FLOAT_DTYPES

    comps = canonical_keys(infos)
    with_bf16 = all(infos[k].dtype in _BF16_SOURCES for m in comps.values() for k in m.values()
                    if infos[k].dtype in FLOAT_DTYPES)
    return comps, with_bf16


def _digests(t, dtype: str, with_bf16: bool) -> tuple[str, str | None]:
    """(fp16-canonical digest, bf16-canonical digest or None) of one tensor."""
    from ckptlab.formats.dtypes import FLOAT_DTYPES

    d = _tensor_digest(t)
    if not with_bf16:
        return d, None
    return d, (d if dtype not in FLOAT_DTYPES else _tensor_digest(t, bf16=True))


def fingerprint_source(src, progress: Progress | None = None, digests: dict | None = None) -> Fingerprint:
    """Fingerprint an open ``TensorSource`` reading one tensor at a time (``digests``: ``key -> (digest,
    bf16 digest)`` already computed, e.g. while the file streamed past: ``stream_content``)."""
    progress = progress or null_progress
    from ckptlab.formats.dtypes import FLOAT_DTYPES

    infos = src.infos()
    comps, with_bf16 = _plan(infos)
    result: dict[str, str] = {}
    result_bf16: dict[str, str] = {}
    n = 0
    for comp, mapping in comps.items():
        lines, lines_bf16 = [], []
        for canon in sorted(mapping):
            key = mapping[canon]
            ti = infos[key]
            if digests is not None:
                d, d_bf16 = digests[key]
            else:
                t = src.array(key)
                d, d_bf16 = _digests(t, ti.dtype, with_bf16)
                del t
                progress(ti.nbytes)
            lines.append(f"{canon}\t{list(ti.shape)}\t{d}\n")
            if with_bf16:
                same = ti.dtype not in FLOAT_DTYPES  # integers: the same canonical bytes either way
                lines_bf16.append(lines[-1] if same else f"{canon}\t{list(ti.shape)}\t{d_bf16}\n")
            n += 1
        result[comp] = hashlib.sha256("".join(lines).encode()).hexdigest()
        if with_bf16:
            result_bf16[comp] = hashlib.sha256(("bf16\n" + "".join(lines_bf16)).encode()).hexdigest()
    return Fingerprint(fingerprint=_whole(result), components=result, n_tensors=n,
                       bf16=_whole(result_bf16) if with_bf16 else None,
                       bf16_components=result_bf16 if with_bf16 else None)


def _whole(components: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{c}:{components[c]}\n" for c in sorted(components)).encode()).hexdigest()


class _PlannedSource:
    """The tensors a plan of ``Out`` items would write, read one at a time (``infos`` / ``array``)."""

    def __init__(self, items):
        self._items = {it.key: it for it in items}

    def infos(self):
        return {k: it.info for k, it in self._items.items()}

    def array(self, key: str):
        from ckptlab.formats.arrays import as_array

        it = self._items[key]
        return as_array(it.produce() if it.produce is not None else it.source.array(it.src_key))


def fingerprint_diffusers(folder: str | Path, progress: Progress | None = None) -> Fingerprint | None:
    """The fingerprint of a diffusers pipeline folder under the single-file (LDM) names and shapes that
    ``from-diffusers`` would write, so that the folder ``to-diffusers`` made equals its source file.
    ``None`` when the folder has no single-file form (a family ``from-diffusers`` does not map)."""
    from ckptlab.errors import CkptlabError
    from ckptlab.ops.diffusers_io import plan_from_diffusers

    opened: list = []
    try:
        try:
            _fam, items, _warnings, _files = plan_from_diffusers(Path(folder), opened)
        except (CkptlabError, KeyError, TypeError, ValueError):
            return None
        return fingerprint_source(_PlannedSource(items), progress=progress)
    finally:
        for s in opened:
            s.close()


def fingerprint_file(path: str | Path, progress: Progress | None = None) -> Fingerprint:
    """The fingerprint of a model file; a diffusers pipeline folder is fingerprinted in its single-file
    form (``fingerprint_diffusers``) where it has one."""
    from ckptlab.formats import open_model

    p = Path(path)
    if p.is_dir() and (p / "model_index.json").is_file():
        fp = fingerprint_diffusers(p, progress=progress)
        if fp is not None:
            return fp
    with open_model(path) as src:
        return fingerprint_source(src, progress=progress)


def stream_content(url_or_entry, *, hash: bool = True, fingerprint: bool = True,  # noqa: A002 - the CLI's word
                   progress: Progress | None = None):
    """``(Hashes | None, Fingerprint | None)`` of one model file, remote or local, reading it once.

    Remote (a URL or a ``remote.RemoteEntry``): the object streams past in ONE GET, and nothing else is read for
    a safetensors file: its hashes come from that stream (``hashes.hash_remote``), its header is parsed from the
    stream's first bytes and, since tensors tile the data buffer in offset order, each tensor is hashed for the
    fingerprint as its bytes pass (one tensor in memory at most). Other formats (pickles, GGUF) are fingerprinted
    afterwards with ranged reads (their headers, then one GET per tensor: ``fingerprint_file``); a diffusers prefix
    (a URL ending in ``/``) has no hash and is not fingerprinted. Without ``hash`` the first block is read first to
    learn the format (a non-safetensors object is then not streamed). Local paths: ``hashes.hash_file`` and
    ``fingerprint_file``, as before. Raises ``CkptlabError`` (one line)."""
    from ckptlab.remote import RemoteEntry, is_remote

    remote = isinstance(url_or_entry, RemoteEntry) or is_remote(url_or_entry)
    if not remote:
        from ckptlab.hashes import hash_file

        h = hash_file(url_or_entry, progress=progress) if hash else None
        fp = fingerprint_file(url_or_entry) if fingerprint else None
        return h, fp
    from ckptlab.formats import detect_format
    from ckptlab.remote.reader import open_remote, session

    with session():
        rf = open_remote(url_or_entry)
        url = rf.url
        if url.endswith("/") or not (hash or fingerprint):
            if hash:
                from ckptlab.errors import CkptlabError

                raise CkptlabError("is a folder (hash files, or scan the prefix with --hash)", url)
            return None, None
        if not hash and detect_format(url) != "safetensors":
            return None, fingerprint_file(url)
        h, fp, fmt = _stream_remote(rf, hash, fingerprint, progress)
        if fingerprint and fp is None:
            if fmt is None:
                fmt = detect_format(url)
            fp = fingerprint_file(url) if fmt != "diffusers" else None
        return h, fp


def _stream_remote(rf, hash: bool, fingerprint: bool, progress):  # noqa: A002
    """One GET of the whole object: hashes (``hash``) and, for safetensors, the fingerprint from the same bytes.
    Returns (hashes, fingerprint or None, "safetensors" or None)."""
    import numpy as np

    from ckptlab.errors import FormatError
    from ckptlab.formats.dtypes import to_numpy
    from ckptlab.formats.safetensors import parse_header_bytes
    from ckptlab.hashes import safetensors_data_offset

    st = {"head": bytearray(), "data_at": None, "header": None, "order": None, "i": 0, "buf": bytearray(),
          "off": False}
    digests: dict[str, tuple[str, str | None]] = {}
    plan: dict = {}

    def finish(key: str, data) -> None:
        ti = plan["infos"][key]
        dt = to_numpy(ti.dtype)
        arr = np.frombuffer(data, dtype=dt).reshape(ti.shape) if ti.numel else np.empty(ti.shape, dtype=dt)
        digests[key] = _digests(arr, ti.dtype, plan["bf16"])

    def header_phase(pos: int, piece) -> int:
        """Gather the header from the first bytes; returns how much of ``piece`` it used (all: still heading)."""
        need = st["data_at"] or 16
        take = min(len(piece), max(0, need - len(st["head"])))
        st["head"] += piece[:take]
        if st["data_at"] is None and len(st["head"]) >= 16:
            st["data_at"] = safetensors_data_offset(bytes(st["head"][:16]), rf.size)
            if st["data_at"] is None:
                st["off"] = True  # not safetensors: hashes only
                return len(piece)
            more = min(len(piece) - take, st["data_at"] - len(st["head"]))
            st["head"] += piece[take:take + more]
            take += more
        if st["data_at"] is not None and len(st["head"]) >= st["data_at"]:
            header = parse_header_bytes(bytes(st["head"][8:st["data_at"]]), rf.size, rf.url)
            st["head"] = bytearray()
            infos = header.tensors
            comps, with_bf16 = _plan(infos)
            plan.update(infos=infos, bf16=with_bf16, header=header)
            wanted = {k for m in comps.values() for k in m.values()}
            ds = header.data_start
            st["order"] = sorted(((ds + header.offsets[k][0], ds + header.offsets[k][1]), k) for k in wanted)
        return take

    def on_chunk(pos: int, piece) -> None:
        if st["off"]:
            return
        if st["order"] is None:
            used = header_phase(pos, piece)
            if st["off"] or st["order"] is None:
                return
            pos, piece = pos + used, piece[used:]
        end_piece = pos + len(piece)
        order = st["order"]
        while st["i"] < len(order):
            (start, end), key = order[st["i"]]
            if start == end:
                finish(key, b"")
                st["i"] += 1
                continue
            if start >= end_piece:
                return
            lo, hi = max(start, pos), min(end, end_piece)
            if lo < hi:
                st["buf"] += piece[lo - pos:hi - pos]
            if hi < end:
                return
            finish(key, st["buf"])
            st["buf"] = bytearray()
            st["i"] += 1

    from ckptlab.hashes import hash_remote

    if hash:
        h = hash_remote(rf, progress=progress, on_chunk=on_chunk if fingerprint else None)
    else:
        h, pos = None, 0
        for piece in rf.stream():
            on_chunk(pos, piece)
            pos += len(piece)
            (progress or null_progress)(len(piece))
    if not fingerprint or st["off"] or st["order"] is None:
        return h, None, None if st["off"] or st["order"] is None else "safetensors"
    if st["i"] < len(st["order"]):
        raise FormatError("object ended before its last tensor", rf.url)
    return h, fingerprint_source(_HeaderOnly(plan["infos"]), digests=digests), "safetensors"


class _HeaderOnly:
    """``infos`` without data: the tensors' digests were computed as the stream passed."""

    def __init__(self, infos):
        self._infos = infos

    def infos(self):
        return self._infos
