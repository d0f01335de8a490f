"""Sidecar contents from CivitAI records, checked field by field against the record."""

from __future__ import annotations

import json

from fakes.civitai_server import PNG_1x1

from ckptlab.hub.sidecars import a1111_user_metadata, civitai_info, pick_preview, sd_version, write_sidecars
from ckptlab.library import sidecars as reader

VERSION = {"id": 11, "modelId": 7, "name": "v2", "baseModel": "SDXL 1.0", "trainedWords": ["red hat", "a, b"],
           "description": "<p>notes</p>", "model": {"name": "Hats", "type": "LORA"},
           "images": [{"url": "http://x/1.png", "nsfwLevel": 8, "type": "image"},
                      {"url": "http://x/2.mp4", "nsfwLevel": 1, "type": "video"},
                      {"url": "http://x/3.png", "nsfwLevel": 2, "type": "image"}]}
MODEL = {"id": 7, "name": "Hats", "type": "LORA", "description": "<p>Hat <b>LoRA</b></p><p>Use it.</p>",
         "tags": ["hat"], "creator": {"username": "milliner"}, "allowCommercialUse": ["Image"]}


def test_civitai_info_merges_model_fields():
    info = civitai_info(VERSION, MODEL)
    assert info["id"] == 11 and info["creator"] == {"username": "milliner"}
    assert info["model"] == {"name": "Hats", "type": "LORA", "description": MODEL["description"], "tags": ["hat"],
                             "allowCommercialUse": ["Image"]}
    assert "creator" not in VERSION  # inputs untouched


def test_a1111_metadata_and_sd_version():
    meta = a1111_user_metadata(VERSION, MODEL)
    assert meta["activation text"] == "red hat || a, b"  # a word holding a comma switches the joiner
    assert meta["sd version"] == "SDXL" and meta["preferred weight"] == 0
    assert meta["description"] == "Hat LoRA\nUse it."
    assert [sd_version(b) for b in ("SD 1.5", "SD 2.1 768", "Pony", "Flux.1 D", None)] == \
        ["SD1", "SD2", "SDXL", "Unknown", "Unknown"]
    ckpt = a1111_user_metadata({**VERSION, "model": {"type": "Checkpoint"}}, None)
    assert "preferred weight" not in ckpt


def test_preview_rating_filter():
    assert pick_preview(VERSION)["url"] == "http://x/3.png"  # X-rated and video skipped
    assert pick_preview(VERSION, allow_nsfw=True)["url"] == "http://x/1.png"
    assert pick_preview({"images": [{"url": "u", "nsfwLevel": 4}]}) is None


def test_written_sidecars_are_read_back_by_the_library_reader(tmp_path):
    model = tmp_path / "hats.safetensors"
    model.write_bytes(b"x")
    res = write_sidecars(model, VERSION, MODEL, fetch_image=lambda url: PNG_1x1)
    assert res.written == ["hats.civitai.info", "hats.json", "hats.preview.png"]
    back = reader.read(model)
    assert back["files"]["preview"] == "hats.preview.png"
    assert back["civitai"] == {"model_id": 7, "version_id": 11, "from": "hats.civitai.info"}
    assert back["trigger_words"] == ["red hat", "a, b"]
    assert back["json"]["kind"] == "a1111" and back["json"]["activation_text"] == "red hat || a, b"
    # second run: same version refreshes .civitai.info, the user's .json and the preview stay
    (tmp_path / "hats.json").write_text('{"notes": "mine"}')
    res2 = write_sidecars(model, {**VERSION, "name": "v2b"}, MODEL, fetch_image=lambda url: b"unused")
    assert res2.written == ["hats.civitai.info"] and set(res2.kept) == {"hats.json", "hats.preview.png"}
    assert json.loads((tmp_path / "hats.civitai.info").read_text())["name"] == "v2b"
    assert (tmp_path / "hats.json").read_text() == '{"notes": "mine"}'
    # unchanged record: nothing rewritten
    before = (tmp_path / "hats.civitai.info").stat().st_mtime_ns
    res_same = write_sidecars(model, {**VERSION, "name": "v2b"}, MODEL)
    assert res_same.written == [] and (tmp_path / "hats.civitai.info").stat().st_mtime_ns == before
    # a .civitai.info about another version is not ours to replace
    res3 = write_sidecars(model, {**VERSION, "id": 12}, MODEL)
    assert "hats.civitai.info" in res3.kept


def test_non_image_bytes_are_not_saved_as_preview(tmp_path):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"x")
    res = write_sidecars(model, VERSION, MODEL, fetch_image=lambda url: b"<html>error</html>")
    assert not any("preview" in n for n in res.written)
    assert not list(tmp_path.glob("m.preview.*"))
