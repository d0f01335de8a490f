"""Benign SD-shaped pickles (tests/hostile/benign.py): read and converted bit for bit, compared with
what ``torch.load(weights_only=False)`` yields in a throwaway subprocess (the oracle)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from hostile.benign import build_benign, oracle_tensors
from safetensors import safe_open
from safetensors.torch import load_file

from ckptlab.formats import open_model
from ckptlab.ops.convert import convert
from ckptlab.security import check


@pytest.fixture(scope="session")
def benign(tmp_path_factory, worker_id):
    """Built once per run, shared by xdist workers (the folder above each worker's basetemp is per run)."""
    base = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        base = base.parent
    root = base / "benign-corpus"
    with FileLock(str(base / "benign-corpus.lock")):
        if not (root / "names.json").exists():
            files = build_benign(root / "files")
            oracle_tensors(files, root / "oracle")
            (root / "names.json").write_text(json.dumps(list(files)))
    names = json.loads((root / "names.json").read_text())
    files = {n: root / "files" / n for n in names}
    oracle = {n: torch.load(root / "oracle" / f"{n}.oracle", weights_only=True) for n in names}
    return root, files, oracle


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and torch.equal(_bits(a), _bits(b))


def test_at_least_ten_benign_files(benign):
    _, files, _ = benign
    assert len(files) >= 10


def test_every_benign_file_is_safe(benign):
    _, files, _ = benign
    for name, p in files.items():
        r = check(p)
        assert r.verdict == "safe", (name, [f.detail for f in r.issues])


def test_reader_matches_torch_load(benign):
    _, files, oracle = benign
    for name, p in files.items():
        with open_model(p) as src:
            assert src.format == "pickle"
            assert set(src.keys()) == set(oracle[name]), name
            for k, want in oracle[name].items():
                got = src.get(k)
                assert _same(got, want), (name, k)


def test_convert_matches_torch_load(benign, tmp_path):
    _, files, oracle = benign
    results = convert(list(files.values()), out_dir=tmp_path)
    assert len(results) == len(files)
    for (name, _p), r in zip(files.items(), results, strict=True):
        assert r.output.exists()
        out = load_file(str(r.output))  # the safetensors library as reader
        assert set(out) == set(oracle[name]), name
        for k, want in oracle[name].items():
            assert _same(out[k], want), (name, k)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_lightning_checkpoint_metadata_and_training_state(benign, tmp_path):
    _, files, _ = benign
    [r] = convert(files["sd1_lightning.ckpt"], out=tmp_path / "m.safetensors")
    with safe_open(str(r.output), "pt") as f:
        md = f.metadata()
        keys = set(f.keys())
    assert md["global_step"] == "840000"  # a numpy int64 in the pickle
    assert md["epoch"] == "6"
    assert md["pytorch-lightning_version"] == "1.6.0"
    assert json.loads(md["hyper_parameters"]) == {"base_learning_rate": 1e-4, "target": "ldm.models.diffusion.ddpm"}
    assert md["format"] == "pt"
    assert r.dropped["training_state"] == 3  # optimizer_states, lr_schedulers, callbacks
    assert not any(k.startswith(("optimizer", "callbacks", "lr_")) for k in keys)


def test_ema_kept_by_default_and_dropped_on_request(benign, tmp_path):
    _, files, oracle = benign
    [r] = convert(files["sample_sd1.ckpt"], out=tmp_path / "keep.safetensors")
    assert sum(k.startswith("model_ema.") for k in load_file(str(r.output))) > 100
    [r] = convert(files["sample_sd1.ckpt"], out_dir=tmp_path, drop_ema=True)
    out = load_file(str(r.output))
    want = {k for k in oracle["sample_sd1.ckpt"] if not k.startswith("model_ema.")}
    assert set(out) == want and r.dropped["ema"] == len(oracle["sample_sd1.ckpt"]) - len(want)


def test_shared_storage_views_become_separate_tensors(benign, tmp_path):
    _, files, _ = benign
    with open_model(files["nested_views.ckpt"]) as src:
        w = "model.diffusion_model.out.2."
        assert src.storage_key(w + "weight")[0] == src.storage_key(w + "weight_t")[0]
        assert torch.equal(src.get(w + "weight_t"), torch.arange(24, dtype=torch.float32).reshape(4, 6).t())
    [r] = convert(files["nested_views.ckpt"], out_dir=tmp_path)
    out = load_file(str(r.output))
    assert torch.equal(out[w + "cols"], torch.arange(24, dtype=torch.float32).reshape(4, 6)[:, 2:5])


def test_tensors_are_mmap_backed_not_copies(benign):
    _, files, _ = benign
    p = files["sd1_unet_bf16.ckpt"]
    with open_model(p) as src:
        k = src.keys()[0]
        t = src.get(k)
        raw = p.read_bytes()
        off = raw.index(_bits(t).numpy().tobytes())
        assert src.scan.storages[0].backing[0] == "file"
        assert any(st.backing[:2] == ("file", off) for st in src.scan.storages)


def test_a1111_embedding_layout(benign):
    _, files, _ = benign
    with open_model(files["bad-hands.pt"]) as src:
        assert src.keys() == ["string_to_param.*"]
        assert src.extra["name"] == "bad-hands" and src.extra["step"] == 3000
        assert src.extra["string_to_token"] == {"*": 265}


def test_cli_convert_and_check(benign, cli, tmp_path):
    _, files, oracle = benign
    r = cli("check", files["sd1_vae_legacy.ckpt"], files["vae_plain_p5.bin"])
    assert r.returncode == 0 and r.stdout.count("safe") == 2
    out = tmp_path / "vae.safetensors"
    r = cli("convert", files["sd1_vae_legacy.ckpt"], "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["output"] == str(out) and rec["tensors_out"] == len(oracle["sd1_vae_legacy.ckpt"])
    r = cli("convert", files["sd1_vae_legacy.ckpt"], "-o", out)
    assert r.returncode != 0 and "exists" in r.stderr  # never overwritten silently
    assert check(out).verdict == "safe"


def _record_offset(p, src_key_tensor) -> int:
    raw = p.read_bytes()
    return raw.index(_bits(src_key_tensor).numpy().tobytes())


def test_damaged_storage_record_is_caught_by_its_zip_crc(benign, tmp_path, cli):
    """torch.load ignores zip CRCs and would load the damaged values; ckptlab refuses with one line and
    writes nothing."""
    from ckptlab.errors import FormatError

    _, files, _ = benign
    good = files["sd1_unet_bf16.ckpt"]
    with open_model(good) as src:
        k = src.keys()[0]
        off = _record_offset(good, src.get(k))
    bad = tmp_path / "damaged.ckpt"
    data = bytearray(good.read_bytes())
    data[off + 5] ^= 0x40  # one bit flipped inside a tensor's bytes
    bad.write_bytes(bytes(data))
    with open_model(bad) as src, pytest.raises(FormatError, match="CRC-32"):
        src.get(k)
    out = tmp_path / "out"
    out.mkdir()
    r = cli("convert", bad, "--out-dir", out)
    assert r.returncode == 1 and "CRC-32" in r.stderr and "damaged" in r.stderr, r.stderr
    assert list(out.iterdir()) == []


def test_deflated_records_are_read_and_checked(benign, tmp_path):
    """Zip records compressed with deflate (some tools repack checkpoints) inflate to the same tensors; a
    wrong CRC on one is refused."""
    import struct
    import zipfile

    _, files, oracle = benign
    good = files["sd1_unet_bf16.ckpt"]
    packed = tmp_path / "deflated.ckpt"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    with open_model(packed) as src:
        assert any(st.backing and st.backing[0] == "deflate" for st in src.scan.storages)
        for k, want in oracle["sd1_unet_bf16.ckpt"].items():
            assert _same(src.get(k), want), k
    # a wrong CRC on the first data record (central directory and local header)
    with zipfile.ZipFile(packed) as z:
        rec = next(i for i in z.infolist() if "/data/" in i.filename)
        pos = z.start_dir
    raw = bytearray(packed.read_bytes())
    wrong = struct.pack("<I", rec.CRC ^ 0xFFFFFFFF)
    while True:  # walk the central directory to the record's entry
        assert raw[pos:pos + 4] == b"PK\x01\x02"
        nlen, xlen, clen = struct.unpack("<HHH", raw[pos + 28:pos + 34])
        if raw[pos + 46:pos + 46 + nlen] == rec.filename.encode():
            break
        pos += 46 + nlen + xlen + clen
    raw[pos + 16:pos + 20] = wrong
    raw[rec.header_offset + 14:rec.header_offset + 18] = wrong
    broken = tmp_path / "wrong-crc.ckpt"
    broken.write_bytes(bytes(raw))
    from ckptlab.errors import FormatError

    with open_model(broken) as src:
        with pytest.raises(FormatError, match="CRC-32"):
            for k in src.keys():
                src.get(k)


def test_broken_deflate_stream_is_a_format_error(benign, tmp_path):
    """A deflated record whose compressed bytes are garbage: one FormatError, not zlib's own exception."""
    import zipfile

    from ckptlab.errors import FormatError

    _, files, _ = benign
    packed = tmp_path / "deflated.ckpt"
    with zipfile.ZipFile(files["sd1_unet_bf16.ckpt"]) as zin, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    with zipfile.ZipFile(packed) as z:
        rec = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.compress_size)
    raw = bytearray(packed.read_bytes())
    start = rec.header_offset + 30 + len(rec.filename.encode()) + len(rec.extra)
    raw[start:start + 16] = b"\xff" * 16  # an invalid deflate block header
    broken = tmp_path / "broken-deflate.ckpt"
    broken.write_bytes(bytes(raw))
    with open_model(broken) as src, pytest.raises(FormatError, match="does not inflate"):
        for k in src.keys():
            src.get(k)


def test_output_named_ckpt_is_refused_and_out_dir_is_created(benign, tmp_path, cli):
    """convert -o x.ckpt wrote safetensors under a name every UI would unpickle: refused, nothing written.
    --out-dir is created when missing; an empty folder is an error, not a silent success."""
    _, files, _ = benign
    src = files["sd1_vae_legacy.ckpt"]
    for name in ("x.ckpt", "x.pt", "x.bin", "x"):
        r = cli("convert", src, "-o", tmp_path / name)
        assert r.returncode == 1, r.stderr
        assert r.stderr.splitlines() == [f"ckptlab: error: {tmp_path / name}: the output is a safetensors file; "
                                         f"name it .safetensors (e.g. {Path(name).stem}.safetensors)"]
    assert list(tmp_path.iterdir()) == []
    r = cli("convert", src, "--out-dir", tmp_path / "a" / "b", "--json")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "a" / "b" / "sd1_vae_legacy.safetensors"
    assert json.loads(r.stdout)["output"] == str(out)
    got = load_file(str(out))
    want = benign[2]["sd1_vae_legacy.ckpt"]  # torch.load in a subprocess
    assert set(got) == set(want) and all(_same(got[k], v) for k, v in want.items())
    (tmp_path / "empty").mkdir()
    r = cli("convert", tmp_path / "empty")
    assert r.returncode == 1 and r.stderr.splitlines() == [
        f"ckptlab: error: {tmp_path / 'empty'}: no pickle files (.ckpt .pt .pth .bin) found in this folder"]
