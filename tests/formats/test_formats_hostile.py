"""Hostile metadata outside safetensors (issue 12, section 4): deeply nested JSON in diffusers folders and in any
JSON ckptlab decodes, and GGUF metadata bombs. Each gives one error line (or is read, when the reference reads it),
never exit 70, in bounded time and memory.

Oracles: CPython's ``json`` (what it cannot decode without a RecursionError) and the ``gguf`` package from llama.cpp
(``GGUFReader``: the files built here are valid GGUF to it, so they must open, or fail only on a limit we state)."""

from __future__ import annotations

import json
import os
import sqlite3
import struct

import pytest

from ckptlab.arch.identify import identify, parse_metadata
from ckptlab.errors import FormatError
from ckptlab.formats import gguf as gguf_mod
from ckptlab.formats.diffusers import DiffusersSource
from ckptlab.formats.gguf import GGUFSource
from ckptlab.jsonable import MAX_JSON_DEPTH, JSONDepthError, dumps, loads_limited

DEEP = "[" * 100_000 + "]" * 100_000
UNET_KEY = "conv_in.weight"  # diffusers UNet2DConditionModel


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# -- jsonable.loads_limited ----------------------------------------------------------------------------------------

def test_loads_limited_agrees_with_json_up_to_the_limit():
    for text in ('{"a": [1, {"b": null}]}', nested(MAX_JSON_DEPTH), '"x"', "3"):
        assert loads_limited(text) == json.loads(text)
    for text in (nested(MAX_JSON_DEPTH + 1), nested(900), DEEP, '{"a":' * 50_000 + "1" + "}" * 50_000):
        with pytest.raises(JSONDepthError, match=f"more than {MAX_JSON_DEPTH} levels"):
            loads_limited(text)
    with pytest.raises(RecursionError):  # the oracle: CPython itself cannot decode it
        json.loads(DEEP)
    assert issubclass(JSONDepthError, ValueError)  # every caller's `except ValueError` already handles it


def test_metadata_strings_nested_too_deep_stay_strings():
    md = {"ss_tag_frequency": DEEP, "sd_merge_recipe": nested(900), "ss_dataset_dirs": '{"img": {"n_repeats": 10}}'}
    out = parse_metadata(md)
    assert out["ss_tag_frequency"] == DEEP and out["sd_merge_recipe"] == nested(900)
    assert out["ss_dataset_dirs"] == {"img": {"n_repeats": 10}}
    assert json.loads(dumps(out)) == out  # and what identify returns can be written as JSON


# -- diffusers folders ---------------------------------------------------------------------------------------------

def _unet_folder(root, config_text=None):
    import torch

    from ckptlab.formats.writer import write_safetensors

    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(config_text or json.dumps({"_class_name": "UNet2DConditionModel"}))
    write_safetensors(root / "diffusion_pytorch_model.safetensors", {UNET_KEY: torch.zeros(4, 4, 3, 3)})
    return root


@pytest.mark.parametrize("where", ["model_index.json", "unet/config.json", "config.json"])
def test_deeply_nested_diffusers_json_is_one_line(tmp_path, cli, where):
    pipe = tmp_path / "pipe"
    if where == "config.json":  # a single component folder
        pipe = _unet_folder(tmp_path / "pipe", '{"_class_name": ' + DEEP + "}")
    else:
        _unet_folder(pipe / "unet")
        index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
        (pipe / "model_index.json").write_text(json.dumps(index))
        (pipe / where).write_text('{"a": ' + DEEP + "}")
    with pytest.raises(FormatError, match=f"nested more than {MAX_JSON_DEPTH} levels deep"):
        DiffusersSource(pipe)
    r = cli("inspect", pipe)
    assert r.returncode == 1 and "internal error" not in r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith("ckptlab: error: ") and "nested more than" in line
    r = cli("scan", tmp_path, "--db", tmp_path / "c.db")
    assert r.returncode != 70 and "internal error" not in r.stdout + r.stderr and "nested more than" in r.stdout


def test_diffusers_config_within_the_limit_still_reads(tmp_path):
    pipe = _unet_folder(tmp_path / "unet", json.dumps({"_class_name": "UNet2DConditionModel",
                                                      "block_out_channels": [320, 640, 1280, 1280]}))
    src = DiffusersSource(pipe)
    assert src.keys() == [UNET_KEY]
    assert json.loads(src.metadata["config.json"])["block_out_channels"] == [320, 640, 1280, 1280]


# -- GGUF metadata bombs -------------------------------------------------------------------------------------------

U8, I32, U32, STR, ARR, U64 = 0, 5, 4, 8, 9, 10


def _s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def _kv(key, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _array(etype: int, items: list[bytes]) -> bytes:
    return struct.pack("<IQ", etype, len(items)) + b"".join(items)


def build_gguf(path, kvs: list[bytes], tensors: list[tuple[str, tuple[int, ...], int, bytes]]):
    """A little-endian GGUF v3 file: metadata ``kvs`` then ``tensors`` as (name, ne, ggml type, data)."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs)
    infos, data, off = b"", b"", 0
    for name, ne, tid, blob in tensors:
        infos += _s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        infos += struct.pack("<IQ", tid, off)
        pad = -len(blob) % 32
        data += blob + b"\0" * pad
        off += len(blob) + pad
    body = head + infos
    body += b"\0" * (-len(body) % 32)
    path.write_bytes(body + data)
    return path


NORM = "double_blocks.0.img_attn.norm.key_norm.scale"  # Flux, as ComfyUI-GGUF files name it
F32_NORM = (NORM, (4,), 0, b"\0" * 16)


def reference_reads(p) -> bool:
    gguf = pytest.importorskip("gguf")
    try:
        gguf.GGUFReader(str(p))
    except Exception:  # noqa: BLE001 - any failure of the reference reader
        return False
    return True


def test_a_skipped_array_nested_in_an_array_is_summarised(tmp_path, monkeypatch):
    """An array of arrays whose inner numeric array is too long to decode (SkippedArray): json.dumps of it raised a
    TypeError before, an internal error in inspect. The reference reads the file; we read it and summarise. (The
    limit is lowered here so the reference reader stays quick; the CLI test below uses the real one.)"""
    monkeypatch.setattr(gguf_mod, "DECODE_NUMBERS_UP_TO", 16)
    inner = _array(U8, [b"\1"] * 17)
    p = build_gguf(tmp_path / "nested_skip.gguf",
                   [_kv("general.architecture", STR, _s("flux")), _kv("test.nested", ARR, _array(ARR, [inner]))],
                   [F32_NORM])
    assert reference_reads(p)
    src = GGUFSource(p)
    assert src.metadata["test.nested"] == "<array of 1 values>"
    assert json.loads(dumps(identify(p)))["metadata"]["test.nested"] == "<array of 1 values>"


def test_nested_arrays_are_summarised_by_their_total_size(tmp_path):
    inner = _array(U8, [b"\1"] * 600)
    p = build_gguf(tmp_path / "nested_big.gguf", [_kv("test.pairs", ARR, _array(ARR, [inner, inner]))], [F32_NORM])
    assert reference_reads(p)
    assert GGUFSource(p).metadata["test.pairs"] == "<array of 2 values>"  # 1,200 values: not one huge line
    small = build_gguf(tmp_path / "nested_small.gguf", [_kv("test.pairs", ARR, _array(ARR, [_array(U8, [b"\1"])]))],
                       [F32_NORM])
    assert GGUFSource(small).metadata["test.pairs"] == "[[1]]"


def test_a_megabyte_key_costs_no_megabyte_per_element(tmp_path, cli):
    """Each element's label used to embed the key's repr: a 1.5 MB key over an array of 20,000 strings built 30 GB
    of labels. Labels quote the key briefly; the file is read and errors about it stay short."""
    key = "tokenizer." + "k" * 1_500_000
    p = build_gguf(tmp_path / "huge_key.gguf", [_kv(key, ARR, _array(STR, [_s("")] * 20_000))], [F32_NORM])
    assert reference_reads(p)
    assert GGUFSource(p).fields[key] == [""] * 20_000
    bad = build_gguf(tmp_path / "huge_key_bad.gguf", [_kv(key, 99, b"")], [F32_NORM])
    r = cli("inspect", bad)
    assert r.returncode == 1 and len(r.stderr) < 600 and "unknown metadata value type 99" in r.stderr


def test_metadata_value_budget(tmp_path, monkeypatch):
    """More values than MAX_METADATA_VALUES across all keys (each array under the per-array limit) is refused."""
    monkeypatch.setattr(gguf_mod, "MAX_METADATA_VALUES", 1000)
    kvs = [_kv(f"test.a{i}", ARR, _array(STR, [_s("x")] * 300)) for i in range(4)]
    p = build_gguf(tmp_path / "budget.gguf", kvs, [F32_NORM])
    assert reference_reads(p)
    with pytest.raises(FormatError, match="more than 1000 values"):
        GGUFSource(p)
    monkeypatch.setattr(gguf_mod, "MAX_METADATA_VALUES", 1210)  # 4 x 300 strings + 4 keys + the tensor-free rest
    assert len(GGUFSource(p).fields) == 4


def test_many_unknown_type_tensors_are_read_in_one_pass_and_warned_about_once(tmp_path):
    """Unknown GGML types take their size from the next tensor's offset: found by bisection (a scan per tensor was
    quadratic in the tensor count), and the warnings are capped."""
    n = 2000
    tensors = [(f"blocks.{i}.weight", (32,), 200, b"\1" * 32) for i in range(n)]
    p = build_gguf(tmp_path / "unknown.gguf", [], tensors)
    src = GGUFSource(p)
    assert len(src) == n and all(src.info(f"blocks.{i}.weight").nbytes == 32 for i in range(n))
    assert len(src.warnings) == gguf_mod.MAX_UNKNOWN_TYPE_WARNINGS + 1
    assert src.warnings[-1] == f"{n - gguf_mod.MAX_UNKNOWN_TYPE_WARNINGS} more tensors have unknown GGML types"


def test_tensor_count_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_mod, "MAX_TENSORS", 3)
    p = build_gguf(tmp_path / "many.gguf", [], [(f"t{i}", (4,), 0, b"\0" * 16) for i in range(4)])
    assert reference_reads(p)
    with pytest.raises(FormatError, match="4 tensors \\(at most 3\\)"):
        GGUFSource(p)


def test_orig_shape_of_absurd_rank_is_ignored(tmp_path):
    """comfy.gguf.orig_shape.<name> with 66 entries whose product matches: not taken as the shape (a long list of
    big numbers would have cost a quadratic product); a real 5-dimension orig_shape still is."""
    name = "patch_embedding.weight"  # Wan's Conv3d patch embedding, stored flattened
    absurd = _array(U32, [struct.pack("<I", 1)] * 65 + [struct.pack("<I", 16)])
    real = _array(U32, [struct.pack("<I", d) for d in (2, 2, 1, 2, 2)])
    for orig, shape in ((absurd, (16,)), (real, (2, 2, 1, 2, 2))):
        p = build_gguf(tmp_path / "orig.gguf", [_kv(f"comfy.gguf.orig_shape.{name}", ARR, orig)],
                       [(name, (16,), 0, b"\0" * 64)])
        assert reference_reads(p)
        assert GGUFSource(p).info(name).shape == shape


def test_gguf_metadata_bombs_through_the_cli(tmp_path, cli):
    """inspect, check and scan on the GGUF bombs: never exit 70."""
    lib = tmp_path / "lib"
    lib.mkdir()
    inner = _array(U8, [b"\1"] * (gguf_mod.DECODE_NUMBERS_UP_TO + 1))
    build_gguf(lib / "nested_skip.gguf", [_kv("test.nested", ARR, _array(ARR, [inner]))], [F32_NORM])
    build_gguf(lib / "deep.gguf", [_kv("test.deep", ARR, b"".join(struct.pack("<IQ", ARR, 1) for _ in range(20))
                                       + struct.pack("<IQ", U8, 0))], [F32_NORM])
    build_gguf(lib / "count.gguf", [_kv("test.count", ARR, struct.pack("<IQ", STR, 2**62))], [F32_NORM])
    build_gguf(lib / "strlen.gguf", [_kv("test.s", STR, struct.pack("<Q", 2**63))], [F32_NORM])
    r = cli("inspect", lib)
    assert r.returncode == 1 and "internal error" not in r.stderr
    errs = r.stderr.splitlines()
    assert len(errs) == 3 and all(e.startswith("ckptlab: error: ") for e in errs)
    r = cli("check", "--json", lib)
    verdicts = {json.loads(x)["path"].rsplit("/", 1)[1]: json.loads(x)["verdict"] for x in r.stdout.splitlines()}
    assert verdicts == {"nested_skip.gguf": "safe", "deep.gguf": "corrupt", "count.gguf": "corrupt",
                        "strlen.gguf": "corrupt"}
    build_gguf(lib / "q8.gguf", [], [("img_in.weight", (32,), 8, b"\0" * 34)])  # one Q8_0 block: a valid file
    r = cli("scan", lib, "--db", tmp_path / "c.db")
    assert r.returncode != 70 and "internal error" not in r.stdout + r.stderr
    rows = dict(sqlite3.connect(tmp_path / "c.db").execute("SELECT path, error FROM files"))
    errors = {os.fsdecode(k).rsplit("/", 1)[1]: v for k, v in rows.items()}  # paths are stored as bytes
    assert errors["nested_skip.gguf"] is None and errors["q8.gguf"] is None  # KeyError 'Q8_0' before
    assert all(errors[n] for n in ("deep.gguf", "count.gguf", "strlen.gguf"))
    info = identify(lib / "nested_skip.gguf")
    assert info.metadata["test.nested"] == "<array of 1 values>"


def test_merge_provenance_of_an_input_with_deep_json_metadata():
    """A1111 provenance copies each input's sd_merge_recipe / sd_merge_models (decoded JSON) into the merge's
    metadata: an input whose strings nest beyond the limit contributes nothing instead of a RecursionError."""
    from ckptlab.merging.provenance import merge_models_entry

    out = merge_models_entry("a.safetensors", "ab" * 32, None, {"sd_merge_recipe": DEEP, "sd_merge_models": DEEP})
    assert out == {"ab" * 32: {"name": "a.safetensors", "legacy_hash": None, "sd_merge_recipe": None}}
    ok = merge_models_entry("a", "cd" * 32, None, {"sd_merge_recipe": '{"type": "webui"}'})
    assert ok["cd" * 32]["sd_merge_recipe"] == {"type": "webui"}


def test_unknown_type_tensor_cannot_claim_more_elements_than_bits(tmp_path):
    """An unknown GGML type's size comes from the offsets; its dimensions (4 x 2**64 - 1) claimed 2**256 parameters
    in 32 bytes and the file was called safe. No GGML type stores an element in under a bit (IQ1_S: 1.5625)."""
    from ckptlab.formats.gguf import GGML_TYPES

    assert min(bsize * 8 / block for _, block, bsize in GGML_TYPES.values()) >= 1
    m = 2**64 - 1
    p = build_gguf(tmp_path / "lie.gguf", [], [("img_in.weight", (m, m, m, m), 200, b"\0" * 32)])
    assert not reference_reads(p)  # the reference refuses any type it does not know; we read them, bounded
    with pytest.raises(FormatError, match="cannot fit in 32 bytes"):
        GGUFSource(p)
    fits = build_gguf(tmp_path / "fits.gguf", [], [("img_in.weight", (256,), 200, b"\0" * 32)])
    assert GGUFSource(fits).info("img_in.weight").shape == (256,)
