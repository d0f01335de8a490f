"""The indexed fast paths of identification give the same answers as the plain definitions they replace.

``component_prefix`` is "the first ``_GROUPS`` prefix the key starts with (an OpenCLIP ``transformer.resblocks.``
key is not a diffusers ``transformer.`` folder)"; the oracle below is that sentence as a linear scan.
"""

from __future__ import annotations

import pytest

from ckptlab.arch import components as c
from ckptlab.arch.adapters import detect_adapter
from ckptlab.formats.base import TensorInfo
from ckptlab.sample import build


def _linear_prefix(key: str) -> str:
    for prefix, _ in c._GROUPS:
        if key.startswith(prefix) and not (prefix == "transformer." and key.startswith("transformer.resblocks.")):
            return prefix
    return ""


def _sample_keys() -> set[str]:
    keys: set[str] = set()
    for name in build.SPECS:
        keys |= set(build.plan(name, small=True))
    return keys


def test_component_prefix_matches_linear_scan_on_every_sample_key():
    keys = _sample_keys()
    assert len(keys) > 5000
    assert {k for k in keys if c.component_prefix(k) != _linear_prefix(k)} == set()


@pytest.mark.parametrize("key, expected", [
    ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model."),
    ("model.model_sampling.sigmas", "model.model_sampling."),
    ("model.other", ""),
    ("cond_stage_model.transformer.text_model.embeddings.position_ids", "cond_stage_model.transformer."),
    ("cond_stage_model.model.transformer.resblocks.0.ln_1.weight", "cond_stage_model.model."),
    ("cond_stage_model.foo", "cond_stage_model."),
    ("conditioner.embedders.0.model.ln_final.weight", "conditioner.embedders.0.model."),
    ("conditioner.embedders.2.x", ""),
    ("transformer.resblocks.0.attn.in_proj_weight", ""),  # standalone OpenCLIP
    ("transformer.transformer_blocks.0.attn.to_q.weight", "transformer."),
    ("text_encoder_2.text_model.final_layer_norm.weight", "text_encoder_2."),
    ("optimizer_states", "optimizer_states"),  # undotted prefixes match any continuation
    ("loops.fit_loop.state", "loops"),
    ("loopsX", "loops"),
    ("callbacks", "callbacks"),
    ("loss.logvar", "loss."),
    ("loss", ""),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.alpha", ""),
    ("vae", ""),
    (".weird", ""),
    ("", ""),
])
def test_component_prefix_cases(key, expected):
    assert c.component_prefix(key) == expected == _linear_prefix(key)


_FIXED = {p: comp for p, comp in c._GROUPS if comp in c.COMPONENTS}  # prefixes whose component is fixed


@pytest.mark.parametrize("spec", sorted(build.SPECS))
def test_split_components_partitions_real_keys_and_honours_fixed_prefixes(spec):
    keys = list(build.plan(spec, small=False))
    comps = c.split_components(keys)
    flat = [k for ks in comps.values() for k in ks]
    assert sorted(flat) == sorted(keys)  # every key exactly once
    assert list(comps) == [x for x in c.COMPONENTS if x in comps]  # report order, no empty component
    for ks in comps.values():  # key order preserved within a component
        assert ks == [k for k in keys if k in set(ks)]
    comp_of = {k: x for x, ks in comps.items() for k in ks}
    for k in keys:
        p = _linear_prefix(k)
        if p in _FIXED and k[len(p):] not in c.SCHEDULE_KEYS | c.MARKER_KEYS and not k.endswith("scaled_fp8"):
            assert comp_of[k] == _FIXED[p], k
        if p == "model.diffusion_model.":
            assert comp_of[k] in ("unet", "dit", "other", "training"), k


def _lyco(keys: list[str]) -> tuple[str, str, list[str]]:
    g = detect_adapter({k: TensorInfo("F16", (4, 4)) for k in keys})
    return g.kind, g.variant, g.evidence


M = "lora_unet_down_blocks_0_attentions_0_proj_in"


def test_lycoris_algorithm_priority_is_table_order_not_key_order():
    # a LoKr key comes first in the file, a LoHa key later: LoHa is listed first in the algorithm table
    kind, variant, ev = _lyco([f"{M}.lokr_w1", f"{M}.lokr_w2", f"{M}x.hada_w1_a", f"{M}x.hada_w1_b", f"{M}.alpha"])
    assert (kind, variant) == ("lycoris", "loha")
    assert ev[0] == f"LyCORIS loha parameters: {M}x.hada_w1_a"  # the first LoHa key in file order


def test_lycoris_generic_suffix_needs_adapter_module_name():
    # ".diff" counts only on lora_*/lycoris_* modules; a bare "x.diff" is skipped, the lycoris_ one is named
    kind, variant, ev = _lyco(["x.diff", f"lycoris_{M}.diff", f"{M}.alpha"])
    assert (kind, variant) == ("lycoris", "full")
    assert ev[0] == f"LyCORIS full parameters: lycoris_{M}.diff"


@pytest.mark.parametrize("n_other, is_lora", [(0, True), (1, True), (2, True), (3, False), (10, False)])
@pytest.mark.parametrize("others_first", [False, True])
def test_lora_needs_at_least_half_adapter_keys(n_other, is_lora, others_first):
    lora = [f"{M}.lora_down.weight", f"{M}.lora_up.weight"]
    other = [f"model.diffusion_model.input_blocks.{i}.0.weight" for i in range(n_other)]
    keys = other + lora if others_first else lora + other
    g = detect_adapter({k: TensorInfo("F16", (4, 4)) for k in keys})
    assert (g is not None and g.kind == "lora") == is_lora  # 2 adapter keys: a LoRA iff 2 * 2 >= 2 + n_other
