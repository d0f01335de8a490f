"""Header-level work on every format imports neither torch nor numpy nor huggingface_hub."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

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
