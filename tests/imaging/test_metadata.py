"""Reading generation metadata from image files: every source a generator writes, and hostile files.

Images are written by Pillow (an independent writer) or byte by byte here (hostile ones: a decompression bomb, a
damaged CRC, pixels that are not even valid zlib); expected values are the ones written into them.
"""

from __future__ import annotations

import json
import struct
import zlib

import pytest

from ckptlab.errors import FormatError
from ckptlab.imaging import metadata
from ckptlab.imaging.metadata import read_metadata, read_raw


def _chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def png_bytes(texts: list[tuple[bytes, bytes]] = (), size=(8, 8), idat: bytes | None = None, iend=True) -> bytes:
    """A PNG built by hand: IHDR (8-bit RGB), the given (chunk type, data) pairs, IDAT, IEND."""
    w, h = size
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    if idat is None:
        assert w * h <= 1 << 16, "pass idat= for a big image"
        idat = zlib.compress(b"".join(b"\0" + b"\0" * 3 * w for _ in range(h)))
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
    for ctype, data in texts:
        out += _chunk(ctype, data)
    out += _chunk(b"IDAT", idat)
    return out + (_chunk(b"IEND", b"") if iend else b"")


A1111 = ("a cat, <lora:add_detail:0.8>\nNegative prompt: ugly\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 5, "
         "Size: 8x8, Model hash: 6ce0161689, Model: v1-5, Lora hashes: \"add_detail: 7c6bad76eb54\"")


def test_png_text_chunks_of_every_kind(tmp_path):
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111, zip=True)  # zTXt
    info.add_itxt("prompt", '{"1": {"class_type": "X", "inputs": {}}}', zip=True)  # compressed iTXt
    info.add_text("Comment", "plain")  # tEXt
    p = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(p, pnginfo=info)
    raw = read_raw(p)
    assert raw.container == "png" and raw.size == (8, 8)
    assert raw.texts == {"parameters": A1111, "prompt": '{"1": {"class_type": "X", "inputs": {}}}', "Comment": "plain"}
    m = read_metadata(p)
    assert m.generator == "a1111" and m.prompt == "a cat, <lora:add_detail:0.8>" and m.negative == "ugly"


def test_pixels_are_never_decoded(tmp_path):
    """The IDAT is not even zlib: Pillow cannot decode the image, and our reader never tries."""
    from PIL import Image

    p = tmp_path / "bad-pixels.png"
    p.write_bytes(png_bytes([(b"tEXt", b"parameters\0" + A1111.encode())], idat=b"\xde\xad\xbe\xef" * 100))
    with pytest.raises(Exception):  # noqa: B017 - whatever Pillow raises: the pixels are garbage
        with Image.open(p) as im:
            im.load()
    assert read_metadata(p).params["Seed"] == "5"


def test_decompression_bomb_is_refused(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(png_bytes([(b"tEXt", b"parameters\0" + A1111.encode())], size=(100_000, 100_000),
                             idat=b"\0" * 16))
    with pytest.raises(FormatError, match="decompression-bomb"):
        read_raw(p)
    # the limit is Pillow's DecompressionBombError threshold, so a user who raised Pillow's setting is obeyed
    from PIL import Image

    assert metadata.max_pixels() == 2 * Image.MAX_IMAGE_PIXELS


def test_jpeg_bomb_dimensions_refused(tmp_path):
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 65000, 65000, 1) + b"\x01\x11\x00"
    p = tmp_path / "bomb.jpg"
    p.write_bytes(b"\xff\xd8" + sof + b"\xff\xda\x00\x02" + b"\0" * 16 + b"\xff\xd9")
    with pytest.raises(FormatError, match="decompression-bomb"):
        read_raw(p)


def test_truncated_png_at_every_length(tmp_path):
    full = png_bytes([(b"tEXt", b"parameters\0" + A1111.encode())])
    p = tmp_path / "cut.png"
    for cut in range(0, len(full)):
        p.write_bytes(full[:cut])
        with pytest.raises(FormatError):
            read_raw(p)
    p.write_bytes(full)
    assert read_raw(p).texts["parameters"] == A1111


def test_damaged_crc(tmp_path):
    data = bytearray(png_bytes([(b"tEXt", b"parameters\0" + A1111.encode())]))
    i = data.index(b"Steps")
    data[i] ^= 0x20
    p = tmp_path / "crc.png"
    p.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="CRC"):
        read_raw(p)


def test_giant_and_bomb_text_chunks_are_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(metadata, "MAX_CHUNK", 64 << 10)
    big = b"parameters\0" + b"x" * (100 << 10)
    bomb = b"workflow\0\0" + zlib.compress(b"\0" * (20 << 20), 9)  # 20 MiB of zeros in ~20 KiB
    p = tmp_path / "big.png"
    p.write_bytes(png_bytes([(b"tEXt", big), (b"zTXt", bomb), (b"tEXt", b"Comment\0fine")]))
    raw = read_raw(p)
    assert raw.texts == {"Comment": "fine"}
    assert any("skipped" in w for w in raw.warnings) and any("decompresses to more" in w for w in raw.warnings)


def test_nested_json_in_a_chunk_is_a_warning(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    p = tmp_path / "deep.png"
    p.write_bytes(png_bytes([(b"tEXt", b"prompt\0" + deep.encode()), (b"tEXt", b"invokeai_metadata\0{bad json")]))
    m = read_metadata(p)
    assert m.generator is None and m.models == []
    assert any("prompt" in w for w in m.warnings) and any("invokeai_metadata" in w for w in m.warnings)


@pytest.mark.parametrize("content", [b"", b"hello, this is text\n" * 10, b"\x89PNG\r\n\x1a\n", b"RIFF\0\0\0\0WEBP"])
def test_not_images(tmp_path, content):
    p = tmp_path / "x.png"
    p.write_bytes(content)
    with pytest.raises(FormatError):
        read_raw(p)


def test_folder_and_missing(tmp_path):
    with pytest.raises(FormatError):
        read_raw(tmp_path)
    with pytest.raises(FormatError, match="cannot read"):
        read_raw(tmp_path / "nope.png")


def _jpeg_with_comment(path, comment: bytes):
    from PIL import Image

    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = comment
    Image.new("RGB", (8, 8)).save(path, "JPEG", exif=exif.tobytes())


@pytest.mark.parametrize(("comment", "expected"), [
    (b"UNICODE\0" + A1111.encode("utf-16-be"), A1111),
    (b"UNICODE\0" + A1111.encode("utf-16-le"), A1111),
    (b"ASCII\0\0\0" + b"Steps: 3, Sampler: Euler, CFG scale: 7, Seed: 1", "Steps: 3, Sampler: Euler, CFG scale: 7, Seed: 1"),
])
def test_jpeg_user_comment_encodings(tmp_path, comment, expected):
    p = tmp_path / "c.jpg"
    _jpeg_with_comment(p, comment)
    assert read_raw(p).texts["parameters"] == expected


def test_invalid_utf16_user_comment(tmp_path):
    p = tmp_path / "bad16.jpg"
    _jpeg_with_comment(p, b"UNICODE\0" + b"\xd8\x00\xd8\x00\x00S\x00t\x00e\x00p\x00s\x00:" + b"\x01")  # lone surrogates, odd
    text = read_raw(p).texts["parameters"]
    assert "\ufffd" in text and "Steps:" in text


def test_truncated_jpeg(tmp_path):
    p = tmp_path / "c.jpg"
    _jpeg_with_comment(p, b"UNICODE\0" + A1111.encode("utf-16-be"))
    data = p.read_bytes()
    sos = data.index(b"\xff\xda")
    for cut in (3, 10, sos // 2, sos - 1):
        p.write_bytes(data[:cut])
        with pytest.raises(FormatError, match="JPEG"):
            read_raw(p)


def test_webp_exif_and_comfyui_webp(tmp_path):
    from PIL import Image

    graph = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "model.safetensors"}}}
    exif = Image.Exif()
    exif[0x0110] = "prompt:" + json.dumps(graph)  # ComfyUI's SaveAnimatedWEBP: Model = prompt, Make = workflow
    exif[0x010F] = "workflow:{}"
    p = tmp_path / "c.webp"
    Image.new("RGB", (8, 8)).save(p, "WEBP", exif=exif.tobytes())
    raw = read_raw(p)
    assert raw.container == "webp" and raw.size == (8, 8)
    assert json.loads(raw.texts["prompt"]) == graph
    m = read_metadata(p)
    assert m.generator == "comfyui" and [(r.role, r.name) for r in m.models] == [("checkpoint", "model.safetensors")]
    p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(FormatError, match="truncated WebP"):
        read_raw(p)


# ---------------------------------------------------------------------------------------- generators

COMFY_API = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 156680208700286, "steps": 20, "cfg": 8, "sampler_name": "euler",
                                               "scheduler": "karras", "denoise": 1, "model": ["11", 0],
                                               "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "SD1.5\\v1-5-pruned-emaonly.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 768, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat, masterpiece", "clip": ["14", 0]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": ["12", 0], "clip": ["14", 0]}},
    "10": {"class_type": "LoraLoader", "inputs": {"lora_name": "add_detail.safetensors", "strength_model": 0.8,
                                                  "strength_clip": 0.6, "model": ["4", 0], "clip": ["4", 1]}},
    "11": {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": "style/foo.safetensors", "strength_model": 0.5,
                                                           "model": ["10", 0]}},
    "12": {"class_type": "PrimitiveString", "inputs": {"value": "ugly, blurry"}},
    "13": {"class_type": "VAELoader", "inputs": {"vae_name": "vae-ft-mse-840000-ema-pruned.safetensors"}},
    "14": {"class_type": "CLIPSetLastLayer", "inputs": {"stop_at_clip_layer": -2, "clip": ["10", 1]}},
}


def _png_with(tmp_path, **texts) -> object:
    p = tmp_path / "g.png"
    p.write_bytes(png_bytes([(b"tEXt" if all(ord(c) < 256 for c in v) else b"iTXt",
                              k.encode() + (b"\0" + v.encode("latin-1") if all(ord(c) < 256 for c in v)
                                            else b"\0\0\0\0\0" + v.encode()))
                             for k, v in texts.items()]))
    return read_metadata(p)


def test_comfyui_api_prompt(tmp_path):
    m = _png_with(tmp_path, prompt=json.dumps(COMFY_API), workflow="{}")
    assert m.generator == "comfyui"
    assert m.prompt == "a cat, masterpiece" and m.negative == "ugly, blurry"
    assert m.params == {"Seed": 156680208700286, "Steps": 20, "CFG scale": 8, "Sampler": "euler",
                        "Schedule type": "karras", "Denoising strength": 1, "Size": "512x768", "Clip skip": 2}
    got = [(r.role, r.name, r.weight, r.weight_clip) for r in m.models]
    assert got == [("checkpoint", "SD1.5\\v1-5-pruned-emaonly.safetensors", None, None),
                   ("lora", "add_detail.safetensors", 0.8, 0.6), ("lora", "style/foo.safetensors", 0.5, None),
                   ("vae", "vae-ft-mse-840000-ema-pruned.safetensors", None, None)]


def test_comfyui_workflow_only(tmp_path):
    wf = {"nodes": [
        {"id": 4, "type": "CheckpointLoaderSimple", "widgets_values": ["sdxl/base.safetensors"]},
        {"id": 10, "type": "LoraLoader", "widgets_values": ["detail.safetensors", 0.7, 1.0]},
        {"id": 6, "type": "CLIPTextEncode", "widgets_values": ["a dog"]},
        {"id": 7, "type": "CLIPTextEncode", "widgets_values": ["bad hands"]},
        {"id": 3, "type": "KSampler", "widgets_values": [42, "randomize", 25, 6.5, "dpmpp_2m", "karras", 1],
         "inputs": [{"name": "positive", "link": 1}, {"name": "negative", "link": 2}]},
    ], "links": [[1, 6, 0, 3, 1, "CONDITIONING"], [2, 7, 0, 3, 2, "CONDITIONING"]]}
    m = _png_with(tmp_path, workflow=json.dumps(wf))
    assert m.generator == "comfyui" and (m.prompt, m.negative) == ("a dog", "bad hands")
    assert m.params == {"Seed": 42, "Steps": 25, "CFG scale": 6.5, "Sampler": "dpmpp_2m", "Schedule type": "karras",
                        "Denoising strength": 1}
    assert [(r.role, r.name, r.weight, r.weight_clip) for r in m.models] == [
        ("checkpoint", "sdxl/base.safetensors", None, None), ("lora", "detail.safetensors", 0.7, 1.0)]


def test_comfyui_graph_with_link_cycles(tmp_path):
    graph = {"1": {"class_type": "KSampler", "inputs": {"seed": ["2", 0], "positive": ["2", 0], "steps": 3}},
             "2": {"class_type": "Loop", "inputs": {"value": ["2", 0], "conditioning": ["2", 0]}}}
    m = _png_with(tmp_path, prompt=json.dumps(graph))
    assert m.generator == "comfyui" and m.prompt == "" and m.params == {"Steps": 3}


def test_invokeai(tmp_path):
    d = {"generation_mode": "txt2img", "positive_prompt": "a castle", "negative_prompt": "fog", "width": 768,
         "height": 512, "seed": 7, "cfg_scale": 7.5, "steps": 30, "scheduler": "dpmpp_2m_k", "clip_skip": 0,
         "model": {"key": "k1", "hash": "blake3:" + "ab" * 32, "name": "juggernaut", "base": "sdxl", "type": "main"},
         "vae": {"key": "k2", "hash": "random:xyz", "name": "sdxl-vae"},
         "loras": [{"model": {"key": "k3", "hash": "sha256:" + "cd" * 32, "name": "detail"}, "weight": 0.75},
                   {"lora": {"model_name": "old-style", "base_model": "sd-1"}, "weight": 0.5}],
         "app_version": "4.2.9"}
    m = _png_with(tmp_path, invokeai_metadata=json.dumps(d))
    assert m.generator == "invokeai" and (m.prompt, m.negative) == ("a castle", "fog")
    assert m.params["Size"] == "768x512" and m.params["Seed"] == 7 and m.params["Model"] == "juggernaut"
    assert [(r.role, r.name, r.hashes, r.weight) for r in m.models] == [
        ("checkpoint", "juggernaut", ["blake3:" + "ab" * 32], None), ("vae", "sdxl-vae", [], None),
        ("lora", "detail", ["sha256:" + "cd" * 32], 0.75), ("lora", "old-style", [], 0.5)]


def test_stability_matrix_json_when_no_parameters(tmp_path):
    d = {"PositivePrompt": "a tree", "NegativePrompt": "", "Steps": 12, "Sampler": "euler", "CfgScale": 5, "Seed": 9,
         "Width": 640, "Height": 640, "ModelName": "dreamshaper_8", "ModelHash": "879db523c3"}
    m = _png_with(tmp_path, **{"parameters-json": json.dumps(d)})
    assert m.generator == "stability_matrix" and m.prompt == "a tree" and m.params["Size"] == "640x640"
    assert [(r.role, r.name, r.hashes) for r in m.models] == [("checkpoint", "dreamshaper_8", ["879db523c3"])]
    m = _png_with(tmp_path, parameters=A1111, **{"parameters-json": json.dumps(d)})
    assert m.generator == "a1111" and m.params["Seed"] == "5"  # its A1111 chunk wins


def test_a1111_models_from_every_key(tmp_path):
    hashes = {"model": "6ce0161689", "vae": "735e4c3a44", "lora:add_detail": "7c6bad76eb", "embed:easyneg": "c74b4e810b"}
    res = [{"type": "lora", "weight": 0.8, "modelVersionId": 62833, "modelName": "Detail Tweaker"},
           {"type": "embed", "air": "urn:air:sd1:embedding:civitai:7808@9208"}, "junk", {"type": "lora"}]
    text = (f"p, <lora:add_detail:0.8>, <hypernet:hn:0.3>, <lyco:ly:1.2>\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 2, "
            f"Model hash: 6ce0161689, Model: v1-5, VAE hash: 735e4c3a44, VAE: vae.pt, "
            f'Lora hashes: "add_detail: 7c6bad76eb54", TI hashes: "easyneg: c74b4e810b03", '
            f"Hashes: {json.dumps(hashes)}, Civitai resources: {json.dumps(res)}")
    m = _png_with(tmp_path, parameters=text)
    got = [(r.role, r.name, r.hashes, r.weight, r.version_id) for r in m.models]
    assert got == [
        ("checkpoint", "v1-5", ["6ce0161689"], None, None),
        ("vae", "vae.pt", ["735e4c3a44"], None, None),
        ("lora", "add_detail", ["7c6bad76eb54", "7c6bad76eb"], 0.8, None),
        ("hypernetwork", "hn", [], 0.3, None),
        ("lora", "ly", [], 1.2, None),
        ("embedding", "easyneg", ["c74b4e810b03", "c74b4e810b"], None, None),
        ("lora", None, [], 0.8, 62833),
        ("embedding", None, [], None, 9208),
    ]
    assert m.models[-2].title == "Detail Tweaker"


def test_fifo_does_not_block(tmp_path):
    import os

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(FormatError, match="not a regular file"):
        read_raw(fifo)


def test_many_text_chunks_one_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(metadata, "MAX_TEXTS", 3)
    p = tmp_path / "many.png"
    p.write_bytes(png_bytes([(b"tEXt", f"k{i}\0v".encode()) for i in range(50)]))
    raw = read_raw(p)
    assert sorted(raw.texts) == ["k0", "k1", "k2"] and raw.warnings == ["47 text chunk(s) past the first 3 skipped"]


def test_endless_chunks_and_fill_bytes_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(metadata, "MAX_CHUNKS", 100)
    p = tmp_path / "chunks.png"
    p.write_bytes(png_bytes([(b"zzZz", b"")] * 200))
    with pytest.raises(FormatError, match="more than 100 PNG chunks"):
        read_raw(p)
    p = tmp_path / "fill.jpg"
    p.write_bytes(b"\xff\xd8" + b"\xff" * 70_000 + b"\xd9")
    with pytest.raises(FormatError, match="fill bytes"):
        read_raw(p)
    p.write_bytes(b"\xff\xd8" + b"\xff\xd0" * 200 + b"\xff\xd9")
    with pytest.raises(FormatError, match="more than 100 JPEG segments"):
        read_raw(p)


def test_comfyui_custom_loaders_and_sampler_custom_advanced(tmp_path):
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "fp8"}},
        "2": {"class_type": "Efficient Loader", "inputs": {"ckpt_name": "dreamshaper_8.safetensors",
                                                           "vae_name": "Baked VAE", "lora_name": "None"}},
        "3": {"class_type": "Power Lora Loader (rgthree)", "inputs": {
            "lora_1": {"on": True, "lora": "flux/realism.safetensors", "strength": 0.9},
            "lora_2": {"on": False, "lora": "off.safetensors", "strength": 1},
            "➕ Add Lora": ""}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a misty forest", "clip": ["3", 1]}},
        "13": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["25", 0], "guider": ["22", 0],
                                                                 "sampler": ["16", 0], "sigmas": ["17", 0],
                                                                 "latent_image": ["27", 0]}},
        "16": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "17": {"class_type": "BasicScheduler", "inputs": {"scheduler": "simple", "steps": 28, "denoise": 1}},
        "22": {"class_type": "BasicGuider", "inputs": {"model": ["1", 0], "conditioning": ["26", 0]}},
        "25": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1234}},
        "26": {"class_type": "FluxGuidance", "inputs": {"guidance": 3.5, "conditioning": ["6", 0]}},
        "27": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 768, "batch_size": 1}},
    }
    m = _png_with(tmp_path, prompt=json.dumps(graph))
    assert m.prompt == "a misty forest" and m.negative == ""
    assert m.params == {"Steps": 28, "Sampler": "euler", "Schedule type": "simple", "Guidance": 3.5, "Seed": 1234,
                        "Denoising strength": 1, "Size": "1024x768"}
    assert [(r.role, r.name, r.weight) for r in m.models] == [
        ("unet", "flux1-dev.safetensors", None), ("checkpoint", "dreamshaper_8.safetensors", None),
        ("lora", "flux/realism.safetensors", 0.9)]


def test_a_huge_or_second_ihdr_is_refused_unread(tmp_path):
    ok = png_bytes([(b"tEXt", b"parameters\0" + A1111.encode())])
    huge = ok[:8] + struct.pack(">I", 0x7FFFFFF0) + b"IHDR" + b"\0" * 64  # claims 2 GiB: never read
    p = tmp_path / "h.png"
    for data in (huge, ok[:33] + ok[8:33] + ok[33:]):
        p.write_bytes(data)
        with pytest.raises(FormatError, match="damaged PNG|truncated PNG"):
            read_raw(p)


def test_fooocus_scheme_and_novelai(tmp_path):
    d = {"prompt": "a fox", "negative_prompt": "blur", "styles": "['Fooocus V2']", "performance": "Speed",
         "steps": 30, "resolution": "(1152, 896)", "guidance_scale": 4, "sampler": "dpmpp_2m_sde_gpu",
         "scheduler": "karras", "base_model": "juggernautXL_v8Rundiffusion.safetensors",
         "base_model_hash": "aeb7e9e689", "refiner_model": "None", "vae": "Default (model)",
         "lora_combined_1": "sd_xl_offset_example-lora_1.0.safetensors : 0.1",
         "lora_combined_2": "detail.safetensors : 4259dc3287 : 0.5", "seed": "12345", "version": "Fooocus v2.5.5"}
    m = _png_with(tmp_path, parameters=json.dumps(d), fooocus_scheme="fooocus")
    assert m.generator == "fooocus" and (m.prompt, m.negative) == ("a fox", "blur")
    assert m.params["Size"] == "1152x896" and m.params["Seed"] == "12345" and m.params["CFG scale"] == 4
    assert [(r.role, r.name, r.hashes, r.weight) for r in m.models] == [
        ("checkpoint", "juggernautXL_v8Rundiffusion.safetensors", ["aeb7e9e689"], None),
        ("lora", "sd_xl_offset_example-lora_1.0.safetensors", [], 0.1),
        ("lora", "detail.safetensors", ["4259dc3287"], 0.5)]
    nai = {"prompt": "1girl, masterpiece", "uc": "lowres", "steps": 28, "scale": 5, "seed": 99, "sampler": "k_euler",
           "width": 832, "height": 1216}
    m = _png_with(tmp_path, Software="NovelAI", Source="NovelAI Diffusion V3 4BDE2A90", Comment=json.dumps(nai))
    assert m.generator == "novelai" and (m.prompt, m.negative) == ("1girl, masterpiece", "lowres")
    assert m.params == {"Steps": 28, "Sampler": "k_euler", "CFG scale": 5, "Seed": 99, "Size": "832x1216",
                        "Model": "NovelAI Diffusion V3 4BDE2A90"}
    assert m.models == []
