"""Images with their generation metadata: written atomically where A1111 puts it, read back from every place.

PNG: a ``parameters`` text chunk (``iTXt`` when the text is not Latin-1, as Pillow chooses). JPEG and WebP: EXIF
``UserComment`` in A1111's encoding (``piexif.helper.UserComment.dump(..., encoding="unicode")``: the 8 bytes
``UNICODE\\0`` then UTF-16; A1111 writes big-endian, some tools little-endian, and ``ASCII\\0\\0\\0`` also
occurs).
"""

from __future__ import annotations

import io
from pathlib import Path

from ckptlab.errors import OutputError, UsageError

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
EXIF_IFD = 0x8769
USER_COMMENT = 0x9286


def image_format(path: Path) -> str:
    """Pillow's format name for an output path (by its suffix); other suffixes are a usage error."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise UsageError(f"{path}: write .png, .jpg or .webp")
    return fmt


def user_comment(text: str) -> bytes:
    """EXIF UserComment bytes as A1111 writes them."""
    return b"UNICODE\0" + text.encode("utf-16-be")


def read_user_comment(data: bytes) -> str:
    """Text of an EXIF UserComment (UNICODE big- or little-endian, ASCII, or undefined)."""
    if isinstance(data, str):
        return data
    head, body = bytes(data[:8]), bytes(data[8:])
    if head == b"UNICODE\0":
        return _utf16(body).rstrip("\0")
    if head in (b"ASCII\0\0\0", b"\0" * 8):
        return body.decode("utf-8", "replace").rstrip("\0")
    return bytes(data).decode("utf-8", "replace").rstrip("\0")


def _utf16(body: bytes) -> str:
    """UTF-16 of unknown byte order (A1111 writes big-endian, some tools little-endian, a few with a BOM): the
    order whose text has more Latin characters (an infotext's parameter line is ASCII in any language), invalid
    units (lone surrogates, an odd last byte) as U+FFFD."""
    if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
        return body[2:].decode("utf-16-be" if body[0] == 0xFE else "utf-16-le", "replace")
    be, le = body.decode("utf-16-be", "replace"), body.decode("utf-16-le", "replace")

    def latin(s: str) -> int:
        return sum(1 for ch in s if ch < "\u0100")

    return le if latin(le) > latin(be) else be


def encode(image, fmt: str, infotext: str | None, extra: dict[str, str] | None = None) -> bytes:
    """The file bytes of ``image`` (a Pillow image) in ``fmt`` with ``infotext`` stored A1111's way; ``extra``:
    more PNG text chunks (ignored for JPEG/WebP)."""
    from PIL import Image, PngImagePlugin

    buf = io.BytesIO()
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        if infotext is not None:
            info.add_text("parameters", infotext)
        for k, v in (extra or {}).items():
            info.add_text(k, v)
        image.save(buf, "PNG", pnginfo=info)
    else:
        exif = Image.Exif()
        if infotext is not None:
            exif.get_ifd(EXIF_IFD)[USER_COMMENT] = user_comment(infotext)
        rgb = image.convert("RGB") if fmt == "JPEG" and image.mode != "RGB" else image
        rgb.save(buf, fmt, exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def save_image(path: Path, image, infotext: str | None, *, overwrite: bool = True,
               extra: dict[str, str] | None = None) -> Path:
    """Write ``image`` with its infotext to ``path`` atomically (temporary, fsync, rename): a crash or Ctrl-C
    never leaves a half-written image under the name."""
    from ckptlab.atomic import write_atomic

    path = Path(path)
    fmt = image_format(path)
    try:
        data = encode(image, fmt, infotext, extra)
    except (OSError, ValueError) as e:  # JPEG stops at 65,500 px a side, WebP at 16,383
        raise OutputError(f"cannot encode a {image.width}x{image.height} image as {fmt}: {e}; use .png", path) from None
    try:
        write_atomic(path, data, overwrite=overwrite)
    except FileExistsError:
        raise OutputError("exists; pass --overwrite to replace it", path) from None
    except OSError as e:
        raise OutputError(f"cannot write the image: {e.strerror or e}", path) from None
    return path


def read_text_chunks(image) -> dict[str, str]:
    """Every text value of an opened Pillow image: PNG text chunks, and the EXIF UserComment as
    ``parameters`` when no chunk has that name."""
    out: dict[str, str] = {}
    for k, v in (getattr(image, "text", None) or {}).items():
        out[str(k)] = str(v)
    if "parameters" not in out:
        try:
            raw = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
        except Exception:  # noqa: BLE001 - a broken EXIF block is no metadata, not an error
            raw = None
        if raw:
            out["parameters"] = read_user_comment(raw)
    return out
