"""``ckptlab lora info``: every fact checked against what the sample specs say, counted by hand or read from the
file's keys with the safetensors library (never with ckptlab's own LoRA reader)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from fakes.sample_files import make_model
from safetensors import safe_open
from safetensors.torch import save_file

from ckptlab.errors import CkptlabError
from ckptlab.lora.info import MAX_TAGS, info, trigger_words

# The SD1 UNet's cross-attention transformers sit in these LDM blocks (SD1 layout: attentions in levels 0-2 of
# the down path, the middle block, levels 1-3 of the up path), one transformer of depth 1 each: 10 linears
# (attn1/attn2 q, k, v, out; ff.net.0.proj, ff.net.2) + proj_in + proj_out = 12 kohya modules per block.
SD1_ATTN_BLOCKS = ["IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID"] + [f"OUT{i:02d}" for i in range(3, 12)]


def _keys(path: Path) -> dict[str, tuple]:
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _alphas(path: Path) -> set[float]:
    with safe_open(str(path), "pt") as f:
        return {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}


def _data_sha256(path: Path) -> str:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return hashlib.sha256(raw[8 + n:]).hexdigest()


def test_sd1_kohya_lora(tmp_path):
    p = make_model(tmp_path / "sd1.safetensors", "sd1_kohya_lora")
    keys = _keys(p)
    r = info(p)
    assert r.kind == "lora" and r.styles == {"kohya": 264} and r.algos == {"lora": 264} and r.modules == 264
    # adapters.md §1.1: 192 UNet (16 Transformer2D x 12) + 72 TE (12 layers x 6); the small sample keeps them
    assert r.components == {"unet": 16 * 12, "te1": 12 * 6}
    assert sum(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys) == 192
    assert r.text_encoders == {"te1": "CLIP-L"}
    assert r.blocks == dict.fromkeys(SD1_ATTN_BLOCKS, 12)
    assert r.family == "sd1" and r.family_from["ss_base_model_version"] == "sd1" and r.family_note is None
    # sample: rank 4 (RANK_SMALL); alphas read with safetensors
    assert _alphas(p) == {2.0}
    assert (r.rank, r.alpha, r.ranks, r.alphas, r.scales) == (4, 2, {"4": 264}, {"2": 264}, {"0.5": 264})
    assert r.conv_modules == 0 and r.unmatched == [] and r.unmatched_total == 0
    assert r.hash_check == "absent" and r.triggers == []
    assert r.training["ss_network_dim"] == "4" and r.training["ss_network_alpha"] == "2.0"


def test_sdxl_kohya_lora_blocks_and_text_encoders(tmp_path):
    p = make_model(tmp_path / "sdxl.safetensors", "sdxl_kohya_lora")
    r = info(p)
    # adapters.md §1.1: UNet 722 (70 transformer blocks x 10 + 11 Transformer2D x 2), TE1 72 + TE2 192 = 986
    assert r.components == {"unet": 722, "te1": 72, "te2": 192} and r.modules == 986
    assert r.text_encoders == {"te1": "CLIP-L", "te2": "CLIP-G"}
    # SDXL: depth 2 in IN04/IN05/OUT03-05, depth 10 in IN07/IN08/MID/OUT00-02: 10 per block + proj_in/out
    two, ten = 2 * 10 + 2, 10 * 10 + 2
    assert r.blocks == {"IN04": two, "IN05": two, "IN07": ten, "IN08": ten, "MID": ten, "OUT00": ten,
                        "OUT01": ten, "OUT02": ten, "OUT03": two, "OUT04": two, "OUT05": two}
    assert r.family == "sdxl" and r.unmatched == []


def test_sd2_kohya_lora_openclip(tmp_path):
    r = info(make_model(tmp_path / "sd2.safetensors", "sd2_kohya_lora"))
    # SD2 TE: 23 used OpenCLIP-H layers x 6 = 138 (adapters.md §1.1), UNet as SD1
    assert r.components == {"unet": 192, "te1": 138} and r.text_encoders == {"te1": "OpenCLIP-H"}
    assert r.family == "sd2" and r.unmatched == []


@pytest.mark.parametrize("spec", ["sd1_kohya_lora", "sdxl_kohya_lora"])
def test_full_size_names_all_match_the_reference_layout(tmp_path, spec):
    """Full-size module names (rank 1 so the file stays small): the counts of adapters.md §1.1 and no
    unmatched module."""
    from ckptlab.sample.layouts import keys

    tensors = {}
    for k, (_, shape) in keys(spec, small=False).items():
        if k.endswith(".alpha"):
            tensors[k] = torch.tensor(1.0, dtype=torch.float16)
        elif k.endswith(".lora_down.weight"):
            tensors[k] = torch.zeros((1, *shape[1:]), dtype=torch.float16)
        else:
            tensors[k] = torch.zeros((shape[0], 1, *shape[2:]), dtype=torch.float16)
    base = {"sd1_kohya_lora": "sd_v1", "sdxl_kohya_lora": "sdxl_base_v1-0"}[spec]
    p = tmp_path / "full.safetensors"
    save_file(tensors, str(p), metadata={"ss_base_model_version": base})
    r = info(p)
    want = {"sd1_kohya_lora": {"unet": 192, "te1": 72}, "sdxl_kohya_lora": {"unet": 722, "te1": 72, "te2": 192}}
    assert r.components == want[spec] and r.unmatched == [] and r.rank == 1 and r.alpha == 1


def test_peft_lora_no_alpha_means_scale_one(tmp_path):
    p = make_model(tmp_path / "peft.safetensors", "sd1_peft_lora",
                   metadata={"modelspec.architecture": "stable-diffusion-v1/lora"})
    r = info(p)
    # attention projections only: 16 transformers x 2 attentions x 4 (q, k, v, out) and 12 TE layers x 4
    assert r.styles == {"peft": 16 * 8 + 12 * 4} and r.components == {"unet": 128, "te1": 48}
    assert r.alpha is None and r.alphas == {"none": 176} and r.scales == {"1": 176}
    assert r.unmatched == [] and r.family_from["modelspec.architecture"] == "sd1"


@pytest.mark.parametrize(("spec", "algos", "rank"), [
    ("sd1_loha", {"loha": 264}, 4),
    ("sd1_lokr", {"lokr": 264}, None),  # both factors full: no rank, scale 1 (adapters.md §4)
    ("sd1_dora", {"dora": 264}, 4),
    ("sd1_oft", {"oft": 264}, None),
    ("sd1_glora", {"glora": 160 + 72}, None),  # GLoRA targets Linear layers: SD1 proj_in/out are 1x1 convs
])
def test_lycoris_algorithms(tmp_path, spec, algos, rank):
    p = make_model(tmp_path / f"{spec}.safetensors", spec, metadata={"ss_base_model_version": "sd_v1"})
    r = info(p)
    assert r.algos == algos and r.rank == rank and r.unmatched == []
    if spec == "sd1_lokr":
        assert r.scales == {"1": 264}


def test_locon_conv_modules(tmp_path):
    p = make_model(tmp_path / "locon.safetensors", "sd1_locon")
    keys = _keys(p)
    conv3 = {k for k, s in keys.items() if k.endswith(".lora_down.weight") and len(s) == 4 and s[2:] == (3, 3)}
    # by hand: 22 resnets (down 4x2, mid 2, up 4x3) x conv1/conv2 + 3 downsamplers + 3 upsamplers = 50
    assert len(conv3) == 50
    r = info(p)
    assert r.conv_modules == 50 and r.algos["locon"] == 50 and r.modules == len(
        [k for k in keys if k.endswith(".lora_down.weight")])
    assert r.unmatched == []


@pytest.mark.parametrize(("spec", "style", "double", "single"), [
    ("flux_kohya_lora", "kohya", 10, 3),  # img/txt x (attn_qkv, attn_proj, mlp_0, mlp_2, mod_lin); linear1/2 + mod
    ("flux_diffusers_lora", "peft", 8, 5),  # to_q/k/v/out.0 + add_q/k/v_proj + to_add_out; q/k/v + proj_mlp/out
    ("flux_xlabs_lora", "xlabs", 4, 0),  # qkv_lora1/2 + proj_lora1/2, double blocks only
])
def test_flux_blocks(tmp_path, spec, style, double, single):
    r = info(make_model(tmp_path / f"{spec}.safetensors", spec))
    # Flux.1: 19 double blocks and 38 single blocks
    want = {f"double {i}": double for i in range(19)} | ({f"single {i}": single for i in range(38)} if single else {})
    assert r.family == "flux" and r.styles == {style: 19 * double + 38 * single}
    assert r.blocks == want and r.components == {"dit": 19 * double + 38 * single}


# -- crafted metadata ---------------------------------------------------------------------------------------
_MOD = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
_TE_MOD = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def _crafted(path: Path, metadata: dict, extra: dict | None = None) -> Path:
    g = torch.Generator().manual_seed(0)
    t = {}
    for m, (o, i, r, a) in {_MOD: (320, 320, 8, 4.0), _TE_MOD: (768, 768, 16, 16.0)}.items():
        t[f"{m}.lora_down.weight"] = torch.randn(r, i, generator=g)
        t[f"{m}.lora_up.weight"] = torch.randn(o, r, generator=g)
        t[f"{m}.alpha"] = torch.tensor(a)
    t.update(extra or {})
    save_file(t, str(path), metadata=metadata)
    return path


TAGS = {"5_alice": {"alice": 10, " 1girl": 8, "smile ": 3, "": 99, "solo": 8},
        "3_bob woman": {"1girl": 4, "solo": 2, "Smile": 2, "outdoors": 1}}
DIRS = {"5_alice": {"n_repeats": 5, "img_count": 10}, "3_bob woman": {"n_repeats": 3, "img_count": 30},
        "reg": {"n_repeats": 1, "img_count": 5}}
META = {"ss_tag_frequency": json.dumps(TAGS), "ss_dataset_dirs": json.dumps(DIRS), "ss_output_name": "alice_v2",
        "ss_base_model_version": "sd_v1", "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors",
        "ss_num_epochs": "10", "ss_epoch": "10", "ss_steps": "1500", "ss_max_train_steps": "1500",
        "ss_resolution": "(512, 512)", "ss_optimizer": "bitsandbytes.optim.adamw.AdamW8bit",
        "ss_learning_rate": "0.0001", "ss_unet_lr": "0.0001", "ss_text_encoder_lr": "5e-05",
        "ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic", "ss_num_train_images": "140",
        "ss_num_reg_images": "5", "ss_training_started_at": "1700000000", "ss_training_finished_at": "1700003600",
        "ss_training_comment": "trained on alice"}


def test_crafted_metadata_training_summary_and_trigger_ranking(tmp_path):
    p = _crafted(tmp_path / "alice.safetensors", META)
    r = info(p)
    # by hand: folder tokens by images x repeats (bob woman 90 > alice 50), then the output name, then the
    # tags by their total over both datasets, case-folded and stripped: 1girl 8+4, solo 8+2, smile 3+2,
    # outdoors 1 ("alice" 10 is already a folder token; the empty tag is dropped)
    assert [t.word for t in r.triggers] == ["bob woman", "alice", "alice_v2", "1girl", "solo", "smile", "outdoors"]
    by = {t.word: t for t in r.triggers}
    assert by["alice"].sources == ["dataset folder", "tag frequency"] and by["alice"].count == 10
    assert by["1girl"].count == 12 and by["smile"].count == 5 and by["bob woman"].sources == ["dataset folder"]
    assert by["alice_v2"].sources == ["output name"]
    # rank / alpha per module: 8 / 4 and 16 / 16
    assert (r.rank, r.alpha) == ("Dynamic", "Dynamic")
    assert r.ranks == {"8": 1, "16": 1} and r.alphas == {"4": 1, "16": 1} and r.scales == {"0.5": 1, "1": 1}
    assert list(r.components.items()) == [("unet", 1), ("te1", 1)] and r.blocks == {"IN01": 1}
    t = r.training
    assert t["ss_training_started_at"] == "2023-11-14 22:13:20 UTC"  # 1,700,000,000 s after the epoch
    assert t["ss_training_finished_at"] == "2023-11-14 23:13:20 UTC"
    for k in ("ss_num_epochs", "ss_steps", "ss_resolution", "ss_optimizer", "ss_learning_rate", "ss_unet_lr",
              "ss_text_encoder_lr", "ss_num_train_images", "ss_num_reg_images", "ss_sd_model_name",
              "ss_training_comment", "ss_output_name"):
        assert t[k] == META[k]
    assert r.datasets[1] == {"folder": "3_bob woman", "n_repeats": 3, "img_count": 30, "token": "bob woman"}
    assert r.datasets[2]["token"] is None  # "reg": no <repeats>_ prefix
    assert r.base_model == {"ss_base_model_version": "sd_v1", "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors"}


def test_family_disagreement_is_said(tmp_path):
    p = _crafted(tmp_path / "x.safetensors", {"ss_base_model_version": "sd_v1",
                                              "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"})
    r = info(p)
    assert r.family_from["ss_base_model_version"] == "sd1" and r.family_from["modelspec.architecture"] == "sdxl"
    assert r.family_note and "SD1" in r.family_note and "SDXL" in r.family_note
    # this file's names are SD1's: under the SDXL reference layout both are unmatched, and said so
    assert r.family == "sdxl" and r.unmatched_total == 2


def test_sshs_model_hash_matches_wrong_absent(tmp_path):
    p = _crafted(tmp_path / "h.safetensors", {"ss_output_name": "x"})
    digest = _data_sha256(p)
    assert info(p).hash_check == "absent"
    # the hash lives in the header: the tensor bytes (what it covers) do not change when it is written
    p = _crafted(tmp_path / "h.safetensors", {"sshs_model_hash": digest})
    assert _data_sha256(p) == digest and info(p).hash_check == "matches"
    p = _crafted(tmp_path / "h.safetensors", {"sshs_model_hash": digest.upper()})
    assert info(p).hash_check == "matches"
    wrong = hashlib.sha256(b"other").hexdigest()
    p = _crafted(tmp_path / "h.safetensors", {"sshs_model_hash": wrong})
    assert info(p).hash_check.startswith("does not match (") and wrong[:12] in info(p).hash_check
    p = _crafted(tmp_path / "h.safetensors", {"sshs_model_hash": "0x" + wrong})
    assert "LyCORIS" in info(p).hash_check
    p = _crafted(tmp_path / "h.safetensors", {"sshs_model_hash": "not a hash"})
    assert info(p).hash_check == "does not match (the metadata value is no SHA-256 (10 characters))"


def test_hash_of_a_file_written_by_the_lora_writer_matches(tmp_path):
    """``lora.write.write_lora`` puts the hash of the bytes it writes: info agrees."""
    from ckptlab.formats import open_model
    from ckptlab.lora.write import lora_metadata, write_lora
    from ckptlab.ops.stream import Out

    src = _crafted(tmp_path / "in.safetensors", {})
    out = tmp_path / "out.safetensors"
    with open_model(src) as source:
        items = [Out.copy(k, source) for k in source.infos()]
        write_lora(out, items, lora_metadata("sd1", [(8, 4.0), (16, 16.0)], title="t"), operation="test",
                   inputs=[src])
    meta = json.loads(out.read_bytes()[8:8 + struct.unpack("<Q", out.read_bytes()[:8])[0]])["__metadata__"]
    assert meta["sshs_model_hash"] == _data_sha256(out)
    assert info(out).hash_check == "matches"


# -- hostile metadata ---------------------------------------------------------------------------------------
def test_ten_megabyte_tag_json_is_bounded(tmp_path):
    n = 400_000
    tags = {"1_big": {f"tag_{i:07d}_padding": (i % 97) + 1 for i in range(n)}}
    text = json.dumps(tags)
    assert len(text) > 10_000_000
    notes: list[str] = []
    words = trigger_words({"ss_tag_frequency": text}, notes=notes)
    # the visit stops after MAX_TAGS entries: among tag_0000000..tag_0199999 the count 97 falls on i % 97 == 96,
    # first at i = 96; ties in alphabetical order
    assert len(words) == 20 and words[0].word == "tag_0000096_padding" and words[0].count == 97
    assert any(f"more than {MAX_TAGS:,} tags" in x for x in notes)
    p = _crafted(tmp_path / "big.safetensors", {"ss_tag_frequency": text})
    assert info(p).triggers[0].word == "tag_0000096_padding"


@pytest.mark.parametrize(("value", "note"), [
    ("not json {", "not valid JSON"),
    ("[1, 2, 3]", "not a JSON object of datasets"),
    ('{"a": [1, 2], "b": "x"}', "2 dataset(s) not a JSON object"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ('"just a string"', "not a JSON object"),
])
def test_malformed_tag_frequency_becomes_a_note(tmp_path, value, note):
    p = _crafted(tmp_path / "bad.safetensors", {"ss_tag_frequency": value, "ss_dataset_dirs": "5",
                                                "ss_output_name": "last", "ss_training_started_at": "yesterday"})
    r = info(p)
    assert r.triggers == []  # "last" is kohya's default output name, no token
    assert any(note in n for n in r.trigger_notes), r.trigger_notes
    assert any("ss_dataset_dirs" in n for n in r.trigger_notes)
    assert r.training["ss_training_started_at"] == "yesterday"


def test_wrong_types_inside_the_tag_json():
    words = trigger_words({"ss_tag_frequency": {"d": {"x": "many", "y": True, "z": 3, "w": -2, "v": 2.0,
                                                      "u": None, "long" * 30: 9}}})
    assert [(t.word, t.count) for t in words] == [("z", 3), ("v", 2)]


def test_cli_human_and_json(tmp_path, cli):
    p = _crafted(tmp_path / "alice.safetensors", META | {"ss_tag_frequency": json.dumps(
        {"1_x": {"\x1b[2Jevil": 50}})})
    r = cli("lora", "info", p)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\\x1b[2Jevil" in r.stdout
    assert "trigger words: " in r.stdout and "rank: Dynamic (8 ×1, 16 ×1)" in r.stdout
    assert "sshs_model_hash: absent" in r.stdout and "blocks: IN01 ×1" in r.stdout
    d = json.loads(cli("lora", "info", p, "--json").stdout)
    assert [t["word"] for t in d["triggers"]] == ["bob woman", "alice", "alice_v2", "\x1b[2Jevil"]
    assert d["triggers"][3] == {"word": "\x1b[2Jevil", "count": 50, "sources": ["tag frequency"]}
    assert len(d["module_list"]) == 2 and d["hash_check"] == "absent"


@pytest.mark.parametrize("what", ["missing", "checkpoint", "garbage"])
def test_cli_bad_input_is_one_line(tmp_path, cli, what):
    p = tmp_path / "x.safetensors"
    if what == "checkpoint":
        make_model(p, "sd1_checkpoint")
    elif what == "garbage":
        p.write_bytes(b"\x00" * 100)
    r = cli("lora", "info", p)
    assert r.returncode not in (0, 70) and r.stderr.startswith("ckptlab: error: ")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_not_a_lora_raises_a_ckptlab_error(tmp_path):
    with pytest.raises(CkptlabError):
        info(make_model(tmp_path / "c.safetensors", "sd1_checkpoint"))


def test_alpha_zero_and_stated_dim_disagreeing_are_warned(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = {f"{_MOD}.lora_down.weight": torch.randn(8, 320, generator=g),
         f"{_MOD}.lora_up.weight": torch.randn(320, 8, generator=g), f"{_MOD}.alpha": torch.tensor(0.0)}
    p = tmp_path / "z.safetensors"
    save_file(t, str(p), metadata={"ss_network_dim": "16", "ss_network_alpha": "0"})
    r = info(p)
    assert r.scales == {"0": 1}  # alpha 0 is scale 0, as A1111 and ComfyUI load it (LoraFile.scale)
    assert any("alpha 0" in w for w in r.warnings)
    assert any(w == "ss_network_dim says '16' but the modules' rank is 8" for w in r.warnings)
    assert not any(w.startswith("ss_network_alpha") for w in r.warnings)


def test_pickled_lora_is_read_and_its_hash_not_checked(tmp_path):
    p = make_model(tmp_path / "sd1.pt", "sd1_kohya_lora", fmt="pt")
    r = info(p)
    assert r.components == {"unet": 192, "te1": 72} and r.rank == 4
    assert r.hash_check == "absent"
    from ckptlab.lora.info import check_model_hash

    assert check_model_hash(p, "ab" * 32) == "not checked (not a safetensors file)"
