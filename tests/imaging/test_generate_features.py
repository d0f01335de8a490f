"""Clip skip, LoRA, VAE override, the fp16 "black image", the SDXL refiner, seeds and counts, each against an
independent oracle: diffusers' own pipeline built in the test (``tests/fakes/diffusers_oracle``), a formula
computed here, or ``ckptlab lora bake``'s file."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

import torch  # noqa: E402

import ckptlab.imaging.weights as weights  # noqa: E402
from ckptlab.errors import MismatchError  # noqa: E402
from ckptlab.imaging.render import Session, Settings, generate  # noqa: E402
from tests.fakes.diffusers_oracle import (  # noqa: E402
    max_diff,
    oracle_pipe,
    pixels,
    run_oracle,
    set_scheduler,
    write_config_dir,
)
from tests.fakes.sample_files import make_model  # noqa: E402

SEED = 77
PROMPT = "portrait of an old sailor"
NEG = "lowres"


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd1")
    model = make_model(root / "sd15-test.safetensors", "sd1_checkpoint")
    cfg = write_config_dir(root / "config", "sd1")
    pipe = oracle_pipe(model, cfg, "sd1")
    yield model, cfg, pipe
    del pipe
    gc.collect()


def settings(**kw):
    base = dict(prompt=PROMPT, negative=NEG, seed=SEED, steps=3, cfg=7.0, width=64, height=64, sampler="DPM++ 2M")
    return Settings(**{**base, **kw})


def oracle(pipe, sampler="DPM++ 2M", **kw):
    set_scheduler(pipe, sampler)
    args = dict(prompt=PROMPT, negative=NEG, seed=SEED, steps=3, cfg=7.0, size=(64, 64))
    return run_oracle(pipe, **{**args, **kw})


def no_weight_loads(monkeypatch):
    def fail(*a, **kw):
        raise AssertionError("a weight was loaded before the refusal")

    monkeypatch.setattr(weights, "put", fail)
    monkeypatch.setattr(weights, "value_of", fail)  # every weight read, read-ahead workers included


# -- clip skip ---------------------------------------------------------------------------------------------------
def clip_skip_formula(pipe, text: str, skip: int):
    """A1111's Clip skip N: the hidden state N-1 layers before the last, through the final layer norm
    (transformers' CLIPTextModel, ``output_hidden_states``), computed on the oracle's own text encoder."""
    te, tok = pipe.text_encoder, pipe.tokenizer
    ids = tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = te(ids, output_hidden_states=True)
        inner = getattr(te, "text_model", te)
        return inner.final_layer_norm(out.hidden_states[-skip]) if skip > 1 else out.last_hidden_state


def test_clip_skip_embeddings_image_and_infotext(sd1, tmp_path):
    from PIL import Image

    model, _, pipe = sd1
    seen = []
    with Session(model, device="cpu") as ses:
        unet = ses.loaded.pipe.unet
        hook = unet.register_forward_pre_hook(
            lambda mod, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True)
        ses.render(settings(clip_skip=2, steps=1))
        hook.remove()
    want = clip_skip_formula(pipe, PROMPT, 2)
    # the batch is [negative, prompt] (classifier-free guidance); A1111 skips the layer for both
    assert torch.allclose(seen[0][1:], want, atol=1e-5)
    assert torch.allclose(seen[0][:1], clip_skip_formula(pipe, NEG, 2), atol=1e-5)
    assert not torch.allclose(want, clip_skip_formula(pipe, PROMPT, 1), atol=1e-3)
    # the image: the oracle pipeline fed the formula's embeddings
    set_scheduler(pipe, "DPM++ 2M")
    with torch.inference_mode():
        img = pipe(prompt_embeds=want, negative_prompt_embeds=clip_skip_formula(pipe, NEG, 2), num_inference_steps=3,
                   guidance_scale=7.0, width=64, height=64,
                   generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    r = generate(model, tmp_path / "skip2.png", settings(clip_skip=2), device="cpu")
    assert max_diff(pixels(r.images[0]), np.asarray(img)) <= 1
    assert max_diff(pixels(r.images[0]), oracle(pipe)) > 8  # clip skip 1 is another image
    text = Image.open(r.images[0]).text["parameters"]
    assert ", Clip skip: 2," in text or text.rstrip().endswith("Clip skip: 2")
    r1 = generate(model, tmp_path / "skip1.png", settings(), device="cpu")
    assert "Clip skip" not in Image.open(r1.images[0]).text["parameters"]


# -- LoRA --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("lora") / "detail-tweaker.safetensors", "sd1_kohya_lora")


def test_lora_equals_baked_file_and_diffusers_fused(sd1, lora, tmp_path, cli_in_process):
    model, _, pipe = sd1
    got = pixels(generate(model, tmp_path / "l.png", settings(), loras=[(lora, 0.7)], device="cpu").images[0])
    baked = tmp_path / "baked.safetensors"
    r = cli_in_process("lora", "bake", model, lora, "-s", "0.7", "--precision", "fp32", "-o", baked)
    assert r.returncode == 0, r.stderr
    from_bake = pixels(generate(baked, tmp_path / "b.png", settings(), device="cpu").images[0])
    assert max_diff(got, from_bake) == 0
    # diffusers' own LoRA loader on diffusers' own pipeline (the module's oracle: its weights saved and put back
    # bit for bit after, so the other tests see the plain model)
    pytest.importorskip("peft")
    plain = oracle(pipe)
    saved = {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
             for name in ("unet", "text_encoder")}
    try:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        pipe.fuse_lora(lora_scale=0.7)
        fused = oracle(pipe)
    finally:
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
        for name, sd in saved.items():
            getattr(pipe, name).load_state_dict(sd, strict=True)
    assert max_diff(got, fused) <= 1 and max_diff(plain, fused) > 8


def test_lora_strength_change_in_place_equals_fresh_load(sd1, lora):
    model = sd1[0]
    with Session(model, loras=[(lora, 0.7)], device="cpu") as ses:
        a = pixels(ses.render(settings())[0])
        assert ses.set_lora_strengths([-0.4]) > 0
        b = pixels(ses.render(settings())[0])
        ses.set_lora_strengths([0.7])
        again = pixels(ses.render(settings())[0])
        assert f"{PROMPT} <lora:detail-tweaker:0.7>\n" in ses.infotext(settings(), SEED, (64, 64))
    with Session(model, loras=[(lora, -0.4)], device="cpu") as fresh:
        b_fresh = pixels(fresh.render(settings())[0])
    assert max_diff(a, again) == 0 and max_diff(b, b_fresh) == 0 and max_diff(a, b) > 8


def test_lora_of_another_family_refused_before_any_weight(sd1, tmp_path, monkeypatch):
    xl = make_model(tmp_path / "xl-lora.safetensors", "sdxl_kohya_lora")
    no_weight_loads(monkeypatch)
    with pytest.raises(MismatchError, match="SDXL"):
        generate(sd1[0], tmp_path / "x.png", settings(), loras=[(xl, 1.0)], device="cpu")
    assert not (tmp_path / "x.png").exists()


# -- VAE override ------------------------------------------------------------------------------------------------
def test_vae_override_equals_oracle_with_that_vae(sd1, tmp_path):
    import diffusers

    model, cfg, pipe = sd1  # the module's oracle, its VAE swapped for this test and put back
    vae = make_model(tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors", "sd1_vae", seed=5)
    own = oracle(pipe)
    own_vae = pipe.vae
    pipe.vae = diffusers.AutoencoderKL.from_single_file(str(vae), config=str(cfg), subfolder="vae",
                                                        local_files_only=True, torch_dtype=torch.float32)
    try:
        want = oracle(pipe)
    finally:
        pipe.vae = own_vae
    r = generate(model, tmp_path / "v.png", settings(), vae=vae, device="cpu")
    got = pixels(r.images[0])
    assert max_diff(got, want) <= 1 and max_diff(own, want) > 8
    from PIL import Image

    text = Image.open(r.images[0]).text["parameters"]
    import hashlib

    assert f"VAE hash: {hashlib.sha256(vae.read_bytes()).hexdigest()[:10]}, VAE: {vae.name}" in text


def test_vae_of_another_latent_space_refused_before_any_weight(sd1, tmp_path, monkeypatch):
    xl_vae = make_model(tmp_path / "sdxl_vae.safetensors", "sdxl_vae")
    no_weight_loads(monkeypatch)
    with pytest.raises(MismatchError, match="SDXL"):
        generate(sd1[0], tmp_path / "x.png", settings(), vae=xl_vae, device="cpu")


# -- the fp16 "black image" --------------------------------------------------------------------------------------
def overflowing_vae(path: Path) -> Path:
    """An SD1 VAE whose decoder's first conv has weights up to 60000 (fp16 holds them) but outputs far past fp16's
    65504 (inf), which the next GroupNorm brings back: finite in fp32, NaN in fp16."""
    from safetensors.torch import load_file, save_file

    make_model(path, "sd1_vae", seed=9)
    sd = load_file(str(path))
    w = sd["decoder.conv_in.weight"]
    sd["decoder.conv_in.weight"] = w / w.abs().max() * 60000
    assert torch.isfinite(sd["decoder.conv_in.weight"].half()).all()
    save_file(sd, str(path))
    return path


def test_fp16_nan_vae_is_decoded_again_in_fp32_with_a_warning(sd1, tmp_path, monkeypatch):
    import diffusers

    from ckptlab.imaging import render

    model, cfg, _ = sd1
    vae = overflowing_vae(tmp_path / "broken-vae.safetensors")
    def oracle_vae():
        return diffusers.AutoencoderKL.from_single_file(str(vae), config=str(cfg), subfolder="vae",
                                                        local_files_only=True, torch_dtype=torch.float32)

    latents_seen = []
    real_decode = render.Session.decode

    def spy(self, latents, loaded=None):
        latents_seen.append(latents.clone())
        return real_decode(self, latents, loaded)

    monkeypatch.setattr(render.Session, "decode", spy)
    r = generate(model, tmp_path / "n.png", settings(steps=2), vae=vae, device="cpu", dtype="fp16")
    assert r.dtype == "float16" and latents_seen[0].dtype == torch.float16
    assert any("broken-vae.safetensors" in w and "NaN" in w for w in r.warnings)
    lat = latents_seen[0].float() / 0.18215
    with torch.no_grad():
        assert not torch.isfinite(oracle_vae().half().decode(lat.half()).sample).all()  # fp16 really overflows
        out = oracle_vae().decode(lat).sample
    want = ((out / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert torch.isfinite(out).all() and max_diff(pixels(r.images[0]), want) <= 1


# -- SDXL refiner ------------------------------------------------------------------------------------------------
def test_refiner_equals_diffusers_base_then_img2img_chain(tmp_path):
    root = tmp_path
    base = make_model(root / "sdxl-base.safetensors", "sdxl_checkpoint")
    ref = make_model(root / "sdxl-refiner.safetensors", "sdxl_refiner")
    bpipe = set_scheduler(oracle_pipe(base, write_config_dir(root / "cb", "sdxl"), "sdxl"), "DPM++ 2M")
    rpipe = set_scheduler(oracle_pipe(ref, write_config_dir(root / "cr", "sdxl_refiner"), "sdxl_refiner"),
                          "DPM++ 2M")
    gen = torch.Generator("cpu").manual_seed(SEED)
    kw = dict(prompt=PROMPT, negative_prompt=NEG, num_inference_steps=5, guidance_scale=6.0, generator=gen)
    with torch.inference_mode():
        lat = bpipe(**kw, width=64, height=64, denoising_end=0.8, output_type="latent").images
        want = np.asarray(rpipe(**kw, image=lat, denoising_start=0.8).images[0])
    r = generate(base, root / "r.png", settings(steps=5, cfg=6.0), refiner=ref, device="cpu")
    got = pixels(r.images[0])
    assert max_diff(got, want) <= 1
    with torch.inference_mode():
        base_only = np.asarray(bpipe(**{**kw, "generator": torch.Generator("cpu").manual_seed(SEED)}, width=64,
                                     height=64).images[0])
    assert max_diff(base_only, want) > 8
    from PIL import Image

    text = Image.open(r.images[0]).text["parameters"]
    import hashlib

    assert f"Refiner: sdxl-refiner [{hashlib.sha256(ref.read_bytes()).hexdigest()[:10]}]" in text
    assert "Refiner switch at: 0.8" in text


def test_refiner_alone_is_refused_in_one_line(tmp_path, cli_in_process):
    ref = make_model(tmp_path / "sdxl-refiner.safetensors", "sdxl_refiner")
    r = cli_in_process("generate", ref, "-p", "x", "-o", tmp_path / "o.png", "--device", "cpu")
    assert r.returncode != 0 and r.returncode != 70
    assert r.stderr.startswith("ckptlab: error:") and len(r.stderr.strip().splitlines()) == 1
    assert "refiner" in r.stderr and not (tmp_path / "o.png").exists()


# -- seeds and counts --------------------------------------------------------------------------------------------
def test_count_writes_one_file_per_seed_each_equal_to_a_single_run(sd1, tmp_path):
    from PIL import Image

    model = sd1[0]
    r = generate(model, tmp_path / "cat.png", settings(seed=4000, sampler="Euler a"), count=3, device="cpu")
    assert r.seeds == [4000, 4001, 4002]
    assert r.images == [tmp_path / f"cat-{s}.png" for s in (4000, 4001, 4002)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat-4000.png", "cat-4001.png", "cat-4002.png"]
    solo = tmp_path.parent / f"{tmp_path.name}-single"
    solo.mkdir()
    for seed, path in zip(r.seeds, r.images, strict=True):
        single = generate(model, solo / f"{seed}.png", settings(seed=seed, sampler="Euler a"), device="cpu")
        assert max_diff(pixels(path), pixels(single.images[0])) == 0
        assert f"Seed: {seed}," in Image.open(path).text["parameters"]
    assert max_diff(pixels(r.images[0]), pixels(r.images[1])) > 8


def test_random_seed_is_recorded_and_reproduces(sd1, tmp_path):
    from PIL import Image

    model = sd1[0]
    r = generate(model, tmp_path / "a.png", settings(seed=-1, steps=2), device="cpu")
    seed = r.seeds[0]
    assert 0 <= seed < 2**32
    assert f"Seed: {seed}," in Image.open(r.images[0]).text["parameters"]
    again = generate(model, tmp_path / "b.png", settings(seed=seed, steps=2), device="cpu")
    assert max_diff(pixels(r.images[0]), pixels(again.images[0])) == 0


def test_fp16_nan_in_the_checkpoints_own_vae_names_the_model(tmp_path):
    from safetensors.torch import load_file, save_file

    from ckptlab.imaging.render import Session

    model = make_model(tmp_path / "nan-vae-model.safetensors", "sd1_checkpoint", seed=3)
    sd = load_file(str(model))
    k = "first_stage_model.decoder.conv_in.weight"
    sd[k] = sd[k] / sd[k].abs().max() * 60000
    save_file(sd, str(model))
    with Session(model, device="cpu", dtype="fp16") as ses:
        image, _, _ = ses.render(settings(steps=1))
        assert ses.loaded.pipe.vae.dtype == torch.float32  # stays fp32 for the next images
        assert [w for w in ses.warnings if "the VAE of nan-vae-model.safetensors" in w and "fp32" in w]
    arr = pixels(image)
    assert arr.std() > 5  # a real image, not the black one
