"""``ckptlab generate`` from the command line: the happy path, and the refusals a user meets (one line each,
before any weight loads). The happy path and the CUDA refusal run the real process (``cli``); the other
refusals go through the same entry point in this process (``cli_in_process``), without a torch import each."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

from tests.fakes.sample_files import make_model  # noqa: E402


def one_line_error(r, *words):
    assert r.returncode not in (0, 70, 130), r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ckptlab: error:"), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_cli_json_record(tmp_path, cli):
    model = make_model(tmp_path / "m.safetensors", "sd1_checkpoint")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("a tree\n", encoding="utf-8")
    r = cli("generate", model, "--prompt-file", prompt, "--steps", "1", "--size", "64x64", "--seed", "5",
            "--count", "2", "--sampler", "k_euler_a", "--device", "cpu", "--json", "-o", tmp_path / "t.webp")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["seeds"] == [5, 6] and rec["family"] == "sd1" and rec["device"] == "cpu" and rec["dtype"] == "float32"
    assert [p.rsplit("/", 1)[-1] for p in rec["images"]] == ["t-5.webp", "t-6.webp"]
    assert rec["infotexts"][0].startswith("a tree\nSteps: 1, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, "
                                          "Seed: 5, Size: 64x64, Model hash: ")


@pytest.mark.parametrize(("spec", "words"), [
    ("flux_dev", ("Flux",)),
    ("sd1_kohya_lora", ("LoRA",)),
])
def test_models_generate_cannot_run_are_refused_in_one_line(tmp_path, cli_in_process, spec, words):
    from ckptlab.sample.build import SPECS

    if spec not in SPECS:
        pytest.skip(f"no {spec} sample")
    path = make_model(tmp_path / f"{spec}.safetensors", spec)
    r = cli_in_process("generate", path, "-p", "x", "--steps", "1", "--device", "cpu", "-o", tmp_path / "o.png")
    one_line_error(r, *words)
    assert not (tmp_path / "o.png").exists()


def test_cuda_without_cuda_is_a_usage_error(tmp_path, cli):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model = make_model(tmp_path / "m.safetensors", "sd1_checkpoint")
    r = cli("generate", model, "-p", "x", "--device", "cuda", "-o", tmp_path / "o.png")
    assert r.returncode == 2
    one_line_error(r, "CUDA")


def test_existing_output_refused_before_rendering(tmp_path, cli_in_process):
    model = make_model(tmp_path / "m.safetensors", "sd1_checkpoint")
    (tmp_path / "o.png").write_bytes(b"keep")
    r = cli_in_process("generate", model, "-p", "x", "--device", "cpu", "-o", tmp_path / "o.png")
    one_line_error(r, "--overwrite")
    assert (tmp_path / "o.png").read_bytes() == b"keep"
