"""Generation metadata read back from image files: what made the image (prompt, settings, models and their hashes
as written), from every place the common tools put it.

Read without decoding a single pixel: the PNG, JPEG and WebP containers are walked chunk by chunk here (no Pillow),
and only the metadata chunks are read, so a decompression bomb costs nothing. An image whose header claims more
pixels than Pillow's ``DecompressionBombError`` limit (2 x ``Image.MAX_IMAGE_PIXELS``) is refused all the same:
no real generator writes one, and a file that claims it is hostile. Every text is capped (``MAX_CHUNK`` per chunk,
compressed chunks decompressed up to the cap, ``MAX_TEXTS`` chunks), JSON is decoded depth-limited
(``jsonable.loads_limited``).

Where each generator writes its metadata, and what is read from it:

- A1111 / Forge / SD.Next / Fooocus (A1111 style): PNG ``parameters`` text chunk; JPEG/WebP EXIF ``UserComment``
  (``UNICODE\\0`` + UTF-16, either byte order; ``ASCII``; undefined). Parsed by ``infotext.parse_infotext``.
- ComfyUI: PNG ``prompt`` (the API-format graph: node id -> ``{"class_type", "inputs"}``) and ``workflow`` (the
  editor's graph); animated WebP: EXIF ``Make``/``Model`` = ``workflow:{...}``/``prompt:{...}``. Checkpoints from
  ``CheckpointLoaderSimple``/``CheckpointLoader`` (``UNETLoader`` as ``unet``), VAEs from ``VAELoader``, LoRAs
  from ``LoraLoader``/``LoraLoaderModelOnly`` (strengths), seed/steps/cfg/sampler/scheduler/denoise from
  ``KSampler``/``KSamplerAdvanced``, the size from ``EmptyLatentImage``, prompts from the ``CLIPTextEncode`` nodes
  that the sampler's ``positive``/``negative`` inputs lead to (followed through links).
- InvokeAI 3-5: PNG ``invokeai_metadata`` (JSON: prompts, seed, steps, ``model``/``vae``/``loras`` with name,
  ``hash`` such as ``blake3:...``).
- StabilityMatrix: ``parameters-json`` when there is no ``parameters`` chunk.
- Fooocus (its own scheme): ``parameters`` holding a JSON object (``base_model``, ``base_model_hash``,
  ``lora_combined_N`` = ``"name : weight"``, ``resolution`` ...). NovelAI: ``Comment`` JSON (prompt, ``uc``,
  steps, scale, seed) with ``Software`` = NovelAI.
"""

from __future__ import annotations

import os
import stat
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ckptlab.display import human_size
from ckptlab.errors import FormatError

#: the largest metadata chunk read (a ComfyUI workflow with notes is a few hundred KiB); bigger ones are skipped
MAX_CHUNK = 8 << 20
#: the most text chunks read from one file
MAX_TEXTS = 256
#: the most chunks/segments walked in one file (a real 100 MB PNG has ~12,000; a hostile file of empty chunks
#: would make the walk slow, not dangerous)
MAX_CHUNKS = 1_000_000
#: Pillow's default ``Image.MAX_IMAGE_PIXELS``; an image over twice this is what Pillow refuses outright
PILLOW_MAX_IMAGE_PIXELS = 89_478_485
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXIF_IFD_POINTER = 0x8769
USER_COMMENT = 0x9286
IMAGE_DESCRIPTION, MAKE, MODEL = 0x010E, 0x010F, 0x0110


def max_pixels() -> int:
    """The pixel count over which an image is refused: Pillow's ``DecompressionBombError`` threshold (twice its
    ``MAX_IMAGE_PIXELS``, read from Pillow when it is installed, so a user who set it is obeyed)."""
    try:
        from PIL import Image

        limit = Image.MAX_IMAGE_PIXELS
    except ImportError:
        limit = PILLOW_MAX_IMAGE_PIXELS
    return 2 * int(limit) if limit else 2 * PILLOW_MAX_IMAGE_PIXELS


@dataclass
class RawMetadata:
    """The metadata texts of one image file, as stored: ``texts`` by chunk name (PNG text chunks; the EXIF
    UserComment as ``parameters`` when no chunk has that name; ComfyUI's EXIF ``prompt``/``workflow``)."""

    container: str  # png | jpeg | webp
    size: tuple[int, int] | None
    texts: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class ModelRef:
    """One model an image says it used, as written: ``role`` (checkpoint, unet, vae, lora, embedding,
    hypernetwork), ``name`` (file stem or name as written), ``hashes`` (as written, most specific first),
    ``weight`` (a LoRA's strength), ``version_id`` (CivitAI modelVersionId) and where it was read
    (``sources``)."""

    role: str
    name: str | None = None
    hashes: list[str] = field(default_factory=list)
    weight: float | None = None
    weight_clip: float | None = None
    version_id: int | None = None
    title: str | None = None  # a name that is no file name (CivitAI's model title)
    sources: list[str] = field(default_factory=list)

    @property
    def hash(self) -> str | None:
        return self.hashes[0] if self.hashes else None

    def add_hash(self, h, source: str) -> None:
        h = str(h).strip() if h is not None else ""
        if h and h.lower() not in (x.lower() for x in self.hashes):
            self.hashes.append(h)
        self.add_source(source)

    def add_source(self, source: str) -> None:
        if source not in self.sources:
            self.sources.append(source)


@dataclass
class ImageMetadata:
    """What one image says made it. ``generator``: ``a1111`` (A1111-style infotext, any tool), ``comfyui``,
    ``invokeai``, ``stability_matrix``, ``fooocus``, ``novelai`` or None (no generation metadata). ``params`` use A1111's names (Steps,
    Sampler, Schedule type, CFG scale, Seed, Size, Denoising strength, Clip skip ...) whatever the generator;
    ``models`` are the models it names, hashes as written."""

    path: str
    container: str
    size: tuple[int, int] | None
    generator: str | None = None
    prompt: str = ""
    negative: str = ""
    params: dict = field(default_factory=dict)
    models: list[ModelRef] = field(default_factory=list)
    chunks: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- containers


def _decode_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _inflate(data: bytes, what: str) -> bytes:
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, MAX_CHUNK)
    except zlib.error as e:
        raise ValueError(f"{what}: damaged compressed text ({e})") from None
    if d.unconsumed_tail:
        raise ValueError(f"{what}: decompresses to more than {human_size(MAX_CHUNK)}; skipped")
    return out


def _png_text(ctype: bytes, data: bytes) -> tuple[str, str]:
    key, sep, rest = data.partition(b"\0")
    if not sep:
        raise ValueError(f"{ctype.decode()}: no keyword")
    name = key.decode("latin-1")
    if ctype == b"tEXt":
        return name, _decode_text(rest)
    if ctype == b"zTXt":
        return name, _decode_text(_inflate(rest[1:], f"zTXt {name}"))
    # iTXt: compression flag, method, language\0, translated keyword\0, text (UTF-8)
    if len(rest) < 2:
        raise ValueError(f"iTXt {name}: cut short")
    flag, body = rest[0], rest[2:]
    _lang, _, body = body.partition(b"\0")
    _tkey, _, body = body.partition(b"\0")
    if flag:
        body = _inflate(body, f"iTXt {name}")
    return name, body.decode("utf-8", "replace")


def _read_png(f, file_size: int, raw: RawMetadata) -> None:
    """Walk the chunks; read IHDR and the text/EXIF chunks, seek over everything else (pixels never read)."""
    f.seek(8)
    seen_iend = False
    n_texts = n_chunks = over = 0
    while True:
        n_chunks += 1
        if n_chunks > MAX_CHUNKS:
            raise FormatError(f"more than {MAX_CHUNKS:,} PNG chunks; not read")
        head = f.read(8)
        if len(head) < 8:
            break
        length, ctype = struct.unpack(">I4s", head)
        if length > 0x7FFFFFFF:
            raise FormatError(f"damaged PNG: chunk {ctype!r} claims {length} bytes")
        if f.tell() + length + 4 > file_size:
            raise FormatError(f"truncated PNG: chunk {ctype.decode('latin-1')!r} runs past the end of the file")
        if ctype == b"IEND":
            seen_iend = True
            break
        if ctype == b"IHDR" and (length != 13 or raw.size is not None):
            raise FormatError("damaged PNG: an IHDR chunk that is not 13 bytes, or a second one")
        wanted = ctype in (b"IHDR", b"tEXt", b"zTXt", b"iTXt", b"eXIf")
        if not wanted or (ctype != b"IHDR" and (length > MAX_CHUNK or n_texts >= MAX_TEXTS)):
            if wanted and length > MAX_CHUNK:
                raw.warnings.append(f"a {ctype.decode()} chunk of {length} bytes skipped (over the limit)")
            elif wanted:
                over += 1
            f.seek(length + 4, os.SEEK_CUR)
            continue
        data = f.read(length)
        crc = f.read(4)
        if len(crc) < 4 or zlib.crc32(ctype + data) != struct.unpack(">I", crc)[0]:
            raise FormatError(f"damaged PNG: chunk {ctype.decode('latin-1')!r} fails its CRC")
        if ctype == b"IHDR":
            raw.size = struct.unpack(">II", data[:8])
            _check_pixels(raw.size)
            continue
        n_texts += 1
        if ctype == b"eXIf":
            _exif_texts(data, raw)
            continue
        try:
            name, text = _png_text(ctype, data)
        except ValueError as e:
            raw.warnings.append(str(e))
            continue
        raw.texts.setdefault(name, text)
    if over:
        raw.warnings.append(f"{over} text chunk(s) past the first {MAX_TEXTS} skipped")
    if raw.size is None:
        raise FormatError("damaged PNG: no IHDR chunk")
    if not seen_iend:
        raise FormatError("truncated PNG: no IEND chunk")


def _check_pixels(size: tuple[int, int]) -> None:
    w, h = size
    limit = max_pixels()
    if w * h > limit:
        raise FormatError(f"claims {w}x{h} = {w * h:,} pixels, over the decompression-bomb limit of {limit:,} "
                          "(Pillow's); not read")


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _read_jpeg(f, file_size: int, raw: RawMetadata) -> None:
    """Walk the segments up to the start of scan: APP1 Exif, COM, and the frame header's size."""
    f.seek(2)
    for _ in range(MAX_CHUNKS):
        b = f.read(1)
        if not b:
            raise FormatError("truncated JPEG: the file ends before the image data")
        if b != b"\xff":
            raise FormatError("damaged JPEG: a segment does not start with a marker")
        marker, fill = f.read(1), 0
        while marker == b"\xff":  # fill bytes
            fill += 1
            if fill > 1 << 16:
                raise FormatError("damaged JPEG: a run of more than 65,536 fill bytes")
            marker = f.read(1)
        if not marker:
            raise FormatError("truncated JPEG: the file ends before the image data")
        m = marker[0]
        if m in (0xD8, 0x01) or 0xD0 <= m <= 0xD7:
            continue
        if m in (0xDA, 0xD9):  # start of scan (pixels follow) or end of image: no metadata after this point
            break
        ln = f.read(2)
        if len(ln) < 2:
            raise FormatError("truncated JPEG: the file ends inside a segment header")
        length = struct.unpack(">H", ln)[0] - 2
        if length < 0:
            raise FormatError("damaged JPEG: a segment length under 2")
        data = f.read(length)
        if len(data) < length:
            raise FormatError("truncated JPEG: the file ends inside a segment")
        if m in _SOF and len(data) >= 5:
            h, w = struct.unpack(">HH", data[1:5])
            raw.size = (w, h)
            _check_pixels(raw.size)
        elif m == 0xE1 and data.startswith(b"Exif\0\0"):
            _exif_texts(data[6:], raw)
        elif m == 0xFE and "comment" not in raw.texts:
            raw.texts["comment"] = _decode_text(data)
    else:
        raise FormatError(f"more than {MAX_CHUNKS:,} JPEG segments before the image data; not read")


def _read_webp(f, file_size: int, raw: RawMetadata) -> None:
    """Walk the RIFF chunks: VP8X/VP8/VP8L for the size, EXIF and XMP skipped or read, image data skipped."""
    f.seek(12)
    for _ in range(MAX_CHUNKS):
        head = f.read(8)
        if len(head) < 8:
            if head:
                raise FormatError("truncated WebP: the file ends inside a chunk header")
            break
        fourcc, length = head[:4], struct.unpack("<I", head[4:])[0]
        padded = length + (length & 1)
        if f.tell() + length > file_size:
            raise FormatError(f"truncated WebP: chunk {fourcc!r} runs past the end of the file")
        if fourcc == b"EXIF" and length <= MAX_CHUNK:
            data = f.read(length)
            _exif_texts(data[6:] if data.startswith(b"Exif\0\0") else data, raw)
            f.seek(padded - length, os.SEEK_CUR)
        elif fourcc in (b"VP8X", b"VP8L", b"VP8 ") and raw.size is None:
            data = f.read(min(length, 10))
            if fourcc == b"VP8X" and len(data) >= 10:
                raw.size = (int.from_bytes(data[4:7], "little") + 1, int.from_bytes(data[7:10], "little") + 1)
            elif fourcc == b"VP8L" and len(data) >= 5:
                bits = int.from_bytes(data[1:5], "little")
                raw.size = ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
            elif fourcc == b"VP8 " and len(data) >= 10:
                raw.size = (int.from_bytes(data[6:8], "little") & 0x3FFF, int.from_bytes(data[8:10], "little") & 0x3FFF)
            if raw.size:
                _check_pixels(raw.size)
            f.seek(padded - len(data), os.SEEK_CUR)
        else:
            if fourcc == b"EXIF":
                raw.warnings.append(f"an EXIF chunk of {length} bytes skipped (over the limit)")
            f.seek(padded, os.SEEK_CUR)
    else:
        raise FormatError(f"more than {MAX_CHUNKS:,} WebP chunks; not read")
    if raw.size is None:
        raise FormatError("damaged WebP: no image chunk (VP8, VP8L or VP8X)")


# ------------------------------------------------------------------------------------------- EXIF


def _ifd_entries(data: bytes, offset: int, endian: str) -> dict[int, tuple[int, int, bytes]]:
    """``{tag: (type, count, value bytes)}`` of the IFD at ``offset`` (bounded, never past the data)."""
    sizes = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8}
    if offset < 8 or offset + 2 > len(data):
        return {}
    (n,) = struct.unpack(endian + "H", data[offset:offset + 2])
    out: dict[int, tuple[int, int, bytes]] = {}
    for i in range(min(n, 512)):
        at = offset + 2 + 12 * i
        if at + 12 > len(data):
            break
        tag, typ, count = struct.unpack(endian + "HHI", data[at:at + 8])
        size = sizes.get(typ, 1) * count
        if size <= 4:
            value = data[at + 8:at + 8 + size]
        else:
            (ptr,) = struct.unpack(endian + "I", data[at + 8:at + 12])
            if ptr + size > len(data):
                continue  # points outside the block: ignored
            value = data[ptr:ptr + size]
        out[tag] = (typ, count, value)
    return out


def _exif_texts(data: bytes, raw: RawMetadata) -> None:
    """The texts of a TIFF-structured EXIF block: UserComment (A1111's ``parameters``), and ComfyUI's
    ``prompt:``/``workflow:`` in Make/Model/ImageDescription. A damaged block is a warning, not an error."""
    from ckptlab.imaging.imagefile import read_user_comment

    if len(data) < 8 or data[:4] not in (b"II*\0", b"MM\0*"):
        raw.warnings.append("EXIF block without a TIFF header; ignored")
        return
    endian = "<" if data[:2] == b"II" else ">"
    (ifd0,) = struct.unpack(endian + "I", data[4:8])
    top = _ifd_entries(data, ifd0, endian)
    for tag in (IMAGE_DESCRIPTION, MAKE, MODEL):
        if tag in top and top[tag][0] == 2:
            text = _decode_text(top[tag][2].rstrip(b"\0"))
            for key in ("prompt", "workflow"):
                if text.startswith(key + ":"):
                    raw.texts.setdefault(key, text[len(key) + 1:])
    if EXIF_IFD_POINTER in top and len(top[EXIF_IFD_POINTER][2]) == 4:
        (sub,) = struct.unpack(endian + "I", top[EXIF_IFD_POINTER][2])
        entries = _ifd_entries(data, sub, endian)
        if USER_COMMENT in entries:
            text = read_user_comment(entries[USER_COMMENT][2])
            if text.strip():
                raw.texts.setdefault("parameters", text)


# ------------------------------------------------------------------------------------------- reading


def sniff(head: bytes) -> str | None:
    """``png``, ``jpeg``, ``webp`` or None from a file's first 12 bytes."""
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def read_raw(path: str | os.PathLike) -> RawMetadata:
    """The metadata texts of one image file (PNG, JPEG or WebP, told by its bytes, not its name). Raises
    ``FormatError`` for anything else, a truncated or damaged container, or a decompression bomb."""
    path = Path(os.fspath(path))
    try:
        # O_NONBLOCK: a FIFO given as an image must not block the open; anything but a regular file is refused
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise FormatError("not a regular file", path)
            container = sniff(f.read(12))
            if container is None:
                raise FormatError("not a PNG, JPEG or WebP image", path)
            raw = RawMetadata(container, None)
            reader = {"png": _read_png, "jpeg": _read_jpeg, "webp": _read_webp}[container]
            try:
                reader(f, st.st_size, raw)
            except FormatError as e:
                raise FormatError(e.message, path) from None
            except (struct.error, ValueError) as e:
                raise FormatError(f"damaged {container.upper()}: {e}", path) from None
            return raw
    except IsADirectoryError:
        raise FormatError("is a folder", path) from None
    except OSError as e:
        raise FormatError(f"cannot read: {e.strerror or e}", path) from None


def read_metadata(path: str | os.PathLike) -> ImageMetadata:
    """Everything one image says about how it was made (see the module's notes for the sources)."""
    raw = read_raw(path)
    meta = ImageMetadata(os.fspath(path), raw.container, raw.size, chunks=sorted(raw.texts),
                         warnings=list(raw.warnings))
    interpret(raw.texts, meta)
    return meta


# ------------------------------------------------------------------------------------------- generators


class _Refs:
    """The models of one image, merged by (role, name): ``<lora:x:0.8>`` and ``Lora hashes: "x: ..."`` are one."""

    def __init__(self) -> None:
        self.items: list[ModelRef] = []

    def get(self, role: str, name, source: str) -> ModelRef:
        name = None if name is None or str(name).strip() == "" else str(name).strip()
        for r in self.items:
            if r.role == role and (r.name or "").lower() == (name or "").lower():
                r.add_source(source)
                return r
        ref = ModelRef(role, name, sources=[source])
        self.items.append(ref)
        return ref

    def only(self, role: str, source: str) -> ModelRef:
        """The one model of ``role`` (the checkpoint, the VAE), made when there is none."""
        for r in self.items:
            if r.role == role:
                r.add_source(source)
                return r
        return self.get(role, None, source)


def _num(v) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return float(str(v).strip())
    except ValueError:
        return None


def _int(v) -> int | None:
    f = _num(v)
    return int(f) if f is not None and f.is_integer() else None


#: CivitAI resource types (``Civitai resources``, ``Hashes`` keys) -> our roles
CIVITAI_ROLES = {"checkpoint": "checkpoint", "model": "checkpoint", "lora": "lora", "locon": "lora",
                 "lycoris": "lora", "lyco": "lora", "dora": "lora", "embed": "embedding", "embedding": "embedding",
                 "textualinversion": "embedding", "ti": "embedding", "vae": "vae", "hypernet": "hypernetwork",
                 "hypernetwork": "hypernetwork"}
#: A1111 extra-network tag kinds -> roles
TAG_ROLES = {"lora": "lora", "lyco": "lora", "hypernet": "hypernetwork"}


def _json_value(v):
    """A ``{...}``/``[...]`` value, decoded: CivitAI writes them raw, some writers JSON-quote them like any value
    holding ``,`` and ``:`` (then the parser hands us the string)."""
    if isinstance(v, str) and v.lstrip()[:1] in ("{", "["):
        from ckptlab.jsonable import loads_limited

        try:
            return loads_limited(v)
        except ValueError:
            return None
    return v


def _a1111(text: str, meta: ImageMetadata) -> None:
    from ckptlab.imaging.infotext import parse_infotext, split_hashes

    it = parse_infotext(text)
    meta.generator = "a1111"
    meta.prompt, meta.negative, meta.params = it.prompt, it.negative, it.params
    p, refs = it.params, _Refs()
    if p.get("Model") or p.get("Model hash"):
        ckpt = refs.get("checkpoint", p.get("Model") if isinstance(p.get("Model"), str) else None, "Model")
        if p.get("Model hash"):
            ckpt.add_hash(p["Model hash"], "Model hash")
    if p.get("VAE") or p.get("VAE hash"):
        vae = refs.get("vae", p.get("VAE") if isinstance(p.get("VAE"), str) else None, "VAE")
        if p.get("VAE hash"):
            vae.add_hash(p["VAE hash"], "VAE hash")
    for tag in it.extra_networks():
        role = TAG_ROLES.get(tag.kind)
        if role and tag.name:
            r = refs.get(role, tag.name, f"<{tag.kind}:...> tag")
            r.weight = tag.weight if r.weight is None else r.weight
    for key, role in (("Lora hashes", "lora"), ("TI hashes", "embedding")):
        if isinstance(p.get(key), str):
            for name, h in split_hashes(p[key]).items():
                refs.get(role, name, key).add_hash(h, key)
    hashes = _json_value(p.get("Hashes"))
    if isinstance(hashes, dict):
        for key, h in hashes.items():
            if not isinstance(h, str):
                continue
            kind, sep, name = str(key).partition(":")
            role = CIVITAI_ROLES.get(kind.lower())
            if role in ("checkpoint", "vae") and not sep:
                refs.only(role, "Hashes").add_hash(h, "Hashes")
            elif role and sep and name:
                refs.get(role, name, "Hashes").add_hash(h, "Hashes")
    resources = _json_value(p.get("Civitai resources"))
    if isinstance(resources, list):
        for res in resources[:256]:
            if not isinstance(res, dict):
                continue
            role = CIVITAI_ROLES.get(str(res.get("type", "")).lower().replace(" ", ""), "other")
            vid = _int(res.get("modelVersionId"))
            if vid is None and isinstance(res.get("air"), str):  # urn:air:sd1:lora:civitai:<model>@<version>
                vid = _int(res["air"].rpartition("@")[2])
            if vid is None:
                continue
            r = ModelRef(role, version_id=vid, weight=_num(res.get("weight")), sources=["Civitai resources"],
                         title=" / ".join(str(res[k]) for k in ("modelName", "versionName") if res.get(k)) or None)
            refs.items.append(r)
    meta.models = refs.items


# -- ComfyUI

COMFY_CHECKPOINT = {"CheckpointLoaderSimple": "ckpt_name", "CheckpointLoader": "ckpt_name",
                    "ImageOnlyCheckpointLoader": "ckpt_name", "unCLIPCheckpointLoader": "ckpt_name",
                    "CheckpointLoader|pysssss": "ckpt_name", "Checkpoint Loader": "ckpt_name"}
COMFY_SAMPLERS = ("KSampler", "KSamplerAdvanced")
_MAX_FOLLOW = 32


def _comfy_api(graph: dict, meta: ImageMetadata) -> None:
    nodes = {str(k): v for k, v in graph.items() if isinstance(v, dict) and isinstance(v.get("inputs"), dict)}
    if not nodes:
        raise ValueError("no nodes")

    def order(k: str):
        return (0, int(k), "") if k.isdigit() else (1, 0, k)

    def linked(v) -> dict | None:
        if isinstance(v, list) and len(v) == 2 and str(v[0]) in nodes:
            return nodes[str(v[0])]
        return None

    def scalar(v, depth: int = 0):
        """A widget value, followed through primitive/link nodes."""
        node = linked(v)
        if node is None:
            return v if isinstance(v, (str, int, float)) and not isinstance(v, bool) else None
        if depth >= _MAX_FOLLOW:
            return None
        for key in ("value", "seed", "int", "float", "number", "string", "text", "noise_seed"):
            if key in node["inputs"]:
                return scalar(node["inputs"][key], depth + 1)
        return None

    def text(v, depth: int = 0) -> str | None:
        """The prompt a conditioning input comes from (CLIPTextEncode and friends, through links)."""
        node = linked(v)
        if node is None or depth >= _MAX_FOLLOW:
            return None
        ins = node["inputs"]
        for key in ("text", "text_g", "prompt", "string", "value"):
            t = scalar(ins.get(key), depth + 1)
            if isinstance(t, str):
                return t
        for key in ("conditioning", "conditioning_1", "conditioning_to", "conditioning_from"):
            if key in ins:
                t = text(ins[key], depth + 1)
                if t is not None:
                    return t
        return None

    refs = _Refs()
    sampler = None
    def name_of(v) -> str | None:
        v = scalar(v)
        return v if isinstance(v, str) and v.strip() and v not in _COMFY_NONE else None

    def first(ins: dict, keys: tuple[str, ...]) -> float | None:
        for key in keys:
            if key in ins and _num(scalar(ins[key])) is not None:
                return _num(scalar(ins[key]))
        return None

    custom: dict[str, dict] = {}  # SamplerCustomAdvanced's parts: RandomNoise, BasicScheduler, KSamplerSelect...
    for k in sorted(nodes, key=order):
        node = nodes[k]
        ct, ins = str(node.get("class_type", "")), node["inputs"]
        src = f"ComfyUI {ct}"[:120]
        # loaders by their input names: the core nodes and the custom ones that reuse the names (Efficient
        # Loader, pysssss, Impact...)
        for key, role in (("ckpt_name", "checkpoint"), ("unet_name", "unet"), ("vae_name", "vae")):
            if name_of(ins.get(key)):
                refs.get(role, name_of(ins[key]), src)
        if name_of(ins.get("lora_name")):
            r = refs.get("lora", name_of(ins["lora_name"]), src)
            r.weight = first(ins, ("strength_model", "lora_model_strength", "strength", "lora_strength"))
            r.weight_clip = first(ins, ("strength_clip", "lora_clip_strength"))
        for v in ins.values():  # rgthree's Power Lora Loader: {"on": true, "lora": NAME, "strength": 0.8, ...}
            if isinstance(v, dict) and isinstance(v.get("lora"), str) and v.get("on") is not False \
                    and v["lora"] not in _COMFY_NONE:
                r = refs.get("lora", v["lora"], src)
                r.weight, r.weight_clip = _num(v.get("strength")), _num(v.get("strengthTwo"))
        if ct == "CLIPSetLastLayer" and _int(scalar(ins.get("stop_at_clip_layer"))) is not None:
            meta.params["Clip skip"] = abs(_int(scalar(ins.get("stop_at_clip_layer"))))
        elif sampler is None and (ct in COMFY_SAMPLERS or ("KSampler" in ct and "steps" in ins)):
            sampler = node
        elif ct in _COMFY_CUSTOM_PARTS:
            custom.setdefault(ct, node)
    p = meta.params
    if sampler is None and "SamplerCustomAdvanced" in custom:  # the Flux/SD3 graphs: one node per setting
        merged: dict = {}
        for part in _COMFY_CUSTOM_PARTS:
            if part in custom:
                merged.update({k: v for k, v in custom[part]["inputs"].items() if k not in merged})
        if "conditioning" in merged and "positive" not in merged:  # BasicGuider: one prompt
            merged["positive"] = merged["conditioning"]
        sampler = {"inputs": merged}
    if sampler is not None:
        ins = sampler["inputs"]
        for key, name in (("steps", "Steps"), ("sampler_name", "Sampler"), ("scheduler", "Schedule type"),
                          ("cfg", "CFG scale"), ("guidance", "Guidance"), ("seed", "Seed"), ("noise_seed", "Seed"),
                          ("denoise", "Denoising strength")):
            v = scalar(ins.get(key)) if key in ins else None
            if v is not None:
                p[name] = v
        meta.prompt = text(ins.get("positive")) or ""
        meta.negative = text(ins.get("negative")) or ""
        latent = linked(ins.get("latent_image"))
        if latent is not None and "width" in latent["inputs"]:
            w, h = _int(scalar(latent["inputs"].get("width"))), _int(scalar(latent["inputs"].get("height")))
            if w and h:
                p["Size"] = f"{w}x{h}"
    meta.generator = "comfyui"
    meta.models = refs.items


#: the "nothing chosen" values of ComfyUI's model pickers
_COMFY_NONE = ("None", "none", "Baked VAE", "")
#: the nodes that together make a SamplerCustomAdvanced sampler, in the order their inputs are taken
_COMFY_CUSTOM_PARTS = ("SamplerCustomAdvanced", "RandomNoise", "BasicScheduler", "KSamplerSelect", "CFGGuider",
                       "BasicGuider", "FluxGuidance")


def _comfy_workflow(wf: dict, meta: ImageMetadata) -> None:
    nodes = [n for n in wf.get("nodes") or [] if isinstance(n, dict)] if isinstance(wf.get("nodes"), list) else []
    if not nodes:
        raise ValueError("no nodes")
    by_id = {n.get("id"): n for n in nodes}
    link_from = {}
    for ln in wf.get("links") or []:
        if isinstance(ln, list) and len(ln) >= 2:
            link_from[ln[0]] = ln[1]

    def widgets(n) -> list:
        w = n.get("widgets_values")
        return w if isinstance(w, list) else []

    def source(n, name: str):
        for i in n.get("inputs") or []:
            if isinstance(i, dict) and i.get("name") == name:
                return by_id.get(link_from.get(i.get("link")))
        return None

    refs = _Refs()
    sampler = None
    for n in sorted(nodes, key=lambda n: n.get("id") if isinstance(n.get("id"), int) else 0):
        t, w = str(n.get("type", "")), widgets(n)
        idx = {"CheckpointLoader": 1}.get(t, 0)
        if t in COMFY_CHECKPOINT and len(w) > idx and isinstance(w[idx], str):
            refs.get("checkpoint", w[idx], f"ComfyUI {t}")
        elif t in ("UNETLoader", "VAELoader") and w and isinstance(w[0], str):
            refs.get("unet" if t == "UNETLoader" else "vae", w[0], f"ComfyUI {t}")
        elif t in ("LoraLoader", "LoraLoaderModelOnly") and w and isinstance(w[0], str):
            r = refs.get("lora", w[0], f"ComfyUI {t}")
            r.weight = _num(w[1]) if len(w) > 1 else None
            r.weight_clip = _num(w[2]) if t == "LoraLoader" and len(w) > 2 else None
        elif t in COMFY_SAMPLERS and sampler is None:
            sampler = n
    if sampler is not None:
        w = widgets(sampler)
        names = (["Seed", None, "Steps", "CFG scale", "Sampler", "Schedule type", "Denoising strength"]
                 if sampler.get("type") == "KSampler" else
                 [None, "Seed", None, "Steps", "CFG scale", "Sampler", "Schedule type"])
        for name, v in zip(names, w, strict=False):
            if name and isinstance(v, (int, float, str)) and not isinstance(v, bool):
                meta.params[name] = v
        for name, attr in (("positive", "prompt"), ("negative", "negative")):
            src = source(sampler, name)
            if src is not None and widgets(src) and isinstance(widgets(src)[0], str):
                setattr(meta, attr, widgets(src)[0])
    meta.generator = "comfyui"
    meta.models = refs.items


# -- InvokeAI, StabilityMatrix


def _invoke_model(d) -> tuple[str | None, str | None]:
    if not isinstance(d, dict):
        return None, None
    name = d.get("name") or d.get("model_name")
    h = d.get("hash")
    return (str(name) if name else None), (str(h) if h and not str(h).startswith("random:") else None)


def _invokeai(d: dict, meta: ImageMetadata) -> None:
    refs = _Refs()
    for key, role in (("model", "checkpoint"), ("vae", "vae")):
        name, h = _invoke_model(d.get(key))
        if name or h:
            r = refs.get(role, name, f"invokeai {key}")
            if h:
                r.add_hash(h, f"invokeai {key}")
    for item in (d.get("loras") if isinstance(d.get("loras"), list) else [])[:256]:
        if not isinstance(item, dict):
            continue
        name, h = _invoke_model(item.get("model") or item.get("lora"))
        if name or h:
            r = refs.get("lora", name, "invokeai loras")
            r.weight = _num(item.get("weight"))
            if h:
                r.add_hash(h, "invokeai loras")
    p = meta.params
    for key, name in (("steps", "Steps"), ("scheduler", "Sampler"), ("cfg_scale", "CFG scale"), ("seed", "Seed"),
                      ("strength", "Denoising strength"), ("clip_skip", "Clip skip"), ("app_version", "Version")):
        v = d.get(key)
        if isinstance(v, (int, float, str)) and not isinstance(v, bool) and v != "":
            p[name] = v
    if _int(d.get("width")) and _int(d.get("height")):
        p["Size"] = f"{_int(d['width'])}x{_int(d['height'])}"
    if refs.items and refs.items[0].role == "checkpoint" and refs.items[0].name:
        p["Model"] = refs.items[0].name
    meta.prompt = d.get("positive_prompt") if isinstance(d.get("positive_prompt"), str) else ""
    meta.negative = d.get("negative_prompt") if isinstance(d.get("negative_prompt"), str) else ""
    meta.generator = "invokeai"
    meta.models = refs.items


def _stability_matrix(d: dict, meta: ImageMetadata) -> None:
    p = meta.params
    for key, name in (("Steps", "Steps"), ("Sampler", "Sampler"), ("Scheduler", "Schedule type"),
                      ("CfgScale", "CFG scale"), ("Seed", "Seed"), ("ModelName", "Model"), ("ModelHash", "Model hash")):
        v = d.get(key)
        if isinstance(v, (int, float, str)) and not isinstance(v, bool) and v != "":
            p[name] = v
    if _int(d.get("Width")) and _int(d.get("Height")):
        p["Size"] = f"{_int(d['Width'])}x{_int(d['Height'])}"
    refs = _Refs()
    if p.get("Model") or p.get("Model hash"):
        r = refs.get("checkpoint", p.get("Model") if isinstance(p.get("Model"), str) else None, "parameters-json")
        if p.get("Model hash"):
            r.add_hash(p["Model hash"], "parameters-json")
    meta.prompt = d.get("PositivePrompt") if isinstance(d.get("PositivePrompt"), str) else ""
    meta.negative = d.get("NegativePrompt") if isinstance(d.get("NegativePrompt"), str) else ""
    meta.generator = "stability_matrix"
    meta.models = refs.items


def _fooocus(d: dict, meta: ImageMetadata) -> None:
    """Fooocus's own scheme: ``parameters`` is a JSON object (``fooocus_scheme`` = ``fooocus``)."""
    p, refs = meta.params, _Refs()
    for key, name in (("steps", "Steps"), ("sampler", "Sampler"), ("scheduler", "Schedule type"),
                      ("guidance_scale", "CFG scale"), ("seed", "Seed"), ("clip_skip", "Clip skip"),
                      ("performance", "Performance"), ("version", "Version")):
        v = d.get(key)
        if isinstance(v, (int, float, str)) and not isinstance(v, bool) and v != "":
            p[name] = v
    res = d.get("resolution")
    if isinstance(res, str):  # "(1152, 896)"
        nums = [x for x in (_int(t) for t in res.strip("()[] ").split(",")) if x]
        if len(nums) == 2:
            p["Size"] = f"{nums[0]}x{nums[1]}"
    for key, role in (("base_model", "checkpoint"), ("refiner_model", "checkpoint"), ("vae", "vae")):
        name = d.get(key)
        if isinstance(name, str) and name.strip() and name not in _COMFY_NONE and name != "Default (model)":
            r = refs.get(role, name, f"Fooocus {key}")
            if isinstance(d.get(f"{key}_hash"), str):
                r.add_hash(d[f"{key}_hash"], f"Fooocus {key}_hash")
    for key in sorted((k for k in d if str(k).startswith("lora_combined_")), key=lambda k: _int(k[14:]) or 0):
        parts = [x.strip() for x in str(d[key]).split(" : ")]  # "name : weight" (newer: a hash as well)
        if len(parts) < 2 or not parts[0]:
            continue
        r = refs.get("lora", parts[0], "Fooocus lora_combined")
        for x in parts[1:]:
            if _num(x) is not None and r.weight is None and not (len(x) >= 8 and x.isalnum() and not x.isdigit()):
                r.weight = _num(x)
            elif x:
                r.add_hash(x, "Fooocus lora_combined")
    meta.prompt = d.get("prompt") if isinstance(d.get("prompt"), str) else ""
    meta.negative = d.get("negative_prompt") if isinstance(d.get("negative_prompt"), str) else ""
    meta.generator = "fooocus"
    meta.models = refs.items


def _novelai(d: dict, texts: dict, meta: ImageMetadata) -> None:
    """NovelAI: ``Comment`` is a JSON object (prompt, ``uc``, steps, scale, seed, sampler), ``Source`` names its
    model (a hosted one: nothing in a library matches it)."""
    p = meta.params
    for key, name in (("steps", "Steps"), ("sampler", "Sampler"), ("scale", "CFG scale"), ("seed", "Seed"),
                      ("noise_schedule", "Schedule type")):
        v = d.get(key)
        if isinstance(v, (int, float, str)) and not isinstance(v, bool) and v != "":
            p[name] = v
    if _int(d.get("width")) and _int(d.get("height")):
        p["Size"] = f"{_int(d['width'])}x{_int(d['height'])}"
    if texts.get("Source"):
        p["Model"] = texts["Source"]
    prompt = d.get("prompt") if isinstance(d.get("prompt"), str) else texts.get("Description", "")
    meta.prompt, meta.negative = prompt, d.get("uc") if isinstance(d.get("uc"), str) else ""
    meta.generator = "novelai"


def _json(texts: dict, key: str, meta: ImageMetadata):
    from ckptlab.jsonable import loads_limited

    try:
        obj = loads_limited(texts[key])
    except ValueError as e:
        meta.warnings.append(f"the {key!r} chunk is not valid JSON ({str(e)[:120]}); ignored")
        return None
    if not isinstance(obj, dict):
        meta.warnings.append(f"the {key!r} chunk is not a JSON object; ignored")
        return None
    return obj


def interpret(texts: dict[str, str], meta: ImageMetadata) -> None:
    """Fill ``meta`` from the texts of one image, from the first source present of: A1111's ``parameters`` (a JSON
    object there: Fooocus), NovelAI's ``Comment``, InvokeAI's ``invokeai_metadata``, ComfyUI's ``prompt`` (else
    ``workflow``), StabilityMatrix's ``parameters-json``, a JPEG comment in A1111's format."""
    params = texts.get("parameters", "")
    if params.lstrip().startswith("{") and (d := _json(texts, "parameters", meta)) is not None:
        _fooocus(d, meta)  # Fooocus's own scheme (its "a1111" scheme is plain infotext)
        return
    if params.strip():
        _a1111(params, meta)
        return
    if texts.get("Software", "").startswith("NovelAI") and "Comment" in texts \
            and (d := _json(texts, "Comment", meta)) is not None:
        _novelai(d, texts, meta)
        return
    if "invokeai_metadata" in texts and (d := _json(texts, "invokeai_metadata", meta)) is not None:
        _invokeai(d, meta)
        return
    for key, fn in (("prompt", _comfy_api), ("workflow", _comfy_workflow)):
        if key in texts and (d := _json(texts, key, meta)) is not None:
            try:
                fn(d, meta)
                return
            except ValueError:
                meta.warnings.append(f"the {key!r} chunk is no ComfyUI graph; ignored")
    if "parameters-json" in texts and (d := _json(texts, "parameters-json", meta)) is not None:
        _stability_matrix(d, meta)
        return
    comment = texts.get("comment", "")
    if comment.strip():
        from ckptlab.imaging.infotext import parse_infotext

        if parse_infotext(comment).params:
            _a1111(comment, meta)
