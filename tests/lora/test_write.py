"""The LoRA writer: ``sshs_model_hash`` is the SHA-256 of the tensor data as written, inputs' sha256 are real,
kohya / ModelSpec metadata follow the modules' ranks and alphas."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest

from ckptlab.formats.base import TensorInfo
from ckptlab.lora.write import lora_metadata, write_lora
from ckptlab.ops.stream import Out


def _data_sha256(path) -> str:
    """Independent oracle: the bytes after the 8-byte length and the JSON header."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return hashlib.sha256(raw[8 + n:]).hexdigest()


def _header(path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def _items():
    rng = np.random.default_rng(0)
    arrays = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": rng.standard_normal((4, 32)),
              "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": rng.standard_normal((32, 4)),
              "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": np.array(2.0)}
    out = []
    for k, a in arrays.items():
        a = a.astype(np.float16)
        out.append(Out(k, TensorInfo("F16", tuple(a.shape)), produce=lambda a=a: a))
    return out


def test_sshs_hash_and_input_sha256_are_the_written_bytes(tmp_path):
    inp = tmp_path / "in.bin"
    inp.write_bytes(b"some input model bytes" * 100)
    out = tmp_path / "out.safetensors"
    meta = lora_metadata("sd1", [(4, 2.0)], title="t")
    write_lora(out, _items(), meta, operation="lora test", inputs=[inp])
    md = _header(out)["__metadata__"]
    assert md["sshs_model_hash"] == _data_sha256(out)
    assert json.loads(md["ckptlab.inputs"]) == [{"name": "in.bin", "sha256": hashlib.sha256(inp.read_bytes()).hexdigest()}]
    assert md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "2"
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_v2"] == "False"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"


@pytest.mark.parametrize("pairs, dim, alpha", [([(4, 4.0), (8, 4.0)], "Dynamic", "4"),
                                               ([(4, 1.0), (4, 2.5)], "4", "Dynamic"),
                                               ([(8, None)], "8", "8")])
def test_dim_and_alpha_are_dynamic_only_when_modules_differ(pairs, dim, alpha):
    meta = lora_metadata("sdxl", pairs, title="t")
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == (dim, alpha)
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_stale_legacy_hash_is_not_carried_over():
    meta = lora_metadata("sd1", [(4, 4.0)], title="t", base={"sshs_legacy_hash": "deadbeef", "ss_output_name": "x"})
    assert "sshs_legacy_hash" not in meta and meta["ss_output_name"] == "x"


def test_what_described_the_input_is_not_carried_over():
    base = {"sshs_model_hash": "a", "sshs_legacy_hash": "b", "modelspec.hash_sha256": "0xc", "modelspec.hash_legacy": "d",
            "lora_adapter_metadata": "{}", "ckptlab.recipe": "old", "ss_tag_frequency": "{}"}
    meta = lora_metadata("sd1", [(4, 4.0)], title="t", base=base)
    assert meta["ss_tag_frequency"] == "{}" and meta["sshs_model_hash"] != "a"
    assert not {"sshs_legacy_hash", "modelspec.hash_sha256", "modelspec.hash_legacy", "lora_adapter_metadata",
                "ckptlab.recipe"} & set(meta)
