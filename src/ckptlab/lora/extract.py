"""``lora extract``: a LoRA from a fine-tune and its base, one module at a time (docs/lora.md).

For every module kohya's ``extract_lora_from_models.py`` targets (adapters.md §5.1: the Linear / 1×1 children of
the UNet's Transformer2D blocks, the text encoders' attention and MLP linears; with ``conv_rank`` also the
ResnetBlock2D / Down- / Upsample2D children, 3×3 convs at ``conv_rank``, ``time_emb_proj`` and 1×1
``conv_shortcut`` at ``rank``): read the two weights, ΔW = W_tuned − W_base in fp32, truncated SVD
(``lora.svd.top_svd``: randomised where as accurate, full otherwise), kohya's split ``up = U·S``,
``down = Vh``, α = rank (scale 1), written in kohya naming. The text encoders are skipped when no TE module has
``max|ΔW| > min_diff`` (kohya). Flux / SD3 (docs/lora.md): kohya ``lora_flux.py`` / ``lora_sd3.py`` block
Linears, a fused ``qkv`` / ``linear1`` as one module, CLIP and T5 text encoders each kept on its own ``min_diff``;
ComfyUI scaled-fp8 weights are dequantised (``w·scale_weight``) first. SD2 leaves out its unused 24th text-encoder
layer (kohya's SD2 text encoder has 23). No quantile clamp unless ``clamp_quantile`` is given (kohya clamps at 0.99 by
default, which alone costs ~10 % relative error at the exact rank: lora.md §3.4).

Dynamic ranks (``sv_fro`` / ``sv_ratio``, kohya ``resize_lora.py`` rules, capped by ``rank``/``conv_rank``) need
each module's spectrum before the file's header is written: a first pass computes the singular values only,
the write pass factors again. Fixed ranks take one pass (plus a read of the TE weights for the ``min_diff``
check). Memory: one module's ΔW and factors at a time.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ckptlab.errors import MismatchError, UsageError
from ckptlab.formats.arrays import import_torch
from ckptlab.hashes import NO_CACHE, HashCache
from ckptlab.lora import svd
from ckptlab.lora.naming import UNET_PREFIX, Target
from ckptlab.ops.stream import Out
from ckptlab.progress import Progress, null_progress

OPERATION = "lora-extract"
MIN_DIFF = 0.01

_ATTN = re.compile(r"(\.transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2)"
                   r"|\.proj_in|\.proj_out)\.weight$")
_RESNET = re.compile(r"(\.(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection)"
                     r"|^input_blocks\.\d+\.0\.op|^output_blocks\.\d+\.\d+\.conv)\.weight$")
_TE = re.compile(r"_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])$")
#: kohya's T5 LoRA targets (``T5Attention`` / ``T5DenseGatedActDense`` Linear children; Flux/SD3 ``lora_te3_``)
_T5 = re.compile(r"_encoder_block_\d+_layer_\d+_(SelfAttention_[qkvo]|DenseReluDense_(wi|wi_0|wi_1|wo))$")
#: kohya ``lora_flux.py``: the Linear children of ``DoubleStreamBlock`` / ``SingleStreamBlock`` (BFL paths)
_FLUX = re.compile(r"^(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02]|mod\.lin)"
                   r"|single_blocks\.\d+\.(linear1|linear2|modulation\.lin))$")
#: kohya ``lora_sd3.py``: the Linear children of ``SingleDiTBlock`` (each x_block / context_block of joint_blocks)
_SD3 = re.compile(r"^joint_blocks\.\d+\.(x_block|context_block)\.(attn2?\.(qkv|proj)|mlp\.fc[12]"
                  r"|adaLN_modulation\.1)$")
_DIT = {"flux": _FLUX, "sd3": _SD3}
#: kohya ``ss_network_module`` of the family's LoRA network (``flux_extract_lora.py`` writes lora_flux)
_NETWORK_MODULE = {"flux": "networks.lora_flux", "sd3": "networks.lora_sd3"}
#: the OpenCLIP ViT-H text encoder of SD2 has 24 layers, SD2 reads the penultimate one: kohya's (and diffusers')
#: SD2 text encoder has 23 layers, and ``resblocks.23`` never reaches the UNet
_SD2_UNUSED_TE_LAYER = re.compile(r"_text_model_encoder_layers_23_")
_LORA_KINDS = ("lora", "lycoris")


def _dit_path(t: Target) -> str | None:
    comfy = t.name("comfy")
    return comfy[len("diffusion_model."):] if comfy and comfy.startswith("diffusion_model.") else None


def kohya_targets(targets: list[Target], *, conv: bool, family: str | None = None) -> list[Target]:
    """kohya's LoRA module set among ``targets``: UNet Transformer2D linears / 1×1 convs, TE attention and MLP
    linears; with ``conv`` also the resnet / down- / upsampler convs and ``time_emb_proj``. Flux / SD3 (component
    ``dit``): the Linear children of kohya's block classes (``lora_flux.py`` / ``lora_sd3.py``), whole fused
    weights (``qkv``, ``linear1``) as one module; their text encoders' CLIP attention / MLP and T5 attention /
    gated-MLP linears. SD2: not the 24th text-encoder layer (unused; kohya's SD2 text encoder has 23)."""
    out = []
    dit = _DIT.get(family or "")
    for t in targets:
        kname = t.name("kohya")
        if kname is None:
            continue
        if t.component == "unet":
            short = t.key[len(UNET_PREFIX):] if t.key.startswith(UNET_PREFIX) else t.key
            if len(t.shape) not in (2, 4):
                continue
            if _ATTN.search(short) or (conv and _RESNET.search(short)):
                out.append(t)
        elif t.component == "dit":
            path = _dit_path(t)
            if dit is not None and t.rows is None and len(t.shape) == 2 and path and dit.match(path):
                out.append(t)
        elif t.component.startswith("te") and (_TE.search(kname) or (dit is not None and _T5.search(kname))):
            if family == "sd2" and _SD2_UNUSED_TE_LAYER.search(kname):
                continue
            out.append(t)
    return out


def is_3x3(shape: tuple[int, ...]) -> bool:
    return len(shape) == 4 and shape[2] * shape[3] > 1


@dataclass
class ExtractResult:
    """What ``extract`` did (the ``--json`` record). ``modules``: one entry per module written - ``name``,
    ``rank``, ``rel_error`` (‖ΔW − ΔŴ‖_F / ‖ΔW‖_F with the factors as stored) and ``svd`` (full / randomised)."""

    operation: str
    tuned: Path
    base: Path
    output: Path
    family: str
    dry_run: bool = False
    rank: int = 0
    conv_rank: int | None = None
    text_encoders: bool = True
    te_max_diff: float = 0.0
    modules: list[dict] = field(default_factory=list)
    total_rel_error: float | None = None
    planned: int = 0
    bytes_out: int = 0
    warnings: list[str] = field(default_factory=list)


def _open_model(path: Path, what: str):
    from ckptlab.arch.identify import identify
    from ckptlab.ops.run import open_checked

    src = open_checked(Path(path))
    try:
        info = identify(src)
    except BaseException:
        src.close()
        raise
    if info.kind in _LORA_KINDS:
        src.close()
        raise MismatchError(f"the {what} model is a LoRA; extract takes two full models (tuned and base)", path)
    if info.family is None:
        src.close()
        raise MismatchError(f"the {what} model's family is not recognised", path)
    return src, info


def _quantile_clamp(up, down, q: float):
    """kohya's clamp: both factors to ±quantile(cat(up, down), q) of the *signed* values."""
    import numpy as np

    torch = import_torch("lora extract")
    vals = torch.cat([up.reshape(-1), down.reshape(-1)]).double().numpy()
    hi = float(np.quantile(vals, q))
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def extract(tuned: Path, base: Path, output: Path, *, rank: int, conv_rank: int | None = None,
            sv_fro: float | None = None, sv_ratio: float | None = None, clamp_quantile: float | None = None,
            min_diff: float = MIN_DIFF, dtype: str | None = None, overwrite: bool = False, dry_run: bool = False,
            progress: Progress = null_progress, cache: HashCache = NO_CACHE) -> ExtractResult:
    """Extract a kohya-named LoRA of ``tuned − base`` (both full models of one family) into ``output``."""
    from ckptlab.formats.dtypes import FLOAT_DTYPES, to_torch
    from ckptlab.lora.naming import targets_for
    from ckptlab.lora.write import factor_items, lora_metadata, write_lora
    from ckptlab.ops.stream import check_output

    svd.check_rank(rank)
    svd.check_rank(conv_rank, "--conv-rank")
    if sv_fro is not None and sv_ratio is not None:
        raise UsageError("give one of --sv-fro and --sv-ratio")
    method = "sv_fro" if sv_fro is not None else "sv_ratio" if sv_ratio is not None else None
    value = sv_fro if sv_fro is not None else sv_ratio
    svd.check_dynamic(method, value)
    if clamp_quantile is not None and not 0 < clamp_quantile <= 1:
        raise UsageError(f"--clamp-quantile must be in (0, 1], got {clamp_quantile:g}")
    if not min_diff >= 0:
        raise UsageError(f"--min-diff must be ≥ 0, got {min_diff:g}")
    from ckptlab.lora.bake import parse_dtype

    out_dtype = parse_dtype(dtype)
    output = Path(output)
    check_output(output, [Path(tuned), Path(base)], overwrite)
    torch = import_torch("lora extract")

    tsrc, tinfo = _open_model(tuned, "tuned")
    try:
        bsrc, binfo = _open_model(base, "base")
    except BaseException:
        tsrc.close()
        raise
    try:
        if tinfo.family != binfo.family:
            from ckptlab.arch.families import display_name

            raise MismatchError(f"the tuned model is {display_name(tinfo.family)}, the base is "
                                f"{display_name(binfo.family)}; extract needs two models of one family")
        family = binfo.family
        binfos = bsrc.infos()
        tinfos = tsrc.infos()
        table = targets_for(binfos, family)
        targets = kohya_targets(table.targets, conv=conv_rank is not None, family=family)
        targets = [t for t in targets if t.key in tinfos]
        if not targets:
            raise MismatchError("the two models share no weight a LoRA adapts")
        for t in targets:
            if tuple(tinfos[t.key].shape) != tuple(binfos[t.key].shape):
                raise MismatchError(f"{t.key} is {list(tinfos[t.key].shape)} in the tuned model and "
                                    f"{list(binfos[t.key].shape)} in the base")

        def real(src, infos, key: str):
            """The weight as the model uses it: ComfyUI scaled fp8 stores ``w / scale_weight`` (dequantised here)."""
            w = src.get(key).to(torch.float32)
            sk = key[: -len("weight")] + "scale_weight"
            if key.endswith(".weight") and sk in infos:
                w = w * src.get(sk).to(torch.float32)
            return w

        def delta(t: Target):
            a = real(tsrc, tinfos, t.key)
            b = real(bsrc, binfos, t.key)
            if t.rows is not None:
                a, b = a[t.rows[0]:t.rows[1]], b[t.rows[0]:t.rows[1]]
            return a - b

        result = ExtractResult(OPERATION, Path(tuned), Path(base), output, family,
                               dry_run=dry_run, rank=rank, conv_rank=conv_rank)
        te = [t for t in targets if t.component.startswith("te")]
        # SD1/SD2/SDXL: kohya's rule, all text encoders together; Flux/SD3: per text encoder (CLIP-L and T5 are
        # trained separately there - kohya trains T5 only on request - and a zero T5-XXL is 168 large SVDs)
        groups: dict[str, list[Target]] = {}
        for t in te:
            groups.setdefault(t.component if family in _DIT else "te", []).append(t)
        te_max = 0.0
        dropped: list[str] = []
        for comp, ts in groups.items():
            g_max = 0.0
            for t in ts:
                g_max = max(g_max, float(delta(t).abs().max()))
            te_max = max(te_max, g_max)
            if g_max <= min_diff:
                dropped.append(comp)
                what = "text encoders" if comp == "te" else f"text encoder {comp}"
                rest = "UNet only" if comp == "te" else "left out"
                result.warnings.append(f"{what} unchanged (max |ΔW| {g_max:.3g} ≤ --min-diff {min_diff:g}): {rest}")
        result.te_max_diff = te_max
        if dropped:
            targets = [t for t in targets if not (t.component.startswith("te")
                                                  and (t.component if family in _DIT else "te") in dropped)]
            result.text_encoders = any(t.component.startswith("te") for t in targets)
        # identical models give an all-zero LoRA: refuse (stops at the first weight that differs, so a real
        # fine-tune costs one tensor pair here)
        if not any(bool(torch.any(delta(t) != 0)) for t in targets):
            raise MismatchError("no adapted weight differs between the two models; a LoRA of them would be all "
                                "zeros")

        def cap_of(t: Target) -> int:
            m = t.shape[0]
            n = 1
            for s in t.shape[1:]:
                n *= s
            want = conv_rank if is_3x3(t.shape) and conv_rank is not None else rank
            return min(want, m, n)

        ranks: dict[str, int] = {}
        for t in targets:
            if method is None:
                ranks[t.key] = cap_of(t)
            else:
                mat = svd.as_matrix(delta(t))
                s = svd.svdvals(mat)
                ranks[t.key] = svd.dynamic_rank(s, method, value, cap_of(t), full_len=min(mat.shape))
                del mat, s

        items: list[Out] = []
        errors = svd.Errors()
        state: dict[str, object] = {}

        def factors(t: Target, odt: str):
            if state.get("target") is not t:
                d = delta(t)
                mat = svd.as_matrix(d)
                k = ranks[t.key]
                u, s, vh, used = svd.top_svd(mat, k, method="full" if method else "auto")
                up, down = svd.split(u, s, vh)
                if clamp_quantile is not None:
                    up, down = _quantile_clamp(up, down, clamp_quantile)
                tdt = to_torch(odt)
                up_c, down_c = up.to(tdt).contiguous(), down.to(tdt).contiguous()
                err = errors.add(mat, up_c.to(torch.float64) @ down_c.to(torch.float64))
                up_c, down_c = svd.to_layout(up_c, down_c, t.shape)
                result.modules.append({"name": t.name("kohya"), "key": t.key, "rank": k, "rel_error": err,
                                       "svd": used})
                state.update(target=t, up=up_c.contiguous(), down=down_c.contiguous())
            return state

        pairs = []
        linear_pairs = []
        for t in targets:
            name = t.name("kohya")
            k = ranks[t.key]
            bdt = binfos[t.key].dtype
            odt = out_dtype or (bdt if bdt in ("F32", "F16", "BF16") else "F16" if bdt in FLOAT_DTYPES else "F32")
            items += factor_items(name, t.shape, k, odt, float(k), lambda t=t, odt=odt: factors(t, odt))
            pairs.append((k, float(k)))
            if not is_3x3(t.shape):
                linear_pairs.append((k, float(k)))
        meta = lora_metadata(family, linear_pairs or pairs, title=output.stem,
                             network_module=_NETWORK_MODULE.get(family, "networks.lora"))
        if conv_rank is not None:
            meta["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_rank))})
        options = {"rank": rank, "conv_rank": conv_rank, "sv_fro": sv_fro, "sv_ratio": sv_ratio,
                   "clamp_quantile": clamp_quantile, "min_diff": min_diff, "dtype": out_dtype}
        options = {k: v for k, v in options.items() if v is not None}
        result.bytes_out = sum(i.info.nbytes for i in items)
        result.planned = len(items) // 3
        if dry_run:
            return result
        write_lora(output, items, meta, operation=OPERATION, inputs=[Path(tuned), Path(base)], options=options,
                   overwrite=overwrite, progress=progress, cache=cache)
        result.total_rel_error = errors.total
        return result
    finally:
        tsrc.close()
        bsrc.close()
