"""Drawing the grid: cells in slots, column labels above, row labels on the left, one sub-grid per z value side
by side under its own title, and a legend (what every cell shares) below. Pillow's own font
(``ImageFont.load_default(size=...)``, bundled, offline). Cells not rendered yet are grey slots, so the grid
re-saved after each row already has its final size."""

from __future__ import annotations

from dataclasses import dataclass, field

BACKGROUND = (255, 255, 255)
PENDING = (200, 200, 200)
INK = (0, 0, 0)


def font_size(slot: tuple[int, int]) -> int:
    """A1111's ``(width + height) // 25``, at least 12 px so small test cells stay readable."""
    return max(12, (slot[0] + slot[1]) // 25)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def wrap(draw, text: str, font, width: int) -> str:
    """``text`` broken into lines no wider than ``width`` pixels (at spaces; a long word is cut)."""
    lines: list[str] = []
    for para in str(text).split("\n"):
        line = ""
        for word in para.split(" "):
            cand = f"{line} {word}" if line else word
            if draw.textlength(cand, font=font) <= width or not line:
                line = cand
            else:
                lines.append(line)
                line = word
            while draw.textlength(line, font=font) > width and len(line) > 1:
                cut = len(line)
                while cut > 1 and draw.textlength(line[:cut], font=font) > width:
                    cut -= 1
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return "\n".join(lines)


def _height(draw, text: str, font) -> int:
    if not text:
        return 0
    box = draw.multiline_textbbox((0, 0), text, font=font, spacing=2)
    return box[3]


@dataclass
class Layout:
    """Where everything goes; ``size`` is the whole image, ``box(ix, iy, iz)`` the top-left of a cell."""

    slot: tuple[int, int]
    nx: int
    ny: int
    nz: int
    pad: int
    left: int      # width of the row-label column
    top: int       # height of the column-label band
    ztop: int      # height of a z title band (0 without a z axis)
    legend_h: int
    gap: int
    size: tuple[int, int] = (0, 0)
    xtext: list[str] = field(default_factory=list)
    ytext: list[str] = field(default_factory=list)
    ztext: list[str] = field(default_factory=list)
    legend: str = ""

    @property
    def sub_w(self) -> int:
        return self.left + self.nx * self.slot[0]

    def sub_origin(self, iz: int) -> tuple[int, int]:
        return iz * (self.sub_w + self.gap), 0

    def box(self, ix: int, iy: int, iz: int) -> tuple[int, int]:
        ox, oy = self.sub_origin(iz)
        return ox + self.left + ix * self.slot[0], oy + self.ztop + self.top + iy * self.slot[1]


def layout(slot: tuple[int, int], xlabels: list[str], ylabels: list[str], zlabels: list[str],
           legend: list[str]) -> Layout:
    """The geometry of a grid of ``len(xlabels) x len(ylabels)`` slots (per z value) with these labels.
    An axis that is not there has one empty label."""
    from PIL import Image, ImageDraw

    w, h = slot
    fs = font_size(slot)
    font = _font(fs)
    d = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = max(4, fs // 3)
    nx, ny, nz = len(xlabels), len(ylabels), len(zlabels)
    xtext = [wrap(d, t, font, w - 2 * pad) for t in xlabels]
    top = max(_height(d, t, font) for t in xtext) + 2 * pad if any(xlabels) else 0
    left = 0
    ytext = list(ylabels)
    if any(ylabels):
        widest = max(int(d.textlength(line, font=font)) for t in ylabels for line in t.split("\n"))
        col = min(widest, max(w, 8 * fs))
        ytext = [wrap(d, t, font, col) for t in ylabels]
        left = col + 2 * pad
    sub_w = left + nx * w
    ztext = [wrap(d, t, font, sub_w - 2 * pad) for t in zlabels]
    ztop = max(_height(d, t, font) for t in ztext) + 2 * pad if any(zlabels) else 0
    gap = 2 * pad if nz > 1 else 0
    total_w = nz * sub_w + (nz - 1) * gap
    legend_text = wrap(d, "\n".join(legend), font, total_w - 2 * pad) if legend else ""
    legend_h = _height(d, legend_text, font) + 2 * pad if legend_text else 0
    total_h = ztop + top + ny * h + legend_h
    return Layout(slot, nx, ny, nz, pad, left, top, ztop, legend_h, gap, (total_w, total_h), xtext, ytext, ztext,
                  legend_text)


def draw(lay: Layout, cells: dict[tuple[int, int, int], object]):
    """The grid image: ``cells[(ix, iy, iz)]`` (Pillow images; missing ones drawn as grey slots), centred in
    their slots."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", lay.size, BACKGROUND)
    d = ImageDraw.Draw(img)
    font = _font(font_size(lay.slot))
    w, h = lay.slot
    p = lay.pad
    for iz in range(lay.nz):
        ox, oy = lay.sub_origin(iz)
        if lay.ztop and lay.ztext[iz]:
            d.multiline_text((ox + lay.sub_w // 2, oy + p), lay.ztext[iz], fill=INK, font=font, anchor="ma",
                             align="center", spacing=2)
        if lay.top:
            for ix, t in enumerate(lay.xtext):
                cx = ox + lay.left + ix * w + w // 2
                d.multiline_text((cx, oy + lay.ztop + p), t, fill=INK, font=font, anchor="ma", align="center",
                                 spacing=2)
        if lay.left:
            for iy, t in enumerate(lay.ytext):
                cy = oy + lay.ztop + lay.top + iy * h + h // 2
                d.multiline_text((ox + lay.left - p, cy), t, fill=INK, font=font, anchor="rm", align="right",
                                 spacing=2)
        for iy in range(lay.ny):
            for ix in range(lay.nx):
                bx, by = lay.box(ix, iy, iz)
                im = cells.get((ix, iy, iz))
                if im is None:
                    d.rectangle((bx, by, bx + w - 1, by + h - 1), fill=PENDING)
                    continue
                img.paste(im.convert("RGB"), (bx + (w - im.width) // 2, by + (h - im.height) // 2))
    if lay.legend:
        d.multiline_text((p, lay.size[1] - lay.legend_h + p), lay.legend, fill=INK, font=font, spacing=2)
    return img
