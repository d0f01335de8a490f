"""``ckptlab inspect``: the real CLI in a subprocess. JSON contract, order, globs/folders, exit codes, error lines,
and header-only work without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import SRC

from ckptlab.sample.build import write_model

FIELDS = ["path", "format", "size", "tensors", "params", "kind", "family", "variant", "prediction", "components",
          "dtypes", "has_ema", "training_state", "pruned", "metadata", "vram", "evidence", "warnings"]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    root = tmp_path_factory.mktemp("lib")
    (root / "loras").mkdir()
    files = {
        "sdxl": write_model(root / "sd_xl_base_1.0.safetensors", "sdxl_checkpoint", small=False, sparse=True),
        "sd1": write_model(root / "v1-5.safetensors", "sd1_checkpoint", small=False, sparse=True,
                           metadata={"sd_merge_recipe": '{"type": "webui", "multiplier": 0.5}'}),
        "lora": write_model(root / "loras" / "style.safetensors", "sd1_kohya_lora", small=False, sparse=True),
        "esrgan": write_model(root / "RRDB_ESRGAN_x4.pth", "esrgan_x4", small=True, fmt="pt"),  # a pickle
    }
    (root / "notes.txt").write_text("not a model")
    return root, files


def _lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_json_contract_fields_and_values(cli, lib):
    root, files = lib
    r = cli("inspect", "--json", files["sdxl"])
    assert r.returncode == 0, r.stderr
    (obj,) = _lines(r.stdout)
    assert list(obj) == FIELDS
    assert obj["path"] == str(files["sdxl"]) and obj["format"] == "safetensors"
    assert obj["size"] == os.path.getsize(files["sdxl"])
    assert (obj["kind"], obj["family"], obj["variant"], obj["prediction"]) == ("checkpoint", "sdxl", None, "eps")
    assert obj["components"] == ["unet", "vae", "clip_l", "clip_g"]
    assert obj["params"] == 3_468_837_868 and obj["dtypes"] == {"fp16": 3_468_837_868}  # reference §4
    assert (obj["has_ema"], obj["training_state"], obj["pruned"]) == (False, False, True)
    v = obj["vram"]
    assert set(v) == {"gib", "resolution", "weights_gib", "working_gib", "reserve_gib", "activations_gib",
                      "vae_decode_gib", "assumptions"}
    assert v["resolution"] == 1024 and v["assumptions"]
    # weights term: every parameter in fp16, computed here from the reference count
    assert v["weights_gib"] == pytest.approx(3_468_837_868 * 2 / 2**30, abs=0.01)
    assert isinstance(obj["evidence"], list) and obj["evidence"] and obj["warnings"] == []


def test_metadata_json_strings_are_objects_in_json(cli, lib):
    _, files = lib
    (obj,) = _lines(cli("inspect", "--json", files["sd1"]).stdout)
    assert obj["metadata"]["sd_merge_recipe"] == {"type": "webui", "multiplier": 0.5}


def test_several_paths_folder_and_glob_in_order(cli, lib):
    root, files = lib
    r = cli("inspect", "--json", files["sdxl"], root / "loras", str(root / "v1-*.safetensors"))
    assert r.returncode == 0, r.stderr
    objs = _lines(r.stdout)
    assert [o["path"] for o in objs] == [str(files["sdxl"]), str(files["lora"]), str(files["sd1"])]
    assert [o["kind"] for o in objs] == ["checkpoint", "lora", "checkpoint"]
    # a folder recurses and skips non-model files
    objs = _lines(cli("inspect", "--json", root).stdout)
    assert sorted(o["path"] for o in objs) == sorted(str(p) for p in files.values())


def test_failures_are_one_line_each_and_others_still_reported(cli, lib, tmp_path):
    _, files = lib
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    missing = tmp_path / "missing.safetensors"
    r = cli("inspect", "--json", bad, files["sdxl"], missing)
    assert r.returncode == 1
    objs = _lines(r.stdout)
    assert [o["path"] for o in objs] == [str(bad), str(files["sdxl"]), str(missing)]
    assert "error" in objs[0] and "error" in objs[2] and objs[1]["kind"] == "checkpoint"
    errors = r.stderr.strip().splitlines()
    assert len(errors) == 2 and all(e.startswith("ckptlab: error: ") for e in errors)
    assert str(bad) in errors[0] and str(missing) in errors[1]
    assert "Traceback" not in r.stderr


def test_readable_summary(cli, lib):
    _, files = lib
    r = cli("inspect", files["sd1"], files["lora"])
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "checkpoint / sd1" in out and "prediction: eps" in out and "components: unet, vae, clip_l" in out
    assert "lora / sd1 / kohya" in out and "VRAM estimate" in out
    assert "ss_base_model_version: sd_v1" in out
    assert out.index(str(files["sd1"])) < out.index(str(files["lora"]))


def test_no_model_files_is_an_error(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    r = cli("inspect", tmp_path / "empty")
    assert r.returncode != 0 and r.stderr.startswith("ckptlab: error: no model files")


def test_inspect_never_imports_torch(lib):
    _, files = lib
    code = ("import sys\nfrom ckptlab.cli.main import main\n"
            "try:\n    main(['inspect', '--json', *sys.argv[1:]])\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'diffusers', "
            "'transformers', 'safetensors'))\n"
            "sys.stderr.write('HEAVY=' + ','.join(heavy))\n")
    r = subprocess.run([sys.executable, "-c", code, str(files["sdxl"]), str(files["lora"]), str(files["esrgan"])],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().endswith("HEAVY="), r.stderr[-500:]


def test_importtime_shows_no_torch(lib):
    _, files = lib
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "ckptlab", "inspect", str(files["sdxl"])],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "ckptlab.arch.identify" in imported
    assert not any(m == "torch" or m.startswith("torch.") for m in imported)


def test_hostile_pickle_is_refused_without_running(cli, lib, tmp_path):
    """A pickle whose payload would create a file: inspect refuses it (exit 4 per errors.UnsafeFileError), never
    runs it, and still reports the other path."""
    import pickle

    canary = tmp_path / "canary"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    bad = tmp_path / "evil.ckpt"
    bad.write_bytes(pickle.dumps({"state_dict": Payload()}, protocol=2))
    _, files = lib
    r = cli("inspect", "--json", bad, files["lora"])
    assert r.returncode == 4, (r.returncode, r.stderr)
    assert not canary.exists()
    objs = _lines(r.stdout)
    assert "error" in objs[0] and objs[1]["kind"] == "lora"
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_gguf_and_diffusers_text_is_shown_escaped(tmp_path):
    """Control characters in GGUF metadata strings, GGUF tensor names (warnings) and a diffusers folder's config
    reach the readable view escaped, never raw; --json keeps them exact."""
    import struct

    import torch

    from ckptlab.formats.writer import write_safetensors

    hostile = "\x1b[2Jx\x1b]0;t\x07\x9b1m\ry\u202ez"

    def s(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b

    name = ("img_in.weight" + hostile).encode()
    kv = s(b"general.name") + struct.pack("<I", 8) + s(hostile.encode())
    body = b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + kv
    body += s(name) + struct.pack("<IQIQ", 1, 32, 200, 0)  # an unknown GGML type: the warning names the tensor
    body += b"\0" * (-len(body) % 32)
    gguf = tmp_path / "flux.gguf"
    gguf.write_bytes(body + b"\0" * 32)
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "note": hostile}))
    write_safetensors(unet / "diffusion_pytorch_model.safetensors", {"conv_in.weight": torch.zeros(4, 4, 3, 3)})
    env = dict(os.environ, PYTHONPATH=str(SRC), COLUMNS="200")
    r = subprocess.run([sys.executable, "-m", "ckptlab", "inspect", "--metadata", str(gguf), str(unet)],
                       capture_output=True, env=env, timeout=300)
    out = (r.stdout + r.stderr).decode()
    assert r.returncode == 0, out[-500:]
    for ch in ("\x1b", "\x07", "\x9b", "\r", "\u202e"):
        assert ch not in out
    assert out.count("\\x1b[2Jx") == 2 and "\\u202ez" in out  # general.name and the warning naming the tensor
    assert '"note": "\\u001b[2Jx' in out  # a decoded config is shown as JSON, its escapes JSON's
    r = subprocess.run([sys.executable, "-m", "ckptlab", "inspect", "--json", str(gguf), str(unet)],
                       capture_output=True, env=env, timeout=300)
    g, d = _lines(r.stdout.decode())
    assert g["metadata"]["general.name"] == hostile
    assert d["metadata"]["config.json"]["note"] == hostile  # identify decodes the config's JSON
