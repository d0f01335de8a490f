"""to-diffusers / from-diffusers: exact round trip, and diffusers itself as the oracle.

Oracle: diffusers' own single-file converter (``from_single_file`` with our folder as the config source)
must produce exactly the weights that ``from_pretrained`` loads from the folder we wrote - every tensor of
UNet, VAE and text encoder(s), which covers the UNet block mapping, the VAE attention reshape, the
OpenCLIP fused-qkv split and the bigG ``text_projection`` transpose.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from fakes.sample_files import load, make_model, sha256

from ckptlab.errors import MismatchError, OutputError
from ckptlab.ops.diffusers_io import EXTRA_FILE, from_diffusers, to_diffusers

diffusers = pytest.importorskip("diffusers")

PIPELINES = {"sd1_checkpoint": "StableDiffusionPipeline", "sd2_checkpoint": "StableDiffusionPipeline",
             "sdxl_checkpoint": "StableDiffusionXLPipeline"}


@pytest.mark.parametrize("spec", ["sd1_checkpoint", "sd2_checkpoint", "sdxl_checkpoint", "sdxl_refiner"])
def test_round_trip_is_exact(tmp_path, spec):
    src = make_model(tmp_path / f"{spec}.safetensors", spec)
    before = sha256(src)
    r = to_diffusers(src, tmp_path / "dir")
    assert r.family == spec.split("_checkpoint")[0]
    back = from_diffusers(tmp_path / "dir", tmp_path / "back.safetensors")
    assert back.output.is_file()
    a, b = load(src), load(tmp_path / "back.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert sha256(src) == before


@pytest.mark.parametrize("spec", list(PIPELINES))
def test_diffusers_loads_folder_and_agrees_with_its_own_converter(tmp_path, spec):
    src = make_model(tmp_path / f"{spec}.safetensors", spec)
    out = tmp_path / "pipe"
    to_diffusers(src, out)
    cls = getattr(diffusers, PIPELINES[spec])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = cls.from_pretrained(str(out), local_files_only=True)
    # the scheduler config is complete: no "has not set the configuration `clip_sample`" (or steps_offset)
    # deprecation from the pipeline
    assert not [str(w.message) for w in caught if "clip_sample" in str(w.message) or "steps_offset" in str(w.message)]
    theirs = cls.from_single_file(str(src), config=str(out), local_files_only=True)
    comps = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if spec.startswith("sdxl") else [])
    for comp in comps:
        sa, sb = getattr(ours, comp).state_dict(), getattr(theirs, comp).state_dict()
        assert set(sa) == set(sb), comp
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (comp, k)
    # and a weight compared directly with the single file
    sd = load(src)
    assert torch.equal(ours.unet.state_dict()["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"],
                       sd["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"])
    assert torch.equal(ours.vae.state_dict()["decoder.mid_block.attentions.0.to_q.weight"],
                       sd["first_stage_model.decoder.mid.attn_1.q.weight"][:, :, 0, 0])


def test_folder_contents_and_tokenizer(tmp_path):
    src = make_model(tmp_path / "x.safetensors", "sdxl_checkpoint")
    out = tmp_path / "pipe"
    to_diffusers(src, out)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    for f in ("unet/config.json", "vae/config.json", "text_encoder/config.json", "text_encoder_2/config.json",
              "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
              "tokenizer_2/special_tokens_map.json", "unet/diffusion_pytorch_model.safetensors", EXTRA_FILE):
        assert (out / f).is_file(), f
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(out / "tokenizer"))
    # token ids of OpenAI CLIP's BPE for this prompt (bos, a, photo, of, an, astronaut, riding, a, horse, eos)
    assert tok("a photo of an astronaut riding a horse").input_ids == [49406, 320, 1125, 539, 550, 18376, 6765,
                                                                        320, 4558, 49407]
    tok2 = CLIPTokenizer.from_pretrained(str(out / "tokenizer_2"))
    assert tok2.pad_token == "!"  # OpenCLIP pads with id 0
    assert json.loads((out / "vae/config.json").read_text())["scaling_factor"] == 0.13025
    meta = diffusers.__name__ and __import__("safetensors").safe_open(
        str(out / "unet/diffusion_pytorch_model.safetensors"), "pt").metadata()
    assert json.loads(meta["ckptlab.inputs"])[0]["sha256"] == sha256(src)


def test_sd2_v_prediction_from_metadata(tmp_path):
    src = make_model(tmp_path / "v.safetensors", "sd2_768_v")
    to_diffusers(src, tmp_path / "pipe")
    sched = json.loads((tmp_path / "pipe/scheduler/scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    assert json.loads((tmp_path / "pipe/unet/config.json").read_text())["sample_size"] == 96


def test_ema_use_puts_ema_weights_in_unet(tmp_path):
    src = make_model(tmp_path / "e.safetensors", "sd1_checkpoint", ema=True)
    to_diffusers(src, tmp_path / "pipe", ema="use")
    unet = load(tmp_path / "pipe/unet/diffusion_pytorch_model.safetensors")
    sd = load(src)
    assert torch.equal(unet["conv_in.weight"], sd["model_ema.diffusion_modelinput_blocks00weight"])
    assert not torch.equal(unet["conv_in.weight"], sd["model.diffusion_model.input_blocks.0.0.weight"])


def test_wrong_family_refused(tmp_path):
    src = make_model(tmp_path / "flux.safetensors", "flux_dev")
    with pytest.raises(MismatchError, match="supports SD1, SD2 and SDXL"):
        to_diffusers(src, tmp_path / "pipe")
    assert not (tmp_path / "pipe").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["flux.safetensors"]


def test_missing_component_refused(tmp_path):
    from ckptlab.formats.writer import write_safetensors

    full = load(make_model(tmp_path / "full.safetensors", "sd1_checkpoint"))
    no_vae = {k: v for k, v in full.items() if not k.startswith("first_stage_model.")}
    src = write_safetensors(tmp_path / "novae.safetensors", no_vae)
    with pytest.raises(MismatchError, match="missing component: VAE"):
        to_diffusers(src, tmp_path / "pipe")
    assert not (tmp_path / "pipe").exists()


def test_existing_target_refused_and_dry_run_writes_nothing(tmp_path):
    src = make_model(tmp_path / "a.safetensors", "sd1_checkpoint")
    (tmp_path / "pipe").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        to_diffusers(src, tmp_path / "pipe")
    r = to_diffusers(src, tmp_path / "other", dry_run=True)
    assert r.dry_run and not (tmp_path / "other").exists()
    assert r.files["unet/diffusion_pytorch_model.safetensors"] == 686


@pytest.mark.parametrize("where", ["its-folder", "dot", "parent", "inside", "symlink-to-folder"])
def test_output_folder_holding_the_input_refused(tmp_path, monkeypatch, where):
    """An output folder that is, contains or is inside the input is refused (even with --overwrite)
    before anything is written; the input and its folder stay as they were."""
    d = tmp_path / "d"
    d.mkdir()
    src = make_model(d / "m.safetensors", "sd1_checkpoint")
    before = sha256(src)
    monkeypatch.chdir(d)
    out = {"its-folder": d, "dot": Path("."), "parent": tmp_path, "inside": src / "pipe",
           "symlink-to-folder": tmp_path / "link"}[where]
    if where == "symlink-to-folder":
        out.symlink_to(d, target_is_directory=True)
    listing = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(OutputError, match="would replace or contain the input m.safetensors"):
        to_diffusers(src, out, overwrite=True)
    assert sha256(src) == before
    assert sorted(p.name for p in tmp_path.rglob("*")) == listing


def test_from_diffusers_without_extras_reports_sd2_loss(tmp_path):
    src = make_model(tmp_path / "sd2.safetensors", "sd2_checkpoint")
    to_diffusers(src, tmp_path / "pipe")
    (tmp_path / "pipe" / EXTRA_FILE).unlink()  # a folder made by another tool has no extras
    r = from_diffusers(tmp_path / "pipe", tmp_path / "back.safetensors")
    assert any("23 of 24 layers" in w for w in r.warnings)
    back = load(tmp_path / "back.safetensors")
    sd = load(src)
    assert "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight" in back
    assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" not in back
    for k in back:
        assert torch.equal(back[k], sd[k]), k


def test_cli_round_trip(tmp_path, cli):
    src = make_model(tmp_path / "m.safetensors", "sd1_checkpoint")
    r = cli("to-diffusers", src, "-o", tmp_path / "pipe", "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.splitlines()[0])
    assert rec["family"] == "sd1" and rec["output"] == str(tmp_path / "pipe")
    r = cli("from-diffusers", tmp_path / "pipe", "-o", tmp_path / "back.safetensors")
    assert r.returncode == 0, r.stderr
    assert "back.safetensors" in r.stdout
    a, b = load(src), load(tmp_path / "back.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    r = cli("to-diffusers", tmp_path / "nope.safetensors", "-o", tmp_path / "x")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "ckptlab: error:" in r.stderr


@pytest.mark.parametrize("spec", ["sd1_checkpoint", "sd2_768_v", "sdxl_checkpoint", "sdxl_refiner"])
def test_real_size_configs_match_diffusers_models(tmp_path, spec):
    """Real widths, header only: a sparse real-size file is planned, and diffusers/transformers models built
    (on the meta device) from our configs must have exactly the planned keys and shapes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ckptlab.formats import open_model
    from ckptlab.ops.diffusers_io import plan_to_diffusers
    from ckptlab.sample.build import write_model

    path = write_model(tmp_path / "real.safetensors", spec, small=False, sparse=True, dtype="F16")
    with open_model(path) as src:
        fam, files, configs, warnings, _ = plan_to_diffusers(src)
    assert not warnings

    def shapes(model):
        return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}

    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel.from_config(configs["unet/config.json"]),
                  "vae": AutoencoderKL.from_config(configs["vae/config.json"])}
        for folder in ("text_encoder", "text_encoder_2"):
            if f"{folder}/config.json" in configs:
                cfg = CLIPTextConfig(**{k: v for k, v in configs[f"{folder}/config.json"].items()
                                        if k not in ("architectures", "model_type", "transformers_version")})
                cls = CLIPTextModelWithProjection if folder == "text_encoder_2" else CLIPTextModel
                models[folder] = cls(cfg)
    for comp, model in models.items():
        rel = f"{comp}/{'model' if comp.startswith('text') else 'diffusion_pytorch_model'}.safetensors"
        planned = {it.key: it.info.shape for it in files[rel]}
        want = shapes(model)
        if not any(k.startswith("text_model.") for k in want):  # transformers >= 5.6 flattened CLIPTextModel
            planned = {k.removeprefix("text_model."): v for k, v in planned.items()}
        assert planned == want, (comp, set(planned) ^ set(want))
    if spec == "sdxl_checkpoint":
        assert configs["unet/config.json"]["addition_time_embed_dim"] == 256
        assert configs["unet/config.json"]["projection_class_embeddings_input_dim"] == 2816
        assert configs["text_encoder_2/config.json"]["num_attention_heads"] == 20
    if spec == "sd2_768_v":
        assert configs["text_encoder/config.json"]["num_hidden_layers"] == 23
        assert configs["unet/config.json"]["attention_head_dim"] == [5, 10, 20, 20]


def test_to_diffusers_fp16_loads_and_equals_torch_cast(tmp_path, cli):
    src = make_model(tmp_path / "m.safetensors", "sd1_checkpoint")
    r = cli("to-diffusers", src, "-o", tmp_path / "pipe", "--precision", "fp16")
    assert r.returncode == 0, r.stderr
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), local_files_only=True,
                                                             dtype=torch.float16)
    sd = load(src)
    w = pipe.unet.state_dict()["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    assert w.dtype == torch.float16
    assert torch.equal(w, sd["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"].half())
    vae = load(tmp_path / "pipe/vae/diffusion_pytorch_model.safetensors")
    assert vae["decoder.conv_in.weight"].dtype == torch.float32  # VAE left as it was


def test_from_diffusers_reads_a_folder_saved_by_diffusers(tmp_path):
    src = make_model(tmp_path / "xl.safetensors", "sdxl_checkpoint")
    to_diffusers(src, tmp_path / "ours")
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "ours"), local_files_only=True)
    pipe.save_pretrained(str(tmp_path / "theirs"))  # written by diffusers/transformers, no ckptlab extras
    r = from_diffusers(tmp_path / "theirs", tmp_path / "back.safetensors")
    back, sd = load(r.output), load(src)
    lost = set(sd) - set(back)
    # only what diffusers has no place for: logit_scale (and position_ids if transformers did not save it)
    assert "conditioner.embedders.1.model.logit_scale" in lost
    assert lost <= {"conditioner.embedders.1.model.logit_scale",
                    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"}
    for k in back:
        assert torch.equal(back[k], sd[k]), k


@pytest.mark.parametrize("command", ["to-diffusers", "from-diffusers"])
def test_empty_folder_is_an_error_not_a_silent_success(tmp_path, cli, command):
    """Both exited 0 having done nothing when given an empty folder."""
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli(command, empty)
    assert r.returncode == 1, r.stdout
    [line] = r.stderr.splitlines()
    assert line.startswith(f"ckptlab: error: {empty}") and ("no model files" in line or "model_index.json" in line)
    assert r.stdout == "" and list(tmp_path.iterdir()) == [empty] and list(empty.iterdir()) == []


def test_from_diffusers_takes_a_folder_of_pipelines_and_creates_out_dir(tmp_path, cli):
    """A folder holding pipelines converts each; a file, or a folder with no model_index.json anywhere
    directly below it, is one line naming it; --out-dir is created; to-diffusers --out-dir too."""
    src = make_model(tmp_path / "m.safetensors", "sd1_checkpoint")
    r = cli("to-diffusers", src, "--out-dir", tmp_path / "pipes" / "new")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "pipes" / "new" / "m-diffusers" / "model_index.json").is_file()
    r = cli("from-diffusers", tmp_path / "pipes" / "new", "--out-dir", tmp_path / "single" / "new", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["output"] == str(tmp_path / "single" / "new" / "m-diffusers.safetensors")
    a, b = load(src), load(tmp_path / "single" / "new" / "m-diffusers.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    r = cli("from-diffusers", src)
    assert r.returncode == 1 and r.stderr.startswith(f"ckptlab: error: {src}: not a diffusers pipeline folder")
    r = cli("from-diffusers", tmp_path / "pipes" / "new" / "m-diffusers", "-o", tmp_path / "x.ckpt")
    assert r.returncode == 1 and "name it .safetensors" in r.stderr, r.stderr
    assert not (tmp_path / "x.ckpt").exists()
