"""Header-level work on every format imports neither torch nor numpy nor huggingface_hub."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


def test_opening_headers_imports_no_heavy_library(tmp_path):
    st = tmp_path / "m.safetensors"
    raw = json.dumps({"model.diffusion_model.out.2.bias": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    st.write_bytes(struct.pack("<Q", len(raw)) + raw.encode() + b"\0" * 4)
    gg = tmp_path / "m.gguf"
    name = b"img_in.bias"
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + struct.pack("<Q", len(name)) + name
    head += struct.pack("<IQIQ", 1, 8, 0, 0)
    gg.write_bytes(head + b"\0" * (-len(head) % 32) + b"\0" * 32)
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(st.read_bytes())
    code = (
        "import sys\n"
        "from ckptlab.formats import open_model\n"
        "import ckptlab.hub.huggingface\n"
        "for p in sys.argv[1:]:\n"
        "    src = open_model(p)\n"
        "    assert len(src) == 1, p\n"
        "    [i.nbytes for i in src.infos().values()]\n"
        "heavy = [m for m in ('torch', 'numpy', 'huggingface_hub', 'httpx', 'diffusers') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(SRC))
    r = subprocess.run([sys.executable, "-c", code, str(st), str(gg), str(folder)], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------------------------
# The torch-free core, through the real CLI: every core command runs where `import torch` fails, never tries it,
# and writes the same bytes as with torch importable (the torch-era code path is the oracle for what they wrote).

#: a sitecustomize that makes torch unimportable, as in a core-only install, and logs every attempt with its caller
BLOCKER = '''
import importlib.abc, os, sys, traceback

class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            log = os.environ.get("CKPTLAB_TEST_TORCH_LOG")
            if log:
                with open(log, "a") as fh:
                    fh.write(name + " <- " + " | ".join(traceback.format_stack(limit=6)[:-1]).replace("\\n", " ") + "\\n")
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoTorch())
'''


def _no_torch_env(tmp_path: Path) -> tuple[dict, Path]:
    site = tmp_path / "no-torch-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    log = tmp_path / "torch-imports.log"
    return {"PYTHONPATH": os.pathsep.join([str(site), str(SRC)]), "CKPTLAB_TEST_TORCH_LOG": str(log)}, log


def _run(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    full = dict(os.environ, COLUMNS="200", PYTHONPATH=str(SRC), CKPTLAB_DB=str(cwd / "out" / "default.db"))
    full.update(env)
    return subprocess.run([sys.executable, "-m", "ckptlab", *args], capture_output=True, text=True, env=full,
                          cwd=cwd, timeout=300)


#: (name, argv) run from the work folder; inputs in lib/, outputs in out/ (the same names in both runs)
CORE_COMMANDS = [
    ("inspect", ["inspect", "lib", "--json"]),
    ("check --deep", ["check", "lib/a", "lib/vae.safetensors", "--deep", "--json"]),
    ("convert", ["convert", "lib/a/old.ckpt", "--out-dir", "out"]),
    ("prune", ["prune", "lib/a/sd15.safetensors", "--ema", "use", "--out-dir", "out"]),
    ("prune ckpt", ["prune", "lib/a/old.ckpt", "--out-dir", "out/pruned-ckpt"]),
    ("precision fp16", ["precision", "lib/a/sd15.safetensors", "--to", "fp16", "--out-dir", "out"]),
    ("precision bf16", ["precision", "lib/a/sd15.safetensors", "--to", "bf16", "--out-dir", "out"]),
    ("precision fp8", ["precision", "lib/a/sd15.safetensors", "--to", "fp8_e4m3fn", "--clamp", "--out-dir", "out"]),
    ("precision bf16->fp16", ["precision", "lib/a/sd15-bf16.safetensors", "--to", "fp16", "--only", "unet",
                              "--only", "vae", "--only", "te", "--clamp", "--out-dir", "out"]),
    ("precision ckpt", ["precision", "lib/a/old.ckpt", "--to", "bf16", "--out-dir", "out"]),
    ("extract", ["extract", "lib/a/sd15.safetensors", "-c", "vae", "-o", "out/vae.safetensors"]),
    ("replace", ["replace", "lib/a/sd15.safetensors", "--vae", "lib/vae.safetensors", "-o", "out/replaced.safetensors"]),
    ("to-diffusers", ["to-diffusers", "lib/a/sd15.safetensors", "-o", "out/sd15-diffusers"]),
    ("to-diffusers fp16", ["to-diffusers", "lib/a/old.ckpt", "--precision", "fp16", "-o", "out/old-diffusers"]),
    ("from-diffusers", ["from-diffusers", "lib/diffusers", "-o", "out/from-diffusers.safetensors"]),
    ("hash", ["hash", "lib/a/sd15.safetensors", "lib/a/old.ckpt", "--no-cache", "--json"]),
    ("scan", ["scan", "lib", "--hash", "--fingerprint", "--db", "out/catalog.db"]),
    ("dupes", ["dupes", "--db", "out/catalog.db", "--json"]),
    ("plan-space", ["plan-space", "--db", "out/catalog.db", "--json"]),
    ("report", ["report", "--db", "out/catalog.db", "--format", "json"]),
]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix not in (".db", ".db-wal", ".db-shm")}


def _normalise(text: str) -> str:
    import re

    text = re.sub(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:?\d\d)?", "<DATE>", text)
    return re.sub(r"\d+(\.\d+)? ?(s|ms|MiB/s|GiB/s|KiB/s|B/s)\b", "<T>", text)  # durations and speeds


@pytest.fixture(scope="module")
def core_work(tmp_path_factory):
    """Sample files of real SD1 layouts, made with torch (the sample builder needs it) before any run."""
    from ckptlab.ops.diffusers_io import to_diffusers
    from ckptlab.sample.build import write_model

    work = tmp_path_factory.mktemp("core")
    lib = work / "lib"
    (lib / "a").mkdir(parents=True)
    write_model(lib / "a" / "sd15.safetensors", "sd1_checkpoint", dtype="F32", ema=True, seed=1)
    write_model(lib / "a" / "sd15-bf16.safetensors", "sd1_checkpoint", dtype="BF16", seed=2)
    write_model(lib / "a" / "old.ckpt", "sd1_checkpoint", dtype="F32", fmt="ckpt", ema=True, seed=3)
    write_model(lib / "vae.safetensors", "sd1_vae", dtype="F32", seed=4)
    to_diffusers(lib / "a" / "sd15-bf16.safetensors", work / "diffusers")  # outside lib: scanned only as input
    (work / "diffusers").rename(lib / "diffusers")
    return work


def _run_all(work: Path, env: dict) -> tuple[list[tuple[str, subprocess.CompletedProcess]], dict[str, bytes]]:
    import shutil

    shutil.rmtree(work / "out", ignore_errors=True)
    (work / "out").mkdir()
    results = [(name, _run(argv, env, work)) for name, argv in CORE_COMMANDS]
    return results, _tree(work / "out")


@pytest.mark.slow
def test_core_commands_run_without_torch_and_write_what_the_torch_path_wrote(core_work, tmp_path):
    env, log = _no_torch_env(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=dict(os.environ, **env), capture_output=True,
                           text=True)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr  # the blocker works
    log.unlink()

    with_torch, files_torch = _run_all(core_work, {})
    without, files_core = _run_all(core_work, env)

    assert not log.exists(), "torch was imported by a core command:\n" + log.read_text()
    for (name, a), (_, b) in zip(with_torch, without, strict=True):
        assert a.returncode == 0, (name, a.stderr)
        assert b.returncode == a.returncode, (name, b.stderr)
        assert _normalise(b.stdout) == _normalise(a.stdout), name
        assert _normalise(b.stderr) == _normalise(a.stderr), name
    # every output file (safetensors, diffusers folders, configs) is byte-identical
    assert sorted(files_core) == sorted(files_torch)
    expected = {"old.safetensors", "sd15-bf16-fp16.safetensors", "vae.safetensors", "replaced.safetensors",
                "from-diffusers.safetensors", "sd15-diffusers/unet/diffusion_pytorch_model.safetensors",
                "old-diffusers/text_encoder/model.safetensors"}
    assert expected <= set(files_core), sorted(files_core)
    for name in files_torch:
        assert files_core[name] == files_torch[name], name


def test_merge_without_torch_is_one_line_naming_the_extra(tmp_path):
    env, log = _no_torch_env(tmp_path)
    a = tmp_path / "a.safetensors"
    raw = json.dumps({"model.diffusion_model.out.2.bias": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    a.write_bytes(struct.pack("<Q", len(raw)) + raw.encode() + b"\0" * 4)
    r = _run(["merge", "weighted_sum", str(a), str(a), "--alpha", "0.5", "-o", str(tmp_path / "m.safetensors")],
             env, tmp_path)
    assert r.returncode == 1
    assert r.stderr == ("ckptlab: error: merge needs PyTorch: pip install 'ckptlab[torch]' (see README for CPU/CUDA "
                        "builds)\n")
    assert not (tmp_path / "m.safetensors").exists()
    listed = _run(["merge", "--list-methods"], env, tmp_path)  # listing the methods needs no torch
    assert listed.returncode == 0 and "weighted_sum" in listed.stdout


def test_hub_modules_import_without_torch(tmp_path):
    env, log = _no_torch_env(tmp_path)
    code = ("import ckptlab.hub.civitai, ckptlab.hub.huggingface, ckptlab.hub.download, ckptlab.hub.link, "
            "ckptlab.library.dupes, ckptlab.library.report, ckptlab.library.plan, ckptlab.library.scanner, "
            "ckptlab.integrity, ckptlab.ops.precision, ckptlab.ops.diffusers_io, ckptlab.library.fingerprint")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert not log.exists()


def test_merge_through_the_python_api_without_torch_raises_the_one_line_error(tmp_path):
    """``ckptlab.merge`` (the library, not only the CLI) names the extra where torch is missing."""
    env, log = _no_torch_env(tmp_path)
    a = tmp_path / "a.safetensors"
    raw = json.dumps({"model.diffusion_model.out.2.bias": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    a.write_bytes(struct.pack("<Q", len(raw)) + raw.encode() + b"\0" * 4)
    code = ("import ckptlab, sys\n"
            "try:\n"
            f"    ckptlab.merge('weighted_sum', [{str(a)!r}, {str(a)!r}], {str(tmp_path / 'm.safetensors')!r}, alpha=0.5)\n"
            "except ckptlab.CkptlabError as e:\n"
            "    print(type(e).__name__, e.exit_code, e.message)\n")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("TorchMissingError 1 merge needs PyTorch: pip install 'ckptlab[torch]'"), r.stdout
    assert not (tmp_path / "m.safetensors").exists()
