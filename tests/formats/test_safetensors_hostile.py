"""Hostile safetensors headers (issue 12, sections 2 and 4): resource bombs in the shape list, the header-size limit
of the reference implementation, values that cost an internal error, megabyte error lines and terminal escapes.

Oracles: the reference ``safetensors`` library (what it refuses we refuse; its numpy loader's rank limit), CPython's
``json`` (what it cannot decode without a RecursionError), and the raw bytes each command writes. Every hostile file
goes through the real CLI: ``inspect``, ``check`` and ``scan`` each give one line and a documented exit status, never
exit 70 (an internal error) and never a raw control character. Subprocess timeouts only guard against a hang."""

from __future__ import annotations

import json
import os
import sqlite3
import struct
import subprocess
import sys

import pytest
from conftest import SRC
from safetensors import SafetensorError, safe_open

from ckptlab.errors import MAX_MESSAGE_CHARS, FormatError
from ckptlab.formats.base import MAX_RANK, checked_numel
from ckptlab.formats.safetensors import MAX_HEADER, SafetensorsSource
from ckptlab.security import check

KEY = "model.diffusion_model.input_blocks.0.0.weight"  # SD1 UNet conv_in
KEY2 = "model.diffusion_model.input_blocks.0.0.bias"
RAW_CONTROL = ("\x1b", "\x07", "\x9b", "\r", "\u202e")  # ESC, BEL, C1 CSI, CR, right-to-left override


def frame(raw: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(raw)) + raw + data


def entry(dtype="F32", shape=(1,), offs=(0, 4)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offs)}


def write(path, obj, data=b"\0" * 4):
    path.write_bytes(frame(json.dumps(obj).encode(), data))
    return path


def run(*args, timeout=120) -> subprocess.CompletedProcess:
    """The real CLI with bytes out (text mode would turn a raw \\r into \\n and hide it)."""
    env = dict(os.environ, PYTHONPATH=str(SRC), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "ckptlab", *map(str, args)], capture_output=True, env=env,
                          timeout=timeout)


def reference_refuses(p) -> bool:
    try:
        with safe_open(str(p), "pt") as f:
            for k in f.keys():
                f.get_tensor(k)
    except (SafetensorError, ValueError, RuntimeError, TypeError, OverflowError):
        return True
    return False


def assert_one_error_line(r: subprocess.CompletedProcess, code: int = 1) -> str:
    err = r.stderr.decode()
    assert r.returncode == code, (r.returncode, err[:500])
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptlab: error: "), err[:500]
    assert "internal error" not in err and "Traceback" not in err
    return lines[0]


# -- the header-size limit of the reference -----------------------------------------------------------------------

@pytest.mark.parametrize("n", [100_000_000, 100_000_001])
def test_header_limit_is_the_references(tmp_path, n):
    """safetensors/src/tensor.rs: MAX_HEADER_SIZE = 100_000_000. A header of exactly n bytes (a sparse file: "{}" and
    then NUL bytes, so the shared disk is spared): one byte over the limit both refuse it for its size ("header too
    large" / "exceeds the limit") and ``check`` calls it corrupt; at the limit neither refuses it for its size (both
    go on to read the JSON and stop at the NULs). Before, ckptlab's limit was 100 MiB."""
    p = tmp_path / "big_header.safetensors"
    with open(p, "wb") as fh:
        fh.write(struct.pack("<Q", n) + b"{}")
        fh.truncate(8 + n + 4)
    assert MAX_HEADER == 100_000_000
    with pytest.raises(SafetensorError) as ref:
        safe_open(str(p), "pt")
    with pytest.raises(FormatError) as ours:
        SafetensorsSource(p)
    over = n > 100_000_000
    assert ("header too large" in str(ref.value)) == over
    assert ("exceeds the 100000000 byte limit" in str(ours.value)) == over
    if not over:
        assert "not valid JSON" in str(ours.value)
    assert check(p).verdict == "corrupt"


# -- shape lists: absurd rank and overflow, in linear time ----------------------------------------------------------

def test_product_stops_at_the_first_overflowing_dimension():
    """Linear time without a clock: a million dimensions of 2**62 are read only until the partial product passes
    2**64 - 1 (the reference's checked_mul), so no product of a million 62-bit factors is ever computed."""
    consumed = []

    def dims():
        for _ in range(1_000_000):
            consumed.append(1)
            yield 2**62

    assert checked_numel(dims()) is None
    assert len(consumed) == 2  # 2**62 fits, 2**124 does not
    assert checked_numel([2**62, 2**62, 0]) is None  # a later zero does not undo an overflow (as in Rust)
    assert checked_numel([2**40, 0, 2**40]) == 0 and checked_numel([3, 4, 5]) == 60


def test_rank_limit_is_numpys_which_the_reference_numpy_loader_enforces(tmp_path):
    """MAX_RANK = 64: the reference's numpy loader refuses a 65-dimension tensor and loads a 64-dimension one."""
    assert MAX_RANK == 64
    for rank, ok in ((64, True), (65, False)):
        p = write(tmp_path / f"rank{rank}.safetensors", {KEY: entry(shape=(1,) * rank)})
        with safe_open(str(p), "np") as f:
            if ok:
                assert f.get_tensor(KEY).ndim == 64
            else:
                with pytest.raises(ValueError, match="maximum supported dimension"):
                    f.get_tensor(KEY)
        if ok:
            assert SafetensorsSource(p).info(KEY).shape == (1,) * 64
        else:
            with pytest.raises(FormatError, match="65 dimensions"):
                SafetensorsSource(p)


BOMBS = {
    # the attack run's cases: a 20 MB file with a million dimensions of 2**62; two million dimensions of 1 and of 2
    "dims_2e62_x1m": {KEY: entry(shape=(2**62,) * 1_000_000, offs=(0, 0))},
    "dims_1_x2m": {KEY: entry(shape=(1,) * 2_000_000)},
    "dims_2_x2m": {KEY: entry(shape=(2,) * 2_000_000, offs=(0, 0))},
}


@pytest.fixture(scope="module")
def bomb_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bombs")
    for name, obj in BOMBS.items():
        write(d / f"{name}.safetensors", obj, b"" if obj[KEY]["data_offsets"] == [0, 0] else b"\0" * 4)
    return d


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_shape_bombs_give_one_line_in_inspect_check_and_scan(bomb_dir, tmp_path, name):
    p = bomb_dir / f"{name}.safetensors"
    assert p.stat().st_size > 4_000_000
    assert reference_refuses(p) == (name != "dims_1_x2m")  # a million 1s is valid to the reference, absurd to us
    line = assert_one_error_line(run("inspect", p))
    assert "dimensions (at most 64)" in line and len(line) < 500
    r = run("check", "--json", p)
    assert r.returncode == 5
    rec = json.loads(r.stdout)
    assert rec["verdict"] == "corrupt" and "dimensions (at most 64)" in rec["findings"][0]["detail"]
    lib = tmp_path / "lib"
    lib.mkdir()
    os.link(p, lib / p.name)
    r = run("scan", lib, "--db", tmp_path / "c.db")
    assert r.returncode != 70 and b"internal error" not in r.stderr, r.stderr[-500:]
    (err,) = sqlite3.connect(tmp_path / "c.db").execute("SELECT error FROM files").fetchone()
    assert "dimensions (at most 64)" in err and len(err) < 500


# -- values that cost an internal error (exit 70) ------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000  # CPython's json cannot decode this without a RecursionError
DEEP_OBJ = '{"a": ' * 50_000 + "1" + "}" * 50_000
DEEP_900 = "[" * 900 + "]" * 900  # json decodes it; walking it again in Python (to_jsonable) recursed past the limit


def test_the_deep_strings_are_beyond_cpythons_json():
    for text in (DEEP, DEEP_OBJ):
        with pytest.raises(RecursionError):
            json.loads(text)
    assert json.loads(DEEP_900)


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 4}, [], 4])
def test_dtype_that_is_not_a_string_is_one_line_not_exit_70(tmp_path, dtype):
    p = write(tmp_path / "dtype.safetensors", {KEY: entry(dtype=dtype)})
    assert reference_refuses(p)
    assert "unknown dtype" in assert_one_error_line(run("inspect", p))
    r = run("check", "--json", p)
    assert r.returncode == 5 and json.loads(r.stdout)["verdict"] == "corrupt"


@pytest.mark.parametrize("deep", [{"ss_tag_frequency": DEEP, "sd_merge_recipe": DEEP_OBJ},
                                  {"sd_merge_models": DEEP_900, "modelspec.title": DEEP_900}],
                         ids=["beyond_json", "900_deep"])
def test_deeply_nested_json_in_a_metadata_string(tmp_path, deep):
    """kohya's ss_* fields, merge recipes and modelspec values hold JSON that ckptlab decodes for display; one nested
    beyond jsonable.MAX_JSON_DEPTH is kept as the string it is (the reference reads the file, so do we)."""
    p = write(tmp_path / "deep_meta.safetensors", {"__metadata__": deep, KEY: entry()})
    assert not reference_refuses(p)
    for args in (("inspect",), ("inspect", "--metadata"), ("inspect", "--json")):
        r = run(*args, p)
        assert r.returncode == 0 and not r.stderr, (args, r.stderr[-300:])
    assert json.loads(run("inspect", "--json", p).stdout)["metadata"] == deep  # JSON output stays exact
    assert run("check", p).returncode == 0
    lib = tmp_path / "lib"
    lib.mkdir()
    os.link(p, lib / p.name)
    r = run("scan", lib, "--db", tmp_path / "c.db")
    assert r.returncode == 0 and b"error" not in r.stderr, r.stderr[-300:]


# -- messages: capped at the source -------------------------------------------------------------------------------

def test_a_megabyte_key_name_makes_short_lines_everywhere(tmp_path):
    """The attack run printed a 1.5 MB error line. The key is quoted briefly where the message is made, so the line
    on stderr, the JSON error, check's finding and the error scan stores in the catalog are all short."""
    huge = "model.diffusion_model." + "k" * 1_500_000
    p = write(tmp_path / "huge_key.safetensors", {huge: entry(dtype="F99")})
    line = assert_one_error_line(run("inspect", p))
    assert "unknown dtype 'F99'" in line and "1500022 characters" in line and len(line) < 600
    r = run("inspect", "--json", p)
    assert len(r.stdout) < 1000 and "unknown dtype" in json.loads(r.stdout)["error"]
    r = run("check", "-v", p)
    assert r.returncode == 5 and len(r.stdout) < 1000 and b"unknown dtype 'F99'" in r.stdout
    lib = tmp_path / "lib"
    lib.mkdir()
    os.link(p, lib / p.name)
    r = run("scan", lib, "--db", tmp_path / "c.db")
    assert r.returncode != 70 and len(r.stderr) < 2000
    (err,) = sqlite3.connect(tmp_path / "c.db").execute("SELECT error FROM files").fetchone()
    assert "unknown dtype 'F99'" in err and len(err) < 600


def test_a_deeply_nested_shape_is_quoted_briefly(tmp_path):
    """A shape nested 900 deep: repr() of it would walk all 900 levels into the message; brief() does not."""
    shape = DEEP_900.replace("[]", "[1]")
    raw = '{"' + KEY + '": {"dtype": "F32", "shape": ' + shape + ', "data_offsets": [0, 4]}}'
    p = tmp_path / "deep_shape.safetensors"
    p.write_bytes(frame(raw.encode(), b"\0" * 4))
    assert reference_refuses(p)
    with pytest.raises(FormatError) as ei:
        SafetensorsSource(p)
    assert "not a list of non-negative integers" in str(ei.value) and len(str(ei.value)) < 400


def test_every_error_message_is_capped():
    e = FormatError("x" * 1_500_000, "/models/a.safetensors")
    assert len(e.message) < MAX_MESSAGE_CHARS + 40 and e.message.endswith("[1498000 more characters]")
    assert str(e).startswith("/models/a.safetensors: xxx")


# -- terminal escapes ------------------------------------------------------------------------------------------------

HOSTILE_TEXT = "\x1b[2Jcleared\x1b]0;title\x07\x9b31mred\rover\u202eevil"


def test_no_raw_control_character_reaches_the_terminal(tmp_path):
    """Metadata values, metadata keys and the file name carry ESC [2J, an OSC title with BEL, a C1 CSI, a carriage
    return and a right-to-left override: every human output shows them escaped; JSON output keeps them exact."""
    meta = {"modelspec.title": HOSTILE_TEXT, "ss_output_name": HOSTILE_TEXT, f"x{HOSTILE_TEXT}": "v",
            "ss_tag_frequency": json.dumps({HOSTILE_TEXT: {HOSTILE_TEXT: 1}})}
    p = write(tmp_path / f"name{HOSTILE_TEXT}.safetensors", {"__metadata__": meta, KEY: entry()})
    bad = write(tmp_path / f"bad{HOSTILE_TEXT}.safetensors", {f"key{HOSTILE_TEXT}": entry(dtype="F99")})
    for args in (("inspect",), ("inspect", "--metadata"), ("check",), ("check", "-v")):
        r = run(*args, p, bad)
        assert r.returncode in (1, 5), (args, r.stderr[-300:])
        out = (r.stdout + r.stderr).decode()
        for ch in RAW_CONTROL:
            assert ch not in out, (args, ch)
        assert "\\x1b[2Jcleared" in out and "\\u202eevil" in out
    r = run("inspect", "--metadata", p)
    assert "\\x9b31mred\\x0dover" in r.stdout.decode()
    rec = json.loads(run("inspect", "--json", p).stdout)
    assert rec["metadata"]["modelspec.title"] == HOSTILE_TEXT and rec["path"] == str(p)
