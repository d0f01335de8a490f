"""A LoRA / LyCORIS file read as modules: every adapted layer with its algorithm, parameter keys and alpha.

Key grammars (../shared/reference/adapters.md §1, §3, §4): kohya ``<module>.lora_down.weight`` /
``lora_up.weight`` / ``alpha`` (+ ``lora_mid.weight`` CP, ``dora_scale``); PEFT ``<module>.lora_A.weight`` /
``lora_B.weight`` (``.default`` variants, ``lora_magnitude_vector`` DoRA, alphas in the header's
``lora_adapter_metadata``); diffusers ``<module>.lora.down.weight``, ``lora_linear_layer.down.weight`` and the old
attention-processor form ``<attn>.processor.to_q_lora.down.weight``; XLabs ``processor.qkv_lora1.down.weight``;
LyCORIS ``hada_*`` (LoHa), ``lokr_*`` (LoKr), ``diff`` (full), ``w_norm`` (norm), ``oft_blocks`` (OFT/BOFT),
``a1/a2/b1/b2`` (GLoRA), ``weight`` + ``on_input`` (IA3).

Nothing here reads tensor data except 0-d alphas; everything else comes from the header.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ckptlab.errors import MismatchError
from ckptlab.formats.base import TensorInfo, TensorSource

#: parameter suffix -> role, longest first where one suffix ends another
_ROLES: tuple[tuple[str, str], ...] = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_mid.weight", "mid"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_B.bias", "up_bias"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_magnitude_vector", "dora"), (".dora_scale", "dora"), (".alpha", "alpha"),
    (".hada_w1_a", "w1a"), (".hada_w1_b", "w1b"), (".hada_w2_a", "w2a"), (".hada_w2_b", "w2b"),
    (".hada_t1", "t1"), (".hada_t2", "t2"),
    (".lokr_w1_a", "k1a"), (".lokr_w1_b", "k1b"), (".lokr_w2_a", "k2a"), (".lokr_w2_b", "k2b"),
    (".lokr_w1", "k1"), (".lokr_w2", "k2"), (".lokr_t2", "kt2"),
    (".diff_b", "diff_b"), (".diff", "diff"), (".w_norm", "w_norm"), (".b_norm", "b_norm"),
    (".oft_blocks", "oft"), (".rescale", "rescale"),
    (".a1.weight", "a1"), (".a2.weight", "a2"), (".b1.weight", "b1"), (".b2.weight", "b2"), (".bm.weight", "bm"),
    (".on_input", "on_input"),
)
#: old diffusers attention processors (``attn1.processor.to_q_lora.down.weight``: module ``attn1.processor.to_q``)
#: and XLabs Flux (``double_blocks.0.processor.qkv_lora1.down.weight``: module ``…processor.qkv_lora1``)
_PROCESSOR_RE = re.compile(r"^(.*?)_lora(\d*)\.(down|up)\.weight$")
#: algorithm by the roles a module has (first match wins)
_ALGOS: tuple[tuple[str, str], ...] = (("down", "lora"), ("w1a", "loha"), ("k1", "lokr"), ("k1a", "lokr"),
                                       ("diff", "full"), ("w_norm", "norm"), ("oft", "oft"), ("a1", "glora"),
                                       ("on_input", "ia3"))
#: key prefixes of things a LoRA file may carry besides modules (A1111 bundled embeddings)
_EXTRA_PREFIXES = ("bundle_emb.",)
PEFT_METADATA_KEY = "lora_adapter_metadata"


@dataclass
class LoraModule:
    """One adapted layer: ``name`` as the file spells it (parameter suffix removed), its ``algo`` and the file
    key of each parameter ``role`` (``down``, ``up``, ``alpha``, ``dora``, ``w1a``…)."""

    name: str
    algo: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def has_dora(self) -> bool:
        return "dora" in self.params


def split_key(key: str) -> tuple[str, str] | None:
    """``(module name, role)`` of one LoRA key, or None when the key is no LoRA parameter."""
    m = _PROCESSOR_RE.match(key)  # (needs ``_lora<digits>`` right before ``.down``: never ``.lora.down``)
    if m:
        name = m.group(1) + (f"_lora{m.group(2)}" if m.group(2) else "")
        return name, m.group(3)
    for suffix, role in _ROLES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None


class LoraFile:
    """A LoRA read as modules. ``source`` stays open (tensors are read on demand); ``extras`` are keys that are
    not module parameters (bundled embeddings, unknown keys)."""

    def __init__(self, source: TensorSource):
        self.source = source
        self.path = Path(source.path)
        self.metadata: dict[str, str] = dict(source.metadata)
        infos = source.infos()
        self.modules: dict[str, LoraModule] = {}
        self.extras: list[str] = []
        ia3 = {k[: -len(".on_input")] for k in infos if k.endswith(".on_input")}
        for key in infos:
            if key.startswith(_EXTRA_PREFIXES):
                self.extras.append(key)
                continue
            if key.endswith(".weight") and key[: -len(".weight")] in ia3:
                name, role = key[: -len(".weight")], "ia3"
            else:
                parsed = split_key(key)
                if parsed is None:
                    self.extras.append(key)
                    continue
                name, role = parsed
            mod = self.modules.setdefault(name, LoraModule(name, ""))
            mod.params[role] = key
        for mod in list(self.modules.values()):
            algo = next((a for role, a in _ALGOS if role in mod.params), None)
            if algo is None:  # an alpha or a dora_scale alone: nothing to apply
                del self.modules[mod.name]
                self.extras.extend(mod.params.values())
                continue
            if algo == "oft" and len(infos[mod.params["oft"]].shape) == 4:
                algo = "boft"
            mod.algo = algo
        if not self.modules:
            raise MismatchError("not a LoRA: no LoRA / LyCORIS module keys (lora_down/lora_up, lora_A/lora_B, "
                                "hada_*, lokr_* ...)", self.path)
        self._peft = _peft_alphas(self.metadata)
        self._alphas: dict[str, float | None] = {}

    @classmethod
    def open(cls, path: str | Path) -> LoraFile:
        from ckptlab.ops.run import open_checked

        return cls(open_checked(Path(path)))

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> LoraFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def info(self, mod: LoraModule, role: str) -> TensorInfo:
        return self.source.info(mod.params[role])

    def rank(self, mod: LoraModule) -> int | None:
        """The rank the loaders divide alpha by: ``lora_down.shape[0]`` (LoRA), ``hada_w1_b.shape[0]`` (LoHa),
        the factorised LoKr side's rank (``lokr_w2_b`` first, like ComfyUI); None when there is none."""
        p = mod.params
        for role in ("down", "w1b", "k2b", "k1b"):
            if role in p:
                shape = self.source.info(p[role]).shape
                return shape[0] if shape else None
        return None

    def alpha(self, mod: LoraModule) -> float | None:
        """The module's alpha: its ``alpha`` tensor, else the PEFT config in the header (``alpha_pattern``,
        ``lora_alpha``), else None (scale 1)."""
        if mod.name in self._alphas:
            return self._alphas[mod.name]
        a: float | None = None
        if "alpha" in mod.params:
            import numpy as np

            arr = np.asarray(self.source.array(mod.params["alpha"]), dtype=np.float64)
            if arr.size != 1:
                raise MismatchError(f"{mod.name}: alpha has {arr.size} values, expected one", self.path)
            a = float(arr.reshape(()))
            if not np.isfinite(a):
                raise MismatchError(f"{mod.name}: alpha is {a}, not a finite number", self.path)
        elif self._peft:
            a = self._peft(mod.name)
        self._alphas[mod.name] = a
        return a

    def scale(self, mod: LoraModule) -> float:
        """``alpha / rank`` as A1111 and ComfyUI apply it: no alpha ⇒ 1; LoKr with both factors full ⇒ 1;
        alpha 0 ⇒ 0 (docs/lora.md: a stored zero disables the module in A1111, ComfyUI and kohya's merge; only
        kohya's training loader reads it as alpha = rank)."""
        a = self.alpha(mod)
        r = self.rank(mod)
        if a is None or not r:
            return 1.0
        return a / r


def _peft_alphas(metadata: dict[str, str]):
    """A lookup ``module name -> alpha`` from diffusers' ``lora_adapter_metadata`` (PEFT LoraConfigs as JSON:
    ``lora_alpha``, ``alpha_pattern``; a pipeline's file prefixes each entry with its component, ``unet.lora_alpha``,
    ``text_encoder.alpha_pattern``), or None when the header has none."""
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return None
    from ckptlab.jsonable import loads_limited

    try:
        cfg = loads_limited(raw)  # header text of an untrusted file: bounded depth
    except ValueError:
        return None
    if not isinstance(cfg, dict):
        return None

    def number(v) -> float | None:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return None
        if not math.isfinite(v):
            raise MismatchError(f"lora_adapter_metadata holds the alpha {v!r}, not a finite number")
        return float(v)

    def matches(pat: str, inner: str) -> bool:
        # PEFT ``get_pattern_key``: the pattern is a regex matched at the end of the module name, on a dot
        try:
            return re.match(rf"(.*\.)?({pat})$", inner) is not None
        except re.error:
            return inner == pat or inner.endswith("." + pat)

    def lookup(name: str) -> float | None:
        comp, _, rest = name.partition(".")
        for prefix, inner in ((comp + ".", rest), ("", name)):
            pattern = cfg.get(prefix + "alpha_pattern")
            if isinstance(pattern, dict):
                for pat, val in pattern.items():  # the first matching pattern wins, as in PEFT
                    if isinstance(pat, str) and number(val) is not None and matches(pat, inner):
                        return number(val)
            alpha = number(cfg.get(prefix + "lora_alpha"))
            if alpha is not None:
                return alpha
        return None

    return lookup
