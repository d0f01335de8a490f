"""``--x AXIS=...`` parsing against A1111's rules, written here from xyz_grid.py's formulas (numpy), and the loop
order (costly axes outermost)."""

from __future__ import annotations

import numpy as np
import pytest

from ckptlab.errors import UsageError
from ckptlab.imaging.grid import loop_order
from ckptlab.imaging.grid_axes import AXES, parse_axis


def a1111_int_range(start: int, end: int, step: int = 1) -> list[int]:
    # xyz_grid.py: range(start, end + 1, step) with end + 1 (A1111 adds 1 to the end for either sign)
    return list(range(start, end + (1 if step > 0 else -1), step))


@pytest.mark.parametrize(("text", "want"), [
    ("seed=1-5", [1, 2, 3, 4, 5]),
    ("seed=1-5 (+2)", [1, 3, 5]),
    ("seed=10-5 (-3)", [10, 7]),
    ("steps=1-10 [5]", np.linspace(1, 10, num=5).astype(int).tolist()),  # A1111's count form
    ("steps=20-10 [3]", np.linspace(20, 10, num=3).astype(int).tolist()),
    ("seed=1, 3-4, 7", [1, 3, 4, 7]),
    ("seed=-1", [-1]),
    ("seed=4,-1,7", [4, -1, 7]),
    ("clip-skip=1-3", [1, 2, 3]),
])
def test_int_ranges_as_a1111(text, want):
    assert parse_axis(text).values == want


def test_hand_listed_ranges():
    """The same lists written out by hand (the doc's examples)."""
    assert parse_axis("seed=1-5 (+2)").values == [1, 3, 5]
    assert parse_axis("seed=10-5 (-3)").values == [10, 7]
    assert parse_axis("steps=1-10 [5]").values == [1, 3, 5, 7, 10]
    assert parse_axis("cfg=0-1 [5]").values == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_axis("cfg=3-9 (+3)").values == [3.0, 6.0, 9.0]
    assert a1111_int_range(10, 5, -3) == [10, 7]


@pytest.mark.parametrize(("text", "start", "end", "step"), [
    ("cfg=0.25-1 (+0.25)", 0.25, 1.0, 0.25),
    ("cfg=1-0 (-0.5)", 1.0, 0.0, -0.5),
    ("cfg=0-1 (+0.1)", 0.0, 1.0, 0.1),
    ("lora=0-2 (+0.5)", 0.0, 2.0, 0.5),
    ("cfg=3-7", 3.0, 7.0, 1.0),
])
def test_float_step_ranges_as_numpy_arange(text, start, end, step):
    # A1111: np.arange(start, end + step, step); compared after rounding (0.1 steps: 0.30000000000000004)
    want = [round(float(x), 10) for x in np.arange(start, end + step / 2, step)]
    assert parse_axis(text).values == pytest.approx(want, abs=1e-12)
    assert len(parse_axis(text).values) == len(want)


def test_float_count_range_as_linspace():
    assert parse_axis("cfg=2-8 [4]").values == pytest.approx(np.linspace(2, 8, num=4).tolist())
    assert parse_axis("lora=0-1 [3]").values == [0.0, 0.5, 1.0]


def test_csv_values_with_quotes():
    a = parse_axis('prompt=cat,"dog, big", bird')
    assert a.values == ["cat", "dog, big", "bird"]
    assert parse_axis("sampler=Euler a, DPM++ 2M").values == ["Euler a", "DPM++ 2M"]


def test_lora_and_merge_params():
    a = parse_axis("lora:style=0,1")
    assert (a.kind, a.param, a.values) == ("lora", "style", [0.0, 1.0])
    m = parse_axis("merge:alpha=0,0.5")
    assert (m.kind, m.param) == ("merge", "alpha")
    bare = parse_axis("alpha=0,0.5", merge_params=("alpha", "mix.alpha"))
    assert (bare.kind, bare.param, bare.values) == ("merge", "alpha", [0.0, 0.5])
    step = parse_axis("merge:mix.alpha=1")
    assert step.param == "mix.alpha"


def test_labels():
    assert parse_axis("cfg=7,7.5").label(0) == "CFG: 7"
    assert parse_axis("cfg=7,7.5").label(1) == "CFG: 7.5"
    assert parse_axis("prompt=cat,dog").label(1) == "dog"
    assert parse_axis("merge:alpha=0.25").label(0) == "alpha: 0.25"


@pytest.mark.parametrize(("text", "words"), [
    ("colour=1,2", ["unknown axis", "model", "merge", "seed", "cfg", "prompt"]),
    ("seed=", ["no values"]),
    ("seed= , ,", ["no values"]),
    ("seed", ["AXIS=V1,V2"]),
    ("seed=1-x", ["not a whole number"]),
    ("seed=1.5", ["not a whole number"]),
    ("cfg=abc", ["not a number"]),
    ("seed=1-5 (-1)", ["empty range"]),
    ("cfg=0-1 (-0.5)", ["empty range"]),
    ("seed=1-5 (+0)", ["step cannot be 0"]),
    ("cfg=nan", ["finite"]),
    ("merge=0,1", ["merge:alpha"]),
    ("seed:x=1", ["takes no :NAME"]),
    ("seed=1-100000", ["more than"]),
])
def test_bad_axes_are_one_line_usage_errors(text, words):
    with pytest.raises(UsageError) as e:
        parse_axis(text)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_unknown_axis_lists_every_axis():
    with pytest.raises(UsageError) as e:
        parse_axis("denoise=1")
    for name in AXES:
        assert name in str(e.value)


def test_loop_order_puts_costly_axes_outside():
    seed, model, merge, vae = (parse_axis("seed=1,2"), parse_axis("model=a,b"), parse_axis("merge:alpha=0,1"),
                               parse_axis("vae=none,v"))
    assert loop_order([seed, None, None])[-1] == 0          # the only axis is the inner loop
    assert loop_order([seed, parse_axis("cfg=1,2"), None]) == [2, 1, 0]  # A1111's default: z, y, x
    assert loop_order([model, seed, None]) == [2, 0, 1]     # model on x: x outermost
    assert loop_order([seed, vae, merge]) == [2, 1, 0]
    assert loop_order([merge, seed, vae]) == [0, 2, 1]
