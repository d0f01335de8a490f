"""One family record, one detector: what identify, the transforms and merge say about every sample model, and
whether each family's record holds what the modules read from it.

The expected family of each sample is written here by hand (from what each file is: an SVD img2vid file, a
Chroma DiT...), not read back from the detector or the sample specs."""

from __future__ import annotations

import pytest

from ckptlab.arch import families
from ckptlab.arch.components import COMPONENT_PREFIXES, split_components
from ckptlab.arch.identify import identify
from ckptlab.arch.layout import cross_attention_width, file_layout, text_width
from ckptlab.formats import open_model
from ckptlab.merging.family import identify_input
from ckptlab.merging.graph import SourceNode
from ckptlab.sample.build import SPECS, write_model

#: every full-model / UNet / DiT sample the builder knows -> its family (by hand)
EXPECTED = {
    "sd1_checkpoint": "sd1", "sd1_merged": "sd1", "sd1_inpaint": "sd1", "sd1_pix2pix": "sd1", "sd1_unet": "sd1",
    "sd1_nai_clip": "sd1",
    "sd2_checkpoint": "sd2", "sd2_768_v": "sd2", "sd2_512_base": "sd2", "sd2_inpaint": "sd2", "sd2_depth": "sd2",
    "sd2_wd": "sd2",
    "sdxl_checkpoint": "sdxl", "sdxl_inpaint": "sdxl", "sdxl_vpred": "sdxl", "sdxl_cosxl": "sdxl",
    "playground_v25": "sdxl", "sdxl_refiner": "sdxl_refiner", "kolors_unet": "kolors",
    "sd3_medium": "sd3", "sd35_medium": "sd3", "sd35_large": "sd3",
    "flux_dev": "flux", "flux_schnell": "flux", "flux_fill": "flux", "flux_depth": "flux",
    "flux_dev_fp8_scaled": "flux", "chroma": "chroma", "svd": "svd",
    "cascade": "cascade", "cascade_stage_c": "cascade", "cascade_stage_b": "cascade",
    "pixart": "pixart", "pixart_alpha": "pixart", "pixart_sigma": "pixart", "auraflow": "auraflow",
    "hunyuan_dit": "hunyuan_dit", "hunyuan_dit_v10": "hunyuan_dit",
}

#: families whose components extract/replace locate, by hand: diffusion-model component and what else a
#: single file of the family holds
TRANSFORM_FAMILIES = {
    "sd1": ("unet", {"vae", "clip_l", "ema"}), "sd2": ("unet", {"vae", "openclip_h", "ema"}),
    "sdxl": ("unet", {"vae", "clip_l", "clip_g", "ema"}), "sdxl_refiner": ("unet", {"vae", "clip_g", "ema"}),
    "sd3": ("dit", {"vae", "clip_l", "clip_g", "t5xxl"}), "flux": ("dit", {"vae", "clip_l", "t5xxl"}),
    "svd": ("unet", {"vae"}),
}
#: to/from-diffusers families and the number of their text encoders (by hand)
DIFFUSERS_FAMILIES = {"sd1": 1, "sd2": 1, "sdxl": 2, "sdxl_refiner": 1}
#: supermerger block counts (26 for the 12-level UNet, 20 for SDXL's 9)
MERGE_BLOCKS = {"sd1": 26, "sd2": 26, "sdxl": 20}


def test_every_model_sample_has_an_expected_family():
    models = {n for n, s in SPECS.items() if s.kind in ("checkpoint", "unet")}
    assert models == set(EXPECTED), "add new sample specs to EXPECTED (by hand)"


@pytest.fixture(scope="module")
def sparse_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("families")
    return {n: write_model(d / f"{n}.safetensors", n, fmt="safetensors", sparse=True) for n in EXPECTED}


@pytest.mark.parametrize("spec", sorted(EXPECTED))
def test_identify_transforms_and_merge_agree_on_the_family(sparse_files, spec):
    path = sparse_files[spec]
    expected = EXPECTED[spec]
    assert identify(path).family == expected
    src = open_model(path)
    try:
        assert file_layout(src).family_id == expected  # extract / replace / prune / precision / to-diffusers
        kind, fam = identify_input(src)  # merge
        assert fam == expected and kind in ("checkpoint", "unet")
        assert SourceNode("A", src).family == expected
    finally:
        src.close()


@pytest.mark.parametrize("fid", sorted(TRANSFORM_FAMILIES))
def test_transform_families_have_a_complete_record(fid):
    fam = families.get(fid)
    dm, others = TRANSFORM_FAMILIES[fid]
    assert fam is not None and fam.arch == dm
    prefixes = fam.component_prefixes
    assert set(prefixes) == {dm, *others}, "component prefixes of the single-file layout"
    assert fam.prefix(dm) == "model.diffusion_model."
    assert fam.short_name and fam.display_name == fam.short_name
    assert fam.vae_group, "the VAE latent group replace --vae / merge --vae check"
    assert COMPONENT_PREFIXES[fid] == prefixes  # the stable API reads the record


def test_no_family_outside_the_hand_list_claims_transform_support():
    assert {f.id for f in families.FAMILIES if f.prefixes} == set(TRANSFORM_FAMILIES)


@pytest.mark.parametrize("fid", sorted(DIFFUSERS_FAMILIES))
def test_diffusers_families_have_a_complete_record(fid):
    fam = families.get(fid)
    d = fam.diffusers
    assert d is not None and d.pipeline.startswith("StableDiffusion") and d.scheduler.endswith("Scheduler")
    assert len(d.text_encoders) == DIFFUSERS_FAMILIES[fid]
    singles = {p for ps in fam.component_prefixes.values() for p in ps}
    assert all(prefix in singles for _, prefix, _ in d.text_encoders)
    assert len(fam.text_tokens) == DIFFUSERS_FAMILIES[fid] and fam.context_width
    assert {k for k, _ in d.index} >= {"unet", "vae", "text_encoder", "tokenizer"}
    assert {f.id for f in families.FAMILIES if f.diffusers} == set(DIFFUSERS_FAMILIES)


@pytest.mark.parametrize("fid", sorted(MERGE_BLOCKS))
def test_merge_block_families(fid):
    from ckptlab.merging.blocks import blocks_for

    assert len(blocks_for(fid)) == MERGE_BLOCKS[fid]
    assert {f.id for f in families.FAMILIES if f.merge_blocks} == set(MERGE_BLOCKS)


def test_every_family_has_names_and_a_resolution():
    for f in families.FAMILIES:
        assert f.id and f.name and f.display_name, f.id
        assert f.resolution > 0 and f.latent_channels > 0 and f.arch in ("unet", "dit"), f.id


@pytest.mark.parametrize("spec, fid, width", [("sd1_checkpoint", "sd1", 768), ("sd2_checkpoint", "sd2", 1024),
                                              ("sdxl_checkpoint", "sdxl", 2048), ("sdxl_refiner", "sdxl_refiner", 1280)])
def test_text_encoder_widths_match_the_unet_in_real_layouts(sparse_files, spec, fid, width):
    """Full-size headers: the record's text-encoder tokens add up to the UNet's cross-attention width
    (reference widths: CLIP-L 768, OpenCLIP-H 1024, CLIP-L + bigG 768 + 1280, bigG 1280)."""
    src = open_model(sparse_files[spec])
    try:
        infos = src.infos()
        fam = families.get(fid)
        assert text_width(infos, fam) == cross_attention_width(infos) == width == fam.context_width
    finally:
        src.close()


def test_civitai_base_models_resolve_through_the_records():
    from ckptlab.library.ui_folders import resolve_family

    by_hand = {"SD 1.5": "sd1", "SDXL 1.0": "sdxl", "Pony": "sdxl", "Pony V7": "auraflow", "SD 2.1 768": "sd2",
               "Flux.1 D": "flux", "Flux.2 Klein 9B": "flux2", "Wan Video 2.2 I2V-A14B": "wan", "SVD XT": "svd",
               "sd15": "sd1", "xl": "sdxl", "refiner": "sdxl_refiner", "Stable Diffusion XL": "sdxl"}
    for name, fid in by_hand.items():
        assert resolve_family(name) == (fid,), name


def test_components_of_a_sample_are_found_under_the_record_prefixes(sparse_files):
    """Every component split_components finds in an SDXL single file sits under the record's prefix."""
    src = open_model(sparse_files["sdxl_checkpoint"])
    try:
        fam = families.get("sdxl")
        for comp, keys in split_components(src.keys()).items():
            if comp in ("other",):
                continue
            assert all(k.startswith(fam.prefix(comp)) for k in keys), comp
    finally:
        src.close()


def test_a1111_sd_version_comes_from_the_record():
    from ckptlab.hub.sidecars import sd_version

    by_hand = {"SD 1.4": "SD1", "SD 1.5 LCM": "SD1", "SD 2.0 768": "SD2", "SDXL Turbo": "SDXL", "Illustrious": "SDXL",
               "NoobAI": "SDXL", "Pony V7": "Unknown", "SD 3.5": "Unknown", "Flux.1 S": "Unknown", "": "Unknown",
               "no such base": "Unknown"}
    assert {b: sd_version(b) for b in by_hand} == by_hand
