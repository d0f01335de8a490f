"""Grid geometry: each cell pasted pixel for pixel in its slot, the image exactly cells + label bands, labels
drawn (ink where they go), pending cells grey."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from ckptlab.imaging.grid_draw import PENDING, draw, font_size, layout  # noqa: E402


def solid(i: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_cells_are_pasted_exactly_and_size_is_cells_plus_labels():
    xl, yl = ["CFG: 3", "CFG: 7", "CFG: 11"], ["Seed: 1", "Seed: 2"]
    lay = layout((64, 64), xl, yl, [""], ["Seed: 1, Steps: 2", "Prompt: a cat"])
    cells = {(ix, iy, 0): solid(ix + 10 * iy) for ix in range(3) for iy in range(2)}
    img = draw(lay, cells)
    assert img.size == lay.size
    # the bands: labels on top and left, legend below, nothing else
    assert lay.size == (lay.left + 3 * 64, lay.top + 2 * 64 + lay.legend_h)
    assert lay.left > 0 and lay.top > 0 and lay.legend_h > 0
    a = np.asarray(img)
    for (ix, iy, _), cell in cells.items():
        x, y = lay.box(ix, iy, 0)
        assert (x, y) == (lay.left + 64 * ix, lay.top + 64 * iy)
        assert np.array_equal(a[y:y + 64, x:x + 64], np.asarray(cell))
    # ink above every column and left of every row
    for ix in range(3):
        band = a[:lay.top, lay.left + 64 * ix: lay.left + 64 * (ix + 1)]
        assert (band < 100).all(axis=2).any(), f"no label over column {ix}"
    for iy in range(2):
        band = a[lay.top + 64 * iy: lay.top + 64 * (iy + 1), :lay.left]
        assert (band < 100).all(axis=2).any(), f"no label left of row {iy}"
    legend = a[lay.top + 128:]
    assert (legend < 100).all(axis=2).any()


def test_labels_differ_per_column():
    lay = layout((64, 64), ["alpha: 0", "alpha: 1"], [""], [""], [])
    a = np.asarray(draw(lay, {}))
    left, right = a[:lay.top, :64], a[:lay.top, 64:128]
    assert not np.array_equal(left, right)


def test_no_y_axis_no_left_band_and_pending_cells_grey():
    lay = layout((64, 48), ["a", "b"], [""], [""], [])
    assert lay.left == 0 and lay.legend_h == 0
    assert lay.size == (128, lay.top + 48)
    img = np.asarray(draw(lay, {(0, 0, 0): solid(1, (64, 48))}))
    x, y = lay.box(1, 0, 0)
    assert (img[y:y + 48, x:x + 64] == PENDING).all()


def test_z_subgrids_side_by_side_with_titles():
    lay = layout((64, 64), ["x0", "x1"], ["y0"], ["VAE: a", "VAE: b"], [])
    assert lay.ztop > 0 and lay.gap > 0
    assert lay.size[0] == 2 * (lay.left + 128) + lay.gap
    cells = {(ix, 0, iz): solid(ix + 5 * iz) for ix in range(2) for iz in range(2)}
    a = np.asarray(draw(lay, cells))
    for (ix, iy, iz), cell in cells.items():
        x, y = lay.box(ix, iy, iz)
        assert np.array_equal(a[y:y + 64, x:x + 64], np.asarray(cell))
    x1, _ = lay.box(0, 0, 1)
    assert (a[:lay.ztop, x1:x1 + 128] < 100).all(axis=2).any()


def test_smaller_cells_centred_in_the_slot():
    lay = layout((96, 64), ["64x64", "96x64"], [""], [""], [])
    small, big = solid(1, (64, 64)), solid(2, (96, 64))
    a = np.asarray(draw(lay, {(0, 0, 0): small, (1, 0, 0): big}))
    x, y = lay.box(0, 0, 0)
    assert np.array_equal(a[y:y + 64, x + 16:x + 80], np.asarray(small))


def test_font_readable_on_small_cells():
    assert font_size((64, 64)) >= 12
    assert font_size((512, 512)) == (512 + 512) // 25
