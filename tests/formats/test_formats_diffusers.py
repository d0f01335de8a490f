"""``DiffusersSource`` against folders written by diffusers/transformers ``save_pretrained`` (the
independent oracle): one key space across components, shards and variants, equal tensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ckptlab.errors import CkptlabError, FormatError
from ckptlab.formats import detect_format, open_model
from ckptlab.formats.diffusers import DiffusersSource

TOKENIZER = Path(__file__).resolve().parents[2] / "src" / "ckptlab" / "data" / "clip_tokenizer"


def _tiny_models():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                      num_hidden_layers=2, vocab_size=1000, max_position_embeddings=77,
                                      bos_token_id=0, eos_token_id=2, pad_token_id=1))
    return unet, vae, te


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A real StableDiffusionPipeline folder (plain + fp16 variant), its state dicts, and extra folders."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    root = tmp_path_factory.mktemp("diffusers")
    unet, vae, te = _tiny_models()
    tok = CLIPTokenizer(str(TOKENIZER / "vocab.json"), str(TOKENIZER / "merges.txt"))
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=te, tokenizer=tok,
                                   scheduler=DDIMScheduler(prediction_type="v_prediction"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "sd15")
    state = {f"{name}.{k}": v.detach().clone() for name, m in (("unet", unet), ("vae", vae), ("text_encoder", te))
             for k, v in m.state_dict().items()}
    unet.save_pretrained(root / "unet_sharded", max_shard_size="100KB")
    te.half().save_pretrained(root / "te_sharded_fp16", max_shard_size="20KB", variant="fp16")
    te.float()
    vae.save_pretrained(root / "vae_bin", safe_serialization=False)
    pipe.to(torch.float16).save_pretrained(root / "sd15", variant="fp16")
    return root, state


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_pipeline_folder_is_one_key_space(built):
    root, state = built
    assert detect_format(root / "sd15") == "diffusers"
    with open_model(root / "sd15") as src:
        assert isinstance(src, DiffusersSource)
        assert src.variant == ""  # plain files preferred when every component has them
        assert set(src.keys()) == set(state)
        for k, v in state.items():
            assert _same(src.get(k), v), k
        assert sorted(c for c, comp in src.components.items() if comp.weights) == ["text_encoder", "unet", "vae"]
        assert src.components["unet"].class_name == "UNet2DConditionModel"
        assert src.components["text_encoder"].library == "transformers"
        assert src.size == sum(p.stat().st_size for p in src.files)
        assert len(src.files) == 3


def test_metadata_exposes_the_configs(built):
    root, _ = built
    src = DiffusersSource(root / "sd15")
    for rel in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "scheduler/scheduler_config.json"):
        assert json.loads(src.metadata[rel]) == json.loads((root / "sd15" / rel).read_text()), rel
    assert json.loads(src.metadata["scheduler/scheduler_config.json"])["prediction_type"] == "v_prediction"
    assert all(isinstance(v, str) for v in src.metadata.values())


def test_variant_can_be_chosen_and_is_consistent(built):
    root, state = built
    src = open_model(root / "sd15", variant="fp16")
    assert src.variant == "fp16"
    assert {i.dtype for i in src.infos().values()} == {"F16"}
    assert all(c.weights.files[0].name.split(".")[-2] == "fp16" for c in src.components.values() if c.weights)
    k = "unet.conv_in.weight"
    assert _same(src.get(k), state[k].half())
    with pytest.raises(FormatError, match="no variant 'bf16'.*available"):
        DiffusersSource(root / "sd15", variant="bf16")


def test_only_a_variant_present_is_picked_for_all(built, tmp_path):
    root, state = built
    only = tmp_path / "only_fp16"
    shutil.copytree(root / "sd15", only)
    for p in only.rglob("*.safetensors"):
        if ".fp16." not in p.name:
            p.unlink()
    src = DiffusersSource(only)
    assert src.variant == "fp16" and set(src.keys()) == set(state)
    with pytest.raises(FormatError, match="plain"):
        DiffusersSource(only, variant="")


def test_sharded_single_component_folders(built):
    root, _ = built
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    ref = UNet2DConditionModel.from_pretrained(root / "unet_sharded").state_dict()
    src = open_model(root / "unet_sharded")
    assert isinstance(src, DiffusersSource) and src.components[""].weights.index is not None
    assert len(src.files) > 1
    assert set(src.keys()) == set(ref)  # a lone component keeps its own key names
    for k, v in ref.items():
        assert _same(src.get(k), v), k
    assert json.loads(src.metadata["config.json"])["_class_name"] == "UNet2DConditionModel"

    te_ref = CLIPTextModel.from_pretrained(root / "te_sharded_fp16", variant="fp16").state_dict()
    te = DiffusersSource(root / "te_sharded_fp16")
    assert te.variant == "fp16" and len(te.files) == 3
    assert set(te.keys()) <= set(te_ref) and len(te.keys()) >= len(te_ref) - 1  # position_ids may be a buffer
    for k in te.keys():
        assert _same(te.get(k), te_ref[k]), k


def _copy(root: Path, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(root / name, dst)
    return dst


def test_broken_shard_indexes_are_refused(built, tmp_path):
    root, _ = built
    d = _copy(root, "unet_sharded", tmp_path)
    index = d / "diffusion_pytorch_model.safetensors.index.json"
    good = json.loads(index.read_text())

    bad = json.loads(json.dumps(good))
    first = next(iter(bad["weight_map"]))
    bad["weight_map"][first] = "../../etc/passwd"
    index.write_text(json.dumps(bad))
    with pytest.raises(FormatError, match="outside its folder"):
        DiffusersSource(d)

    bad = json.loads(json.dumps(good))
    bad["weight_map"]["conv_in.not_there"] = bad["weight_map"][first]
    index.write_text(json.dumps(bad))
    with pytest.raises(FormatError, match="not in it"):
        DiffusersSource(d)

    index.write_text(json.dumps(good))
    (d / good["weight_map"][first]).unlink()
    with pytest.raises(FormatError, match="missing"):
        DiffusersSource(d)

    index.write_text("{oops")
    with pytest.raises(FormatError, match="not readable JSON"):
        DiffusersSource(d)


def test_bin_weights_go_through_the_pickle_reader(built):
    root, _ = built
    try:
        import ckptlab.formats.pickle  # noqa: F401
    except ImportError:
        with pytest.raises(CkptlabError, match="pickle reader"):
            DiffusersSource(root / "vae_bin")
        return
    from diffusers import AutoencoderKL

    ref = AutoencoderKL.from_pretrained(root / "vae_bin").state_dict()
    src = DiffusersSource(root / "vae_bin")
    assert set(src.keys()) == set(ref)
    for k, v in ref.items():
        assert _same(src.get(k), v), k


def test_folders_without_weights_or_markers(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CkptlabError, match="not a diffusers model"):
        open_model(tmp_path / "empty")
    only_cfg = tmp_path / "tokenizer_like"
    only_cfg.mkdir()
    (only_cfg / "config.json").write_text("{}")
    with pytest.raises(FormatError, match="no weights"):
        open_model(only_cfg)
    bad_index = tmp_path / "bad_index"
    bad_index.mkdir()
    (bad_index / "model_index.json").write_text("[1, 2]")
    with pytest.raises(FormatError, match="not a JSON object"):
        open_model(bad_index)


def test_legacy_variant_index_name(built, tmp_path):
    """Older diffusers named a variant's shard index ``NAME.fp16.safetensors.index.json``."""
    root, _ = built
    d = _copy(root, "te_sharded_fp16", tmp_path)
    (d / "model.safetensors.index.fp16.json").rename(d / "model.fp16.safetensors.index.json")
    src = DiffusersSource(d)
    assert src.variant == "fp16" and len(src.files) == 3
    assert set(src.keys()) == set(DiffusersSource(root / "te_sharded_fp16").keys())
