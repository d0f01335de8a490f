"""ΔW of every baked algorithm against independent oracles: the formula written here with torch (lora.md §3.1,
§3.7, adapters.md §4), kohya's conv2d-permute form for 3×3 LoCon, and forward oracles (F.linear / F.conv2d of
the base plus the adapter's own module definition, on random inputs)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
from safetensors.torch import save_file  # noqa: E402

from ckptlab.errors import MismatchError  # noqa: E402
from ckptlab.lora import maths  # noqa: E402
from ckptlab.lora.file import LoraFile  # noqa: E402

LIN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
PROJ = "lora_unet_down_blocks_0_attentions_0_proj_in"


def g(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed + 7 * len(shape) + sum(shape))
    return torch.randn(*shape, generator=gen)


@pytest.fixture
def lora(tmp_path):
    files = []

    def make(tensors: dict, metadata=None) -> LoraFile:
        p = tmp_path / f"l{len(files)}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(p), metadata=metadata)
        lf = LoraFile.open(p)
        files.append(lf)
        return lf

    yield make
    for f in files:
        f.close()


def one(lf: LoraFile):
    (mod,) = lf.modules.values()
    return mod


def close(a, b, tol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=tol, rtol=tol), (a - b).abs().max()


# -- plain LoRA / LoCon --------------------------------------------------------------------------------------

def test_linear_lora_scale_once_and_forward(lora):
    up, down = g(32, 4), g(4, 16)
    lf = lora({f"{LIN}.lora_up.weight": up, f"{LIN}.lora_down.weight": down, f"{LIN}.alpha": torch.tensor(2.0)})
    mod = one(lf)
    close(maths.delta(lf, mod, (32, 16)), (2.0 / 4) * up @ down)
    w, x, m = g(32, 16, seed=1), g(5, 16, seed=2), 0.7
    new = maths.apply(w, [(lf, mod, m)])
    # the module's definition: org(x) + m · scale · up(down(x))
    close(F.linear(x, new), F.linear(x, w) + m * 0.5 * F.linear(F.linear(x, down), up), 1e-4)


def test_no_alpha_is_scale_one_and_zero_alpha_disables(lora):
    up, down = g(8, 2), g(2, 8)
    lf = lora({f"{LIN}.lora_up.weight": up, f"{LIN}.lora_down.weight": down})
    close(maths.delta(lf, one(lf), (8, 8)), up @ down)
    lf0 = lora({f"{LIN}.lora_up.weight": up, f"{LIN}.lora_down.weight": down, f"{LIN}.alpha": torch.tensor(0.0)})
    w = g(8, 8, seed=3)
    close(maths.apply(w, [(lf0, one(lf0), 1.0)]), w)  # A1111 / ComfyUI: alpha/dim = 0


def test_conv3x3_locon_matches_kohya_conv2d_form_and_forward(lora):
    out, inn, r = 8, 6, 3
    up, down = g(out, r, 1, 1), g(r, inn, 3, 3)
    lf = lora({f"{CONV}.lora_up.weight": up, f"{CONV}.lora_down.weight": down, f"{CONV}.alpha": torch.tensor(1.0)})
    d = maths.delta(lf, one(lf), (out, inn, 3, 3))
    kohya = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * (1.0 / r)  # merge_lora.py:109
    close(d, kohya)
    w, x = g(out, inn, 3, 3, seed=4), g(2, inn, 9, 9, seed=5)
    new = maths.apply(w, [(lf, one(lf), 1.0)])
    ref = F.conv2d(x, w, padding=1) + (1.0 / r) * F.conv2d(F.conv2d(x, down, padding=1), up)
    close(F.conv2d(x, new, padding=1), ref, 1e-4)


def test_4d_lora_on_linear_and_2d_lora_on_1x1_conv(lora):
    up, down = g(16, 4, 1, 1), g(4, 12, 1, 1)
    lf = lora({f"{PROJ}.lora_up.weight": up, f"{PROJ}.lora_down.weight": down})
    close(maths.delta(lf, one(lf), (16, 12)), up[:, :, 0, 0] @ down[:, :, 0, 0])
    up2, down2 = g(16, 4, seed=1), g(4, 12, seed=1)
    lf2 = lora({f"{PROJ}.lora_up.weight": up2, f"{PROJ}.lora_down.weight": down2})
    close(maths.delta(lf2, one(lf2), (16, 12, 1, 1)), (up2 @ down2)[:, :, None, None])


def test_cp_mid_forward(lora):
    out, inn, r = 8, 5, 3
    up, mid, down = g(out, r, 1, 1), g(r, r, 3, 3), g(r, inn, 1, 1)
    lf = lora({f"{CONV}.lora_up.weight": up, f"{CONV}.lora_mid.weight": mid, f"{CONV}.lora_down.weight": down,
               f"{CONV}.alpha": torch.tensor(1.5)})
    w, x = g(out, inn, 3, 3, seed=2), g(2, inn, 7, 7, seed=3)
    new = maths.apply(w, [(lf, one(lf), 1.0)])
    # LyCORIS LoCon use_cp forward: down (1×1) -> mid (3×3) -> up (1×1)
    ref = F.conv2d(x, w, padding=1) + 0.5 * F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    close(F.conv2d(x, new, padding=1), ref, 1e-4)


def test_inpaint_conv_in_zero_padded(lora):
    name = "lora_unet_conv_in"
    up, down = g(8, 2, 1, 1), g(2, 4, 3, 3)
    lf = lora({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down})
    d = maths.delta(lf, one(lf), (8, 9, 3, 3))
    close(d[:, :4], (up.reshape(8, 2) @ down.reshape(2, -1)).reshape(8, 4, 3, 3))
    assert torch.count_nonzero(d[:, 4:]) == 0


def test_shape_mismatch_is_refused(lora):
    lf = lora({f"{LIN}.lora_up.weight": g(8, 2), f"{LIN}.lora_down.weight": g(2, 8)})
    with pytest.raises(MismatchError, match="update is"):
        maths.delta(lf, one(lf), (16, 8))


# -- LoHa / LoKr ---------------------------------------------------------------------------------------------

def test_loha_scale_once_not_lycoris_squared(lora):
    w1a, w1b, w2a, w2b = g(8, 4), g(4, 6), g(8, 4, seed=1), g(4, 6, seed=1)
    lf = lora({f"{LIN}.hada_w1_a": w1a, f"{LIN}.hada_w1_b": w1b, f"{LIN}.hada_w2_a": w2a, f"{LIN}.hada_w2_b": w2b,
               f"{LIN}.alpha": torch.tensor(1.0)})
    d = maths.delta(lf, one(lf), (8, 6))
    close(d, (w1a @ w1b) * (w2a @ w2b) * 0.25)  # α/r = 1/4 once; LyCORIS 4.1.3's merge would give 1/16


def test_loha_conv_and_tucker(lora):
    out, inn, r = 6, 4, 2
    w1a, w1b, w2a, w2b = g(out, r), g(r, inn * 9), g(out, r, seed=1), g(r, inn * 9, seed=1)
    lf = lora({f"{CONV}.hada_w1_a": w1a, f"{CONV}.hada_w1_b": w1b, f"{CONV}.hada_w2_a": w2a,
               f"{CONV}.hada_w2_b": w2b})
    close(maths.delta(lf, one(lf), (out, inn, 3, 3)), ((w1a @ w1b) * (w2a @ w2b)).reshape(out, inn, 3, 3))
    # Tucker: hada_t [r, r, 3, 3], w_a [r, out], w_b [r, in]; factor_i[p, q, k, l] = Σ t[i,j,k,l] a[i,p] b[j,q]
    t1, t2 = g(r, r, 3, 3), g(r, r, 3, 3, seed=1)
    a1, b1, a2, b2 = g(r, out), g(r, inn), g(r, out, seed=2), g(r, inn, seed=2)
    lt = lora({f"{CONV}.hada_t1": t1, f"{CONV}.hada_t2": t2, f"{CONV}.hada_w1_a": a1, f"{CONV}.hada_w1_b": b1,
               f"{CONV}.hada_w2_a": a2, f"{CONV}.hada_w2_b": b2, f"{CONV}.alpha": torch.tensor(1.0)})

    def rebuild(t, a, b):
        res = torch.zeros(out, inn, 3, 3)
        for i in range(r):
            for j in range(r):
                res += t[i, j][None, None] * a[i][:, None, None, None] * b[j][None, :, None, None]
        return res

    close(maths.delta(lt, one(lt), (out, inn, 3, 3)), rebuild(t1, a1, b1) * rebuild(t2, a2, b2) * 0.5, 1e-4)


def test_lokr_full_factors_scale_one(lora):
    w1, w2 = g(2, 3), g(4, 5)
    lf = lora({f"{LIN}.lokr_w1": w1, f"{LIN}.lokr_w2": w2, f"{LIN}.alpha": torch.tensor(7.0)})
    d = maths.delta(lf, one(lf), (8, 15))
    ref = torch.zeros(8, 15)
    for i in range(2):
        for j in range(3):
            ref[i * 4:(i + 1) * 4, j * 5:(j + 1) * 5] = w1[i, j] * w2
    close(d, ref)


def test_lokr_factored_w2_rank_from_w2b(lora):
    w1, a, b = g(2, 2), g(4, 3), g(3, 6)
    lf = lora({f"{LIN}.lokr_w1": w1, f"{LIN}.lokr_w2_a": a, f"{LIN}.lokr_w2_b": b, f"{LIN}.alpha": torch.tensor(1.5)})
    close(maths.delta(lf, one(lf), (8, 12)), torch.kron(w1, a @ b) * 0.5)
    # both factorised: r from w2_b (ComfyUI), not w1_b
    a1, b1 = g(2, 5), g(5, 2)
    lf2 = lora({f"{LIN}.lokr_w1_a": a1, f"{LIN}.lokr_w1_b": b1, f"{LIN}.lokr_w2_a": a, f"{LIN}.lokr_w2_b": b,
                f"{LIN}.alpha": torch.tensor(1.5)})
    close(maths.delta(lf2, one(lf2), (8, 12)), torch.kron(a1 @ b1, a @ b) * 0.5)


def test_lokr_conv_and_tucker(lora):
    w1, w2 = g(2, 2), g(3, 2, 3, 3)
    lf = lora({f"{CONV}.lokr_w1": w1, f"{CONV}.lokr_w2": w2})
    d = maths.delta(lf, one(lf), (6, 4, 3, 3))
    ref = torch.zeros(6, 4, 3, 3)
    for i in range(2):
        for j in range(2):
            ref[i * 3:(i + 1) * 3, j * 2:(j + 1) * 2] = w1[i, j] * w2
    close(d, ref)
    t2, a, b = g(2, 2, 3, 3), g(2, 3), g(2, 2)  # lokr_t2 [r,r,k,k], w2_a [r, b], w2_b [r, d]
    lt = lora({f"{CONV}.lokr_w1": w1, f"{CONV}.lokr_t2": t2, f"{CONV}.lokr_w2_a": a, f"{CONV}.lokr_w2_b": b,
               f"{CONV}.alpha": torch.tensor(1.0)})
    w2t = torch.zeros(3, 2, 3, 3)
    for i in range(2):
        for j in range(2):
            w2t += t2[i, j][None, None] * a[i][:, None, None, None] * b[j][None, :, None, None]
    ref2 = torch.zeros(6, 4, 3, 3)
    for i in range(2):
        for j in range(2):
            ref2[i * 3:(i + 1) * 3, j * 2:(j + 1) * 2] = w1[i, j] * w2t
    close(maths.delta(lt, one(lt), (6, 4, 3, 3)), ref2 * 0.5, 1e-4)


# -- full, norm, DoRA, IA3, OFT ------------------------------------------------------------------------------

def test_full_diff_and_bias_no_scale(lora):
    diff, db = g(8, 8), g(8)
    lf = lora({f"{LIN}.diff": diff, f"{LIN}.diff_b": db, f"{LIN}.alpha": torch.tensor(3.0)})
    w, b = g(8, 8, seed=1), g(8, seed=1)
    close(maths.apply(w, [(lf, one(lf), 0.5)]), w + 0.5 * diff)
    close(maths.apply_bias(b, [(lf, one(lf), 0.5)]), b + 0.5 * db)


def test_norm(lora):
    name = "lora_unet_down_blocks_0_resnets_0_norm1"
    wn, bn = g(16), g(16, seed=1)
    lf = lora({f"{name}.w_norm": wn, f"{name}.b_norm": bn})
    w, b = g(16, seed=2), g(16, seed=3)
    close(maths.apply(w, [(lf, one(lf), 2.0)]), w + 2 * wn)
    close(maths.apply_bias(b, [(lf, one(lf), 2.0)]), b + 2 * bn)


@pytest.mark.parametrize("axis", ["out", "in", "peft"])
@pytest.mark.parametrize("m", [1.0, 0.6])
def test_dora(lora, axis, m):
    out, inn, r = 8, 6, 2
    up, down = g(out, r), g(r, inn)
    mag = {"out": g(out, 1).abs() + 0.5, "in": g(1, inn).abs() + 0.5, "peft": g(out).abs() + 0.5}[axis]
    if axis == "peft":
        name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
        t = {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up, f"{name}.lora_magnitude_vector": mag}
    else:
        t = {f"{LIN}.lora_up.weight": up, f"{LIN}.lora_down.weight": down, f"{LIN}.alpha": torch.tensor(1.0),
             f"{LIN}.dora_scale": mag}
    lf = lora(t)
    scale = 1.0 if axis == "peft" else 0.5
    w = g(out, inn, seed=5)
    merged = w + scale * up @ down
    if axis == "in":
        wd = merged * mag / merged.norm(dim=0, keepdim=True)
    else:
        wd = merged * mag.reshape(out, 1) / merged.norm(dim=1, keepdim=True)
    close(maths.apply(w, [(lf, one(lf), m)]), w + m * (wd - w), 1e-4)
    if axis != "in" and m == 1.0:  # every output row has norm = magnitude
        close(maths.apply(w, [(lf, one(lf), 1.0)]).norm(dim=1), mag.flatten(), 1e-4)


def test_ia3(lora):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"
    wv = g(8)
    lf = lora({f"{name}.weight": wv, f"{name}.on_input": torch.tensor(0)})
    w = g(8, 5, seed=1)
    close(maths.apply(w, [(lf, one(lf), 0.5)]), w * (1 + 0.5 * wv)[:, None])
    li = lora({f"{name}.weight": g(5), f"{name}.on_input": torch.tensor(1)})
    wi = li.source.get(f"{name}.weight").float()
    close(maths.apply(w, [(li, one(li), 1.0)]), w * (1 + wi)[None, :])


def test_diag_oft_rotation(lora):
    n, bs, inn = 2, 4, 3
    blocks = g(n, bs, bs) * 0.1
    lf = lora({f"{LIN}.oft_blocks": blocks, f"{LIN}.alpha": torch.tensor(0.0)})  # alpha 0: no constraint
    w = g(n * bs, inn, seed=1)
    ref = torch.empty_like(w)
    eye = torch.eye(bs)
    for k in range(n):
        q = blocks[k] - blocks[k].T
        rk = (eye + q) @ torch.linalg.inv(eye - q)
        assert torch.allclose(rk @ rk.T, eye, atol=1e-5)  # a rotation
        ref[k * bs:(k + 1) * bs] = rk.T @ w[k * bs:(k + 1) * bs]
    close(maths.apply(w, [(lf, one(lf), 1.0)]), ref, 1e-4)
    # multiplier 0 leaves the weight; the rotation keeps each block's column norms
    close(maths.apply(w, [(lf, one(lf), 0.0)]), w)
    close(ref.reshape(n, bs, inn).norm(dim=1), w.reshape(n, bs, inn).norm(dim=1), 1e-4)


@pytest.mark.parametrize("algo,tensors", [
    ("glora", {"a1.weight": (2, 8), "a2.weight": (8, 2), "b1.weight": (2, 8), "b2.weight": (8, 2)}),
    ("boft", {"oft_blocks": (2, 2, 4, 4)}),
])
def test_refused_algorithms(lora, algo, tensors):
    lf = lora({f"{LIN}.{k}": g(*s) for k, s in tensors.items()})
    mod = one(lf)
    assert mod.algo == algo
    assert maths.unsupported(mod)
    with pytest.raises(MismatchError, match="not baked"):
        maths.apply(g(8, 8), [(lf, mod, 1.0)])


def test_patches_apply_in_order(lora):
    up, down = g(8, 2), g(2, 8)
    la = lora({f"{LIN}.lora_up.weight": up, f"{LIN}.lora_down.weight": down})
    lb = lora({f"{LIN}.diff": g(8, 8, seed=9)})
    w = g(8, 8, seed=1)
    close(maths.apply(w, [(la, one(la), 0.3), (lb, one(lb), -1.0)]),
          w + 0.3 * up @ down - lb.source.get(f"{LIN}.diff").float())
