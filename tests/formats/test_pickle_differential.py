"""Differential test: ckptlab's pickle machine against CPython's own unpickler (the oracle).

torch.load runs ``_pickle`` (Modules/_pickle.c). Wherever that unpickler reads a stream ours
rejects, a payload can hide behind the difference and be rated ``corrupt`` while torch runs it. A
corpus of odd-but-valid (and odd-and-invalid) streams is given to plain ``pickle.loads`` in a
throwaway subprocess; our machine must accept exactly the streams it accepts, build the same values,
and rate ``malicious`` every stream whose payload (placed after the odd part) creates its canary
file there. For streams CPython rejects, the payload must not run there either: that proves the
oracle really stopped, and ours must not read such a stream to STOP.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from ckptlab.formats.pickle_vm import PickleVM
from ckptlab.security import check

# fragments that leave the stack as they found it (an odd MARK may stay open) and that CPython accepts
NEUTRAL_OK = {
    "mark_pop": b"(0",
    "mark_mark_pop_pop": b"((00",
    "mark_none_pop": b"(N0",
    "pop_mark": b"(1",
    "pop_mark_items": b"(NNN1",
    "int_hex": b"I0x10\n0",
    "int_hex_upper": b"I0X1f\n0",
    "int_octal_strtol": b"I010\n0",
    "int_bin": b"I0b1\n0",
    "int_bin_upper": b"I0B11\n0",
    "int_0o": b"I0o17\n0",
    "int_space": b"I 5\n0",
    "int_tab": b"I\t7\n0",
    "int_plus": b"I+1\n0",
    "int_minus_zero": b"I-0\n0",
    "int_underscore": b"I1_000\n0",
    "int_nul_tail": b"I5\x00junk\n0",
    "int_spaces_both": b"I 12 \n0",
    "int_overflow_long": b"I99999999999999999999\n0",
    "int_neg_hex_big": b"I-0x8000000000000001\n0",
    "int_bool_false": b"I00\n0",
    "int_bool_true": b"I01\n0",
    "int_zero_underscore": b"I0_0\n0",
    "int_hex_underscore": b"I0x1_0\n0",
    "long_bin_L": b"L0b1L\n0",
    "long_hex": b"L0x10\n0",
    "long_spaces": b"L 5 \n0",
    "long_underscore_L": b"L1_0L\n0",
    "long_nul_L": b"L5\x00xL\n0",
    "long_neg_octal": b"L-0o17L\n0",
    "long_no_L": b"L12\n0",
    "long_zeros": b"L00L\n0",
    "float_plain": b"F1.5\n0",
    "float_exp": b"F1e5\n0",
    "float_inf": b"Finf\n0",
    "float_neg_infinity": b"F-Infinity\n0",
    "float_nan": b"Fnan\n0",
    "float_NaN": b"FNaN\n0",
    "float_trailing_dot": b"F1.\n0",
    "float_leading_dot": b"F.5\n0",
    "float_nul_tail": b"F1.5\x00x\n0",
    "float_signed_exp": b"F+2.5E-3\n0",
    "float_underflow": b"F1e-400\n0",
    "string_single": b"S'abc'\n0",
    "string_double": b'S"abc"\n0',
    "string_escape": b"S'a\\x41'\n0",
    "string_empty": b"S''\n0",
    "unicode_escape": b"V\\u0041\n0",
    "put_get_underscore": b"Np 1_0\n0g10\n0",
    "put_get_leading_zeros": b"Np007\n0g7\n0",
    "put_get_plus": b"Np+3\n0g3\n0",
    "put_get_nul": b"Np5\x00x\n0g5\n0",
    "appends_empty_on_dict": b"}(e0",
    "appends_empty_on_int": b"K\x01(e0",
    "additems_empty_on_dict": b"}(\x900",
    "setitems_empty_on_none": b"N(u0",
    "setitem_list_index": b"]Na" + b"K\x00K\x05s0",
    "proto2_midstream": b"\x80\x02N0",
    "proto5_midstream": b"\x80\x05N0",
    "proto4_opcode_no_proto": b"\x8c\x01a0",
    "frame_in_proto0": b"\x95\x02\x00\x00\x00\x00\x00\x00\x00N0",
    "memo_index_5m": b"Nr\x00\x00\x50\x000j\x00\x00\x50\x000",
    "marks_100001": b"(" * 100_001,
    "tuple1": b"N\x850",
    "tuple2": b"NN\x860",
    "binint_neg": b"J\xff\xff\xff\xff0",
    "long1_empty": b"\x8a\x000",
    "long4_5000_bytes": b"\x8b\x88\x13\x00\x00" + b"\x01" * 5000 + b"0",
    "dup_pop_pop": b"N200",
    "empty_tuple_after_mark": b"(t0",
}

# fragments CPython rejects: the payload after them never runs there
NEUTRAL_BAD = {
    "pop_empty": b"0",
    "pop_past_mark": b"(00",
    "pop_mark_without_mark": b"1",
    "int_empty": b"I\n",
    "int_hex_no_digits": b"I0x\n",
    "int_bad_octal": b"I08\n",
    "int_float": b"I1.5\n",
    "float_overflow": b"F1e500\n",
    "float_leading_space": b"F 1.5\n",
    "float_underscore": b"F1_0\n",
    "float_word": b"Fabc\n",
    "float_empty": b"F\n",
    "long_empty": b"L\n",
    "long_only_L": b"LL\n",
    "long_bad_octal": b"L08\n",
    "get_missing": b"g99\n",
    "put_negative": b"Np-1\n",
    "string_unterminated": b"S'abc\n",
    "string_mismatched_quotes": b"S'abc\"\n",
    "unknown_opcode": b"\xff",
    "proto_6": b"\x80\x06",
    "global_empty_module": b"c\nsystem\n",
    "global_empty_name": b"cos\n\n",
    "global_not_utf8": b"c\xff\nx\n",
    "inst_without_mark": b"ios\nsystem\n",
    "persid_plain": b"P1\n",
    "binpersid_plain": b"NQ",
    "stack_global_underflow": b"(\x93",
    "long4_negative": b"\x8b\xff\xff\xff\xff",
    "setitem_list_out_of_range": b"]K\x05K\x05s",
    "appends_on_int": b"K\x01(K\x02e",
    "dict_odd": b"(Nd",
}

# fragments that push one value, and the value CPython gives (checked against the oracle too)
VALUES = {
    "int_hex": b"I0x10\n.", "int_plus_one_is_true": b"I+1\n.", "int_space_zero_is_false": b"I 0\n.",
    "int_octal": b"I010\n.", "int_nul": b"I7\x00x\n.", "int_long_fallback": b"I0b101\n.", "long_bin": b"L0b101L\n.",
    "long_plain": b"L123456789012345678901234567890L\n.", "float_nul": b"F2.5\x00zz\n.", "float_nan": b"Fnan\n.",
    "float_inf": b"F-inf\n.", "get_after_put": b"K\x07p 4\n0g4\n.",
}

ORACLE = r"""
import json, pickle, sys
out = []
for h in json.loads(sys.stdin.read()):
    try:
        v = pickle.loads(bytes.fromhex(h))
        out.append(["ok", type(v).__name__, repr(v)])
    except BaseException as e:
        out.append(["err", type(e).__name__, str(e)[:200]])
print(json.dumps(out))
"""


def _oracle(streams: list[bytes]) -> list[list[str]]:
    r = subprocess.run([sys.executable, "-c", ORACLE], input=json.dumps([s.hex() for s in streams]),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _payload(canary: Path) -> bytes:
    return b"cos\nsystem\n(S'touch " + str(canary).encode() + b"'\ntR."


@pytest.fixture(scope="module")
def payload_runs(tmp_path_factory):
    """Each fragment followed by a live payload, run by plain pickle.loads in one throwaway process."""
    root = tmp_path_factory.mktemp("differential")
    files, streams = {}, []
    for name, frag in {**NEUTRAL_OK, **NEUTRAL_BAD}.items():
        stream = frag + _payload(root / "canary" / name)
        p = root / "files" / f"{name}.pkl"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(stream)
        files[name] = p
        streams.append(stream)
    (root / "canary").mkdir()
    results = dict(zip([*NEUTRAL_OK, *NEUTRAL_BAD], _oracle(streams), strict=True))
    ran = {name for name in files if (root / "canary" / name).exists()}
    for c in (root / "canary").iterdir():  # the oracle's own traces; ckptlab must never add any
        c.unlink()
    yield files, results, ran, root / "canary"
    assert not list((root / "canary").iterdir()), "ckptlab ran a payload"


@pytest.mark.parametrize("name", sorted(NEUTRAL_OK))
def test_cpython_accepts_and_so_do_we(name, payload_runs):
    files, results, ran, _ = payload_runs
    assert results[name][0] == "ok", results[name]  # the oracle read it to STOP...
    assert name in ran  # ...and ran the payload behind the odd part
    stream = files[name].read_bytes()
    vm = PickleVM(stream).run()
    assert vm.complete, [f.detail for f in vm.findings]
    r = check(files[name])
    assert r.verdict == "malicious", [f.detail for f in r.issues]
    assert any("os.system" in f.detail for f in r.issues)


@pytest.mark.parametrize("name", sorted(NEUTRAL_BAD))
def test_cpython_rejects_and_so_do_we(name, payload_runs):
    files, results, ran, _ = payload_runs
    assert results[name][0] == "err", results[name]
    assert name not in ran
    vm = PickleVM(files[name].read_bytes()).run()
    assert not vm.complete, name


def test_values_equal_cpythons():
    got_cpython = _oracle(list(VALUES.values()))
    for (name, stream), (status, tname, rep) in zip(VALUES.items(), got_cpython, strict=True):
        assert status == "ok", (name, rep)
        vm = PickleVM(stream).run()
        assert vm.complete, (name, vm.findings)
        v = vm.result
        assert type(v).__name__ == tname, (name, type(v), tname)
        if isinstance(v, float) and math.isnan(v):
            assert rep == "nan"
        else:
            assert repr(v) == rep, name
