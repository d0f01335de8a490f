"""imaging.pipeline.load's weights: every one materialised from the file at the compute dtype (against diffusers'
own single-file loading of the same file), each in its own storage, read ahead in a worker without leaving
torch's thread setting changed, reloaded in place."""

from __future__ import annotations

import gc
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fakes.sample_files import make_model  # noqa: E402

from ckptlab.errors import MismatchError  # noqa: E402
from ckptlab.formats import open_model  # noqa: E402
from ckptlab.imaging import pipeline, weights  # noqa: E402
from ckptlab.imaging.pipeline import load  # noqa: E402

PIPES = {"sd1_checkpoint": "StableDiffusionPipeline", "sdxl_checkpoint": "StableDiffusionXLPipeline"}


def _config_folder(folder, configs, fam):
    """A diffusers repository without weights for ``from_single_file(config=...)``: the component configs and
    the CLIP tokenizer's vocabulary, written here."""
    from ckptlab.ops import diffusers_config as cfgs
    from ckptlab.ops.diffusers_io import TEXT_ENCODERS

    for rel, obj in configs.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(json.dumps(obj))
    for te, _, kind in TEXT_ENCODERS[fam]:
        tok = folder / te.replace("text_encoder", "tokenizer")
        tok.mkdir()
        for name, data in cfgs.tokenizer_files("<|endoftext|>" if kind == "hf" else "!").items():
            (tok / name).write_bytes(data)
    return folder


def _components(pipe):
    names = ["unet", "vae", "text_encoder", "text_encoder_2"]
    return {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}


def _state(module) -> dict:
    sd = module.state_dict()
    # transformers 5 CLIPTextModel has no ``text_model.`` level any more; diffusers' own load and ours agree on
    # whatever the installed version builds, so the names are compared as they come
    return {k: v for k, v in sd.items()}


@pytest.mark.parametrize("spec", ["sd1_checkpoint", "sdxl_checkpoint"])
def test_every_weight_equals_diffusers_own_single_file_load(tmp_path, monkeypatch, spec):
    """Oracle: diffusers' ``from_single_file`` (its own LDM -> diffusers conversion) of the same fp16 file at
    fp32. Every parameter and buffer of every component must be equal, none left on meta; the SDXL sample has
    the fused OpenCLIP ``in_proj`` split into q/k/v (three weights from one source tensor). Weights from 64 KiB
    up take the aligned-mapping path (2 MiB on real sizes)."""
    import diffusers

    from ckptlab.ops.diffusers_io import plan_to_diffusers

    monkeypatch.setattr(weights, "_HUGE", 64 << 10)
    path = make_model(tmp_path / "m.safetensors", spec, dtype="F16")
    src = open_model(path)
    fam, _, configs, _, _ = plan_to_diffusers(src)
    folder = _config_folder(tmp_path / "cfg", configs, fam)
    loaded = load(src, device="cpu", dtype=torch.float32)
    try:
        kw = {"safety_checker": None, "requires_safety_checker": False} if fam == "sd1" else {}
        ref = getattr(diffusers, PIPES[spec]).from_single_file(str(path), config=str(folder), local_files_only=True,
                                                               torch_dtype=torch.float32, **kw)
        ours, theirs = _components(loaded.pipe), _components(ref)
        assert set(ours) == set(theirs)
        for name, module in ours.items():
            assert not [n for n, p in module.named_parameters() if p.is_meta], name
            a, b = _state(module), _state(theirs[name])
            assert set(a) == set(b), name
            for k in b:
                assert a[k].dtype == b[k].dtype, (name, k)
                assert torch.equal(a[k], b[k]), (name, k)
            assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in module.parameters())
    finally:
        loaded.close()


def test_weights_are_the_source_cast_each_in_its_own_storage(tmp_path, monkeypatch):
    """Every planned weight equals its source tensor cast to the compute dtype (read independently here with
    safetensors), and no two parameters share a storage (no arena: the state dict stays saveable). The
    threshold of the aligned huge-page mappings is lowered to 64 KiB so the small sample's weights take that
    path too."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    monkeypatch.setattr(weights, "_HUGE", 64 << 10)
    path = make_model(tmp_path / "m.safetensors", "sd1_checkpoint", dtype="F16")
    loaded = load(open_model(path), device="cpu", dtype=torch.float32)
    try:
        with safe_open(str(path), "pt") as f:
            for comp, items in loaded.items.items():
                module = getattr(loaded.pipe, comp)
                params = dict(module.named_parameters())
                for it in items:
                    if it.produce is not None:
                        continue  # derived (split/reshaped) weights: checked against diffusers above
                    key = it.key if it.key in params else it.key.removeprefix("text_model.")
                    if key not in params:
                        continue  # a buffer
                    want = f.get_tensor(it.src_key).to(torch.float32).reshape(params[key].shape)
                    assert torch.equal(params[key], want), (comp, it.key)
        ptrs = [p.untyped_storage().data_ptr() for c in _components(loaded.pipe).values() for p in c.parameters()]
        assert len(ptrs) == len(set(ptrs))
        big = [p for p in loaded.pipe.unet.parameters() if p.numel() * 4 >= 64 << 10]
        assert big and all(p.data_ptr() % (64 << 10) == 0 for p in big)  # the mapped path was taken
        sd = loaded.pipe.unet.state_dict()
        save_file(sd, str(tmp_path / "unet.safetensors"))
        back = load_file(str(tmp_path / "unet.safetensors"))
        assert all(torch.equal(back[k], v) for k, v in sd.items())
    finally:
        loaded.close()


def test_load_leaves_torch_threads_as_they_were(tmp_path):
    path = make_model(tmp_path / "m.safetensors", "sd1_checkpoint", dtype="F16")
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        loaded = load(open_model(path), device="cpu", dtype=torch.float32)
        loaded.close()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(prev)


def test_reload_in_place_keeps_every_storage(tmp_path):
    """``reload`` copies into the loaded weights: the same memory before and after, the values back to the
    file's after they were changed in memory."""
    path = make_model(tmp_path / "m.safetensors", "sd1_checkpoint", dtype="F16")
    loaded = load(open_model(path), device="cpu", dtype=torch.float32)
    try:
        unet = loaded.pipe.unet
        before = {n: p.data_ptr() for n, p in unet.named_parameters()}
        saved = {n: p.detach().clone() for n, p in unet.named_parameters()}
        with torch.no_grad():
            for p in unet.parameters():
                p.zero_()
        n = loaded.reload(None)
        assert n >= len(before)
        assert {n: p.data_ptr() for n, p in unet.named_parameters()} == before
        for name, p in unet.named_parameters():
            assert torch.equal(p, saved[name]), name
    finally:
        loaded.close()


def test_big_cpu_tensors_get_aligned_memory_of_their_own():
    """``_empty_cpu``: at least 2 MiB -> a 2 MiB-aligned block (huge pages asked for) that lives as long as the
    tensor; smaller ones are ordinary ``torch.empty`` tensors."""
    import mmap

    if not hasattr(mmap, "MADV_HUGEPAGE"):
        pytest.skip("no MADV_HUGEPAGE on this platform (torch.empty is used)")
    big = weights._empty_cpu((1024, 1024), torch.float32)  # 4 MiB
    assert big.shape == (1024, 1024) and big.dtype == torch.float32
    assert big.data_ptr() % (2 << 20) == 0
    big.fill_(1.5)
    other = weights._empty_cpu((1024, 1024), torch.float32)
    other.fill_(-1.0)
    gc.collect()
    assert float(big.sum()) == 1.5 * 1024 * 1024 and float(other.sum()) == -1024 * 1024
    assert big.untyped_storage().data_ptr() != other.untyped_storage().data_ptr()
    small = weights._empty_cpu((3, 5), torch.float16)
    assert small.shape == (3, 5) and small.dtype == torch.float16


def test_a_weight_that_does_not_fit_fails_and_stops_the_read_ahead(tmp_path, monkeypatch):
    """A shape mismatch found while the worker reads ahead: the one-line error, torch's threads restored and
    no read-ahead left holding weights."""
    path = make_model(tmp_path / "m.safetensors", "sd1_checkpoint", dtype="F16")
    src = open_model(path)
    real = pipeline.fill

    def fill(module, items, *a):
        if module.__class__.__name__ == "AutoencoderKL":  # the UNet is in already; the VAE's first conv shrinks
            owner, name = module.encoder.conv_in, "weight"
            wrong = torch.empty((1, *owner._parameters[name].shape[1:]), device="meta")
            owner._parameters[name] = torch.nn.Parameter(wrong, requires_grad=False)
        return real(module, items, *a)

    monkeypatch.setattr(pipeline, "fill", fill)
    prev = torch.get_num_threads()
    torch.set_num_threads(2)  # not 1 (what the load sets meanwhile, and what a pytest -n 2 worker may start with)
    try:
        with pytest.raises(MismatchError, match="does not fit"):
            load(src, device="cpu", dtype=torch.float32)
        src.close()
        gc.collect()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(prev)
    assert len(weights._AHEAD) == 0


def test_overlapping_loads_restore_the_setting_when_the_last_ends():
    """Two loads under way at once (a grid preparing its next model in another thread): the first end keeps one
    intra-op thread, the last restores what the user had, not the other load's "1"."""
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        weights._one_thread(torch)
        weights._one_thread(torch)
        assert torch.get_num_threads() == 1
        weights._threads_back()
        assert torch.get_num_threads() == 1
        weights._threads_back()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(prev)


def test_a_load_failing_before_any_weight_is_put_gives_the_threads_back(tmp_path, monkeypatch):
    """The read-ahead started, then building the UNet failed: once the load's frame is gone the workers stop and
    torch's thread setting is the user's again."""
    path = make_model(tmp_path / "m.safetensors", "sd1_checkpoint", dtype="F16")
    src = open_model(path)

    def broken(build):
        raise MismatchError("no such model")

    monkeypatch.setattr(pipeline, "empty_model", broken)
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(MismatchError, match="no such model"):
            load(src, device="cpu", dtype=torch.float32)
        gc.collect()
        assert torch.get_num_threads() == 2
        assert len(weights._AHEAD) == 0
    finally:
        torch.set_num_threads(prev)
        src.close()
