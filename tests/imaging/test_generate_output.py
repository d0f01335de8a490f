"""What ``generate`` writes: A1111's infotext (checked with a parser and hashes written here), PNG/JPEG/WebP
metadata decoded by hand, offline runs with the network cut, and no half-written image after a Ctrl-C."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from ckptlab.imaging.render import Settings, generate  # noqa: E402
from tests.conftest import SRC  # noqa: E402
from tests.fakes.sample_files import make_model  # noqa: E402

#: A1111's own parameter regex (``infotext_utils.re_param_code``)
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
A1111_ORDER = ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model", "VAE hash",
               "VAE", "Clip skip", "Lora hashes", "TI hashes", "Version"]


def a1111_parse(text: str):
    """A1111's ``parse_generation_parameters`` reduced to what we check: prompt, negative, ordered params."""
    *lines, last = text.strip().split("\n")
    assert len(RE_PARAM.findall(last)) >= 3
    prompt, negative, in_neg = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_neg, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_neg else prompt).append(line)
    params = {}
    for k, v in RE_PARAM.findall(last):
        params[k] = json.loads(v) if v[:1] == '"' and v[-1:] == '"' else v
    return "\n".join(prompt), "\n".join(negative), params


def autov3(path: Path) -> str:
    """SHA-256 of the bytes after the 8-byte header length and the JSON header (A1111's addnet hash)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n:]).hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("out")
    model = make_model(root / "my,model: v2.safetensors", "sd1_checkpoint")
    lora = make_model(root / "add_detail.safetensors", "sd1_kohya_lora")
    return root, model, lora


S = Settings("a red fox, snow", "ugly, bad hands", 99, 2, 6.5, 64, 64, "Euler a", None, 2)


def test_infotext_fields_order_and_hashes(files, tmp_path):
    from PIL import Image

    root, model, lora = files
    r = generate(model, tmp_path / "fox.png", S, loras=[(lora, 0.7)], device="cpu")
    text = Image.open(r.images[0]).text["parameters"]
    assert text == r.infotexts[0]
    prompt, negative, params = a1111_parse(text)
    assert prompt == "a red fox, snow <lora:add_detail:0.7>" and negative == "ugly, bad hands"
    keys = list(params)
    assert keys == [k for k in A1111_ORDER if k in params]  # A1111's order
    assert keys[:6] == ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size"]
    assert params["Steps"] == "2" and params["Sampler"] == "Euler a" and params["Schedule type"] == "Automatic"
    assert params["CFG scale"] == "6.5" and params["Seed"] == "99" and params["Size"] == "64x64"
    assert params["Model hash"] == hashlib.sha256(model.read_bytes()).hexdigest()[:10]
    assert params["Model"] == "my,model: v2"
    assert '"my,model: v2"' in text  # JSON-quoted, as A1111's quote() does
    assert params["Clip skip"] == "2"
    assert params["Lora hashes"] == f"add_detail: {autov3(lora)[:12]}"
    assert params["Version"].startswith("ckptlab ")
    assert "VAE hash" not in params


def exif_user_comment(path: Path) -> str:
    """The EXIF UserComment of a JPEG/WebP, decoded by hand: 8-byte charset prefix ``UNICODE\\0`` then UTF-16BE."""
    from PIL import Image

    raw = Image.open(path).getexif().get_ifd(0x8769)[0x9286]
    assert raw[:8] == b"UNICODE\0"
    return raw[8:].decode("utf-16-be")


@pytest.mark.parametrize("suffix", [".jpg", ".webp"])
def test_jpeg_and_webp_carry_the_infotext_in_exif(files, tmp_path, suffix):
    from PIL import Image

    root, model, _ = files
    s = Settings("ünïcode prompt — 猫", "", 5, 1, 7.0, 64, 64)
    r = generate(model, tmp_path / f"x{suffix}", s, device="cpu")
    assert exif_user_comment(r.images[0]) == r.infotexts[0]
    assert r.infotexts[0].startswith("ünïcode prompt — 猫\nSteps: 1, Sampler: DPM++ 2M, Schedule type: Automatic")
    assert Image.open(r.images[0]).format == {".jpg": "JPEG", ".webp": "WEBP"}[suffix]


SITECUSTOMIZE = """
import atexit, json, os, socket

def refuse(*a, **kw):
    raise OSError("network access in a test: " + repr(a[:2]))

socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.getaddrinfo = refuse
socket.create_connection = refuse

@atexit.register
def _env():
    import sys
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE")
    hub = sys.modules.get("huggingface_hub.constants")
    with open(os.environ["ENV_DUMP"], "w") as fh:
        json.dump({**{k: os.environ.get(k) for k in keys},
                   # what the hub library itself decided when it was imported (it reads the variable once)
                   "hub_offline": getattr(hub, "HF_HUB_OFFLINE", None)}, fh)
"""


def test_generate_runs_with_the_network_cut(files, tmp_path, cli):
    root, model, _ = files
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    dump = tmp_path / "env.json"
    r = cli("generate", model, "-p", "x", "--steps", "1", "--size", "64x64", "--seed", "3", "--device", "cpu",
            "-o", tmp_path / "o.png",
            env={"PYTHONPATH": f"{site}{os.pathsep}{SRC}", "ENV_DUMP": str(dump), "HF_HUB_OFFLINE": "",
                 "TRANSFORMERS_OFFLINE": ""})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o.png").is_file()
    assert json.loads(dump.read_text()) == {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                            "DIFFUSERS_OFFLINE": "1", "hub_offline": True}


def test_network_guard_is_effective(tmp_path):
    """The sitecustomize above really blocks connections (else the offline test proves nothing)."""
    import subprocess
    import sys

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    code = "import socket\ntry:\n socket.create_connection(('127.0.0.1', 9))\nexcept OSError as e:\n print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(site), "ENV_DUMP": str(tmp_path / "e.json"), "PATH": "/usr/bin"})
    assert "network access in a test" in out.stdout


def test_ctrl_c_while_writing_leaves_no_image(files, tmp_path, monkeypatch):
    import ckptlab.atomic as atomic

    root, model, _ = files

    def interrupt(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        generate(model, tmp_path / "out.png", Settings("x", seed=1, steps=1, width=64, height=64), device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_between_images_keeps_the_finished_ones_whole(files, tmp_path, monkeypatch):
    from PIL import Image

    from ckptlab.imaging import render

    root, model, _ = files
    real = render.Session.render
    calls = []

    def render_then_stop(self, s, **kw):
        calls.append(s.seed)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, s, **kw)

    monkeypatch.setattr(render.Session, "render", render_then_stop)
    with pytest.raises(KeyboardInterrupt):
        generate(model, tmp_path / "o.png", Settings("x", seed=10, steps=1, width=64, height=64), count=3,
                 device="cpu")
    assert [p.name for p in tmp_path.iterdir()] == ["o-10.png"]
    Image.open(tmp_path / "o-10.png").load()  # complete


def test_old_a1111_sampler_name_is_sampler_plus_schedule(files, tmp_path):
    """``DPM++ 2M Karras`` (A1111 before 1.9) renders as DPM++ 2M + Karras and is recorded the 1.9 way."""
    import numpy as np
    from PIL import Image

    root, model, _ = files
    old = generate(model, tmp_path / "old.png", Settings("x", "", 8, 2, 7.0, 64, 64, "DPM++ 2M Karras"), device="cpu")
    new = generate(model, tmp_path / "new.png", Settings("x", "", 8, 2, 7.0, 64, 64, "dpmpp_2m", "karras"),
                   device="cpu")
    plain = generate(model, tmp_path / "plain.png", Settings("x", "", 8, 2, 7.0, 64, 64, "DPM++ 2M"), device="cpu")
    a, b, c = (np.asarray(Image.open(r.images[0]).convert("RGB")).astype(int) for r in (old, new, plain))
    assert (a == b).all() and np.abs(a - c).max() > 8
    assert ", Sampler: DPM++ 2M, Schedule type: Karras," in old.infotexts[0]
    assert old.infotexts[0] == new.infotexts[0]
