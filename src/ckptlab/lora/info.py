"""``info(path) -> LoraInfo``: what a LoRA / LyCORIS file is and what it adapts, from its header (docs/lora.md).

- format: the naming style of each module (kohya, PEFT, diffusers new / old, XLabs, ComfyUI) and the
  algorithm of each (lora, locon, loha, lokr, dora, oft, boft, glora, ia3, full, norm), with counts;
- family: from the keys (``arch.adapters.detect_adapter``), from ``ss_base_model_version`` and from
  ``modelspec.architecture``, each named, and the one ``identify`` settles on (metadata wins there); a
  disagreement is said;
- rank / alpha: one value, or "Dynamic" with the distribution (rank -> modules, alpha -> modules, α/r -> modules);
- coverage: UNet blocks (IN00-IN11 / MID / OUT00-OUT11 for SD-style UNets), Flux double / single blocks,
  text encoders (te1/te2/te3 with their model), 3x3 conv modules (LoCon), and the modules that match nothing
  in the family's reference layout (``lora.naming.reference_targets``);
- training: the kohya ``ss_*`` summary;
- trigger words: ``trigger_words(metadata)`` (rule below);
- ``sshs_model_hash``: checked against the SHA-256 of the file's bytes after the safetensors header.

Trigger-word rule (``trigger_words``): (1) the names of kohya's dataset folders in ``ss_dataset_dirs``
(``<repeats>_<name>``: kohya captions an uncaptioned image with ``<name>``, the instance token), most images ×
repeats first; (2) ``ss_output_name`` when it looks like a token (1-40 characters of letters, digits, ``_ - .``,
at least one letter, not a kohya default such as ``last``); (3) the tags of ``ss_tag_frequency`` (JSON
``{dataset: {tag: count}}``), stripped, empty ones dropped, counts summed across datasets, most frequent first
(ties in alphabetical order). A word found by several rules keeps its best rank and lists every source.
Hostile metadata costs bounded work: texts over ``MAX_TAG_JSON_CHARS`` are not parsed, at most ``MAX_TAGS``
tag entries are visited, tags over ``MAX_WORD_CHARS`` are dropped; malformed parts become notes.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: the largest ``ss_tag_frequency`` / ``ss_dataset_dirs`` text parsed (a real one is a few hundred KiB at most)
MAX_TAG_JSON_CHARS = 16 * 1024 * 1024
#: tag entries visited over all datasets (a real LoRA has a few thousand distinct tags)
MAX_TAGS = 200_000
#: dataset folders visited in ``ss_dataset_dirs``
MAX_DATASET_DIRS = 1000
#: a trigger word longer than this is no trigger word (dropped)
MAX_WORD_CHARS = 100
#: trigger words kept in a ``LoraInfo`` and in the catalog
MAX_TRIGGERS = 20
#: metadata values shown in the training summary are cut to this many characters
MAX_VALUE_CHARS = 500

#: the source names a trigger word can have
SRC_DATASET = "dataset folder"
SRC_OUTPUT = "output name"
SRC_TAGS = "tag frequency"

_TOKEN_RE = re.compile(r"^[\w.\-]{1,40}$")
_NOT_TOKENS = {"last", "lora", "model", "output", "untitled", "at-step", "network", "lokr", "loha", "locon"}

#: the ``ss_*`` keys of the training summary, in display order
TRAINING_KEYS = ("ss_base_model_version", "ss_sd_model_name", "ss_output_name", "ss_num_epochs", "ss_epoch",
                 "ss_steps", "ss_max_train_steps", "ss_resolution", "ss_optimizer", "ss_learning_rate",
                 "ss_unet_lr", "ss_text_encoder_lr", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                 "ss_network_args", "ss_num_train_images", "ss_num_reg_images", "ss_training_started_at",
                 "ss_training_finished_at", "ss_training_comment")

#: text-encoder names per family and component
_TE_NAMES = {
    "sd1": {"te1": "CLIP-L"}, "sd2": {"te1": "OpenCLIP-H"},
    "sdxl": {"te1": "CLIP-L", "te2": "CLIP-G"}, "sd3": {"te1": "CLIP-L", "te2": "CLIP-G", "te3": "T5-XXL"},
    "flux": {"te1": "CLIP-L", "te2": "T5-XXL", "te3": "T5-XXL"},
}


@dataclass
class TriggerWord:
    """One suggested trigger word: ``count`` = its total in ``ss_tag_frequency`` (0 when not a tag), ``sources``
    = the rules that found it (``dataset folder``, ``output name``, ``tag frequency``; a sidecar's words are
    ``civitai sidecar`` where the library lists them)."""

    word: str
    count: int = 0
    sources: list[str] = field(default_factory=list)


@dataclass
class ModuleInfo:
    name: str
    algo: str
    style: str
    component: str | None  # unet, dit, te1, te2, te3; None when unmatched and not recognisable by name
    block: str | None  # IN04 / MID / OUT05 / double 3 / single 12 / layer 5; None when unknown
    target: str | None  # the weight it adapts in the family's reference layout; None when unmatched/unchecked
    rank: int | None
    alpha: float | None
    scale: float
    conv: bool  # a k×k (k > 1) convolution


@dataclass
class LoraInfo:
    """Everything ``lora info`` reports about one LoRA file (the ``--json`` record; see the module docstring)."""

    path: str
    size: int
    kind: str  # lora / lycoris (identify)
    styles: dict[str, int]  # naming style -> modules
    algos: dict[str, int]  # algorithm -> modules
    modules: int
    family: str | None  # what identify settles on (metadata wins)
    family_name: str | None
    family_from: dict[str, str | None]  # keys / ss_base_model_version / modelspec.architecture -> family
    family_note: str | None  # when they disagree
    base_model: dict[str, str]  # ss_base_model_version, ss_sd_model_name, modelspec.architecture as found
    rank: int | str | None  # one rank, "Dynamic", or None (no module has one)
    alpha: float | str | None
    ranks: dict[str, int]  # rank -> modules ("none" for modules without a rank)
    alphas: dict[str, int]  # alpha -> modules ("none": no alpha, scale 1)
    scales: dict[str, int]  # α/r -> modules
    components: dict[str, int]  # unet/dit/te1/te2/te3 -> modules
    text_encoders: dict[str, str]  # te1 -> CLIP-L ...
    blocks: dict[str, int]  # IN04 / MID / OUT05 / double 0 / single 3 -> modules
    conv_modules: int  # k×k convolutions (LoCon)
    unmatched: list[str] | None  # None: the family has no reference layout to check against
    unmatched_total: int
    training: dict[str, Any]
    datasets: list[dict[str, Any]]
    triggers: list[TriggerWord]
    trigger_notes: list[str]
    hash_check: str  # matches / does not match (...) / absent / not checked (...)
    extras: int  # keys that are no module parameters
    warnings: list[str] = field(default_factory=list)
    module_list: list[ModuleInfo] = field(default_factory=list)


# -- trigger words ---------------------------------------------------------------------------------------------
def _parsed(value: Any, what: str, notes: list[str]) -> Any:
    """A metadata value as JSON: the already-decoded value, or the string decoded (bounded); None + a note on
    failure."""
    if value is None:
        return None
    if not isinstance(value, str):
        return value  # identify's parse_metadata already decoded it (the catalog keeps that form)
    if len(value) > MAX_TAG_JSON_CHARS:
        notes.append(f"{what}: {len(value):,} characters, over the {MAX_TAG_JSON_CHARS:,} read; ignored")
        return None
    from ckptlab.jsonable import loads_limited

    try:
        return loads_limited(value)
    except (ValueError, RecursionError):
        notes.append(f"{what}: not valid JSON; ignored")
        return None


def _clean_word(w: Any) -> str | None:
    if not isinstance(w, str):
        return None
    w = " ".join(w.split())  # strip, and runs of whitespace (newlines included) become one space
    if not w or len(w) > MAX_WORD_CHARS:
        return None
    return w


def _int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().isdigit() and len(v) < 19:
        return int(v)
    return None


def dataset_dirs(metadata: Mapping[str, Any], notes: list[str] | None = None) -> list[dict[str, Any]]:
    """``ss_dataset_dirs`` as ``[{folder, n_repeats, img_count, token}]`` (``token``: the name after kohya's
    ``<repeats>_`` prefix, None when the folder has no such prefix)."""
    notes = notes if notes is not None else []
    obj = _parsed(metadata.get("ss_dataset_dirs"), "ss_dataset_dirs", notes)
    if obj is None:
        return []
    if not isinstance(obj, dict):
        notes.append("ss_dataset_dirs: not a JSON object; ignored")
        return []
    out = []
    for i, (folder, v) in enumerate(obj.items()):
        if i >= MAX_DATASET_DIRS:
            notes.append(f"ss_dataset_dirs: more than {MAX_DATASET_DIRS} folders; the rest ignored")
            break
        v = v if isinstance(v, dict) else {}
        m = re.match(r"^(\d+)_(.+)$", str(folder).strip())
        out.append({"folder": str(folder)[:MAX_VALUE_CHARS], "n_repeats": _int(v.get("n_repeats")),
                    "img_count": _int(v.get("img_count")), "token": _clean_word(m.group(2)) if m else None})
    return out


def _output_token(name: Any) -> str | None:
    w = _clean_word(name)
    if w is None or not _TOKEN_RE.match(w) or not re.search(r"[^\W\d_]", w) or w.lower() in _NOT_TOKENS:
        return None
    return w


def trigger_words(metadata: Mapping[str, Any], limit: int = MAX_TRIGGERS,
                  notes: list[str] | None = None) -> list[TriggerWord]:
    """Suggested trigger words of a LoRA from its metadata, best first (the rule in the module docstring).
    ``metadata`` values may be the header's strings or already-decoded JSON (``identify``'s form). Never
    raises on malformed metadata; what was ignored is appended to ``notes``."""
    notes = notes if notes is not None else []
    ranked: dict[str, tuple[tuple, TriggerWord]] = {}  # casefolded word -> (rank key, entry)

    def add(word: str, key: tuple, source: str, count: int = 0) -> None:
        fold = word.casefold()
        have = ranked.get(fold)
        if have is None:
            ranked[fold] = (key, TriggerWord(word, count, [source]))
            return
        best, tw = have
        if source not in tw.sources:
            tw.sources.append(source)
        tw.count = max(tw.count, count)
        if key < best:
            ranked[fold] = (key, tw)

    dirs = dataset_dirs(metadata, notes)
    for i, d in enumerate(dirs):
        if d["token"]:
            weight = (d["img_count"] or 0) * (d["n_repeats"] or 1)
            add(d["token"], (0, -weight, i), SRC_DATASET)
    out_tok = _output_token(metadata.get("ss_output_name"))
    if out_tok:
        add(out_tok, (1, 0, 0), SRC_OUTPUT)

    counts: Counter[str] = Counter()
    spelled: dict[str, str] = {}
    freq = _parsed(metadata.get("ss_tag_frequency"), "ss_tag_frequency", notes)
    if freq is not None and not isinstance(freq, dict):
        notes.append("ss_tag_frequency: not a JSON object of datasets; ignored")
    elif isinstance(freq, dict):
        visited = 0
        bad = 0
        for tags in freq.values():
            if not isinstance(tags, dict):
                bad += 1
                continue
            for tag, n in tags.items():
                visited += 1
                if visited > MAX_TAGS:
                    break
                w, c = _clean_word(tag), _int(n)
                if w is None or c is None or c <= 0:
                    continue
                fold = w.casefold()
                counts[fold] += c
                spelled.setdefault(fold, w)
            if visited > MAX_TAGS:
                notes.append(f"ss_tag_frequency: more than {MAX_TAGS:,} tags; the rest ignored")
                break
        if bad:
            notes.append(f"ss_tag_frequency: {bad} dataset(s) not a JSON object of tag counts; ignored")
    # only the best ``limit`` tags can make the list: no need to sort them all
    for fold, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: limit + len(ranked)]:
        add(spelled[fold], (2, -c, fold), SRC_TAGS, c)
        ranked[fold][1].count = c
    return [tw for _, tw in sorted(ranked.values(), key=lambda kt: kt[0])][:limit]


# -- hash check ------------------------------------------------------------------------------------------------
def data_sha256(path: str | Path) -> str | None:
    """SHA-256 (lower case) of a safetensors file's bytes after its header (kohya's ``sshs_model_hash``,
    the full AutoV3), read in 1 MiB blocks; None when the file is no safetensors file."""
    import os

    from ckptlab.hashes import safetensors_data_offset

    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(9)
        start = safetensors_data_offset(head, size)
        if start is None:
            return None
        fh.seek(start)
        h = hashlib.sha256()
        while True:
            block = fh.read(1 << 20)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def check_model_hash(path: str | Path, stated: Any) -> str:
    """``matches``, ``does not match (…)``, ``absent`` or ``not checked (…)`` for ``sshs_model_hash``."""
    if stated is None or (isinstance(stated, str) and not stated.strip()):
        return "absent"
    if not isinstance(stated, str):
        return "does not match (sshs_model_hash is not a text)"
    want = stated.strip().lower()
    lyco = want.startswith("0x")
    want = want.removeprefix("0x")
    try:
        got = data_sha256(path)
    except OSError as e:
        return f"not checked (cannot read the file: {e.strerror or e})"
    if got is None:
        return "not checked (not a safetensors file)"
    if got == want:
        return "matches"
    why = f"the file's tensor data hashes to {got[:12]}…, the metadata says {want[:12]}…"
    if lyco:
        why += "; a 0x-prefixed value is LyCORIS's own per-tensor hash, not kohya's"
    elif not re.fullmatch(r"[0-9a-f]{64}", want):
        why = f"the metadata value is no SHA-256 ({len(want)} characters)"
    return f"does not match ({why})"


# -- modules ---------------------------------------------------------------------------------------------------
def _style(mod, keys: list[str]) -> str:
    k = " ".join(keys)
    if ".processor.qkv_lora" in k or ".processor.proj_lora" in k:
        return "xlabs"
    if ".lora_A." in k or ".lora_B." in k or k.endswith(".lora_magnitude_vector"):
        return "peft"
    if ".lora.down." in k or ".lora.up." in k or ".lora_linear_layer." in k:
        return "diffusers (new)"
    if "_lora.down.weight" in k or "_lora.up.weight" in k:
        return "diffusers (old)"
    if mod.name.startswith(("lora_", "oft_", "lycoris_")):
        return "kohya"
    if mod.name.startswith("diffusion_model."):
        return "comfy"
    return "other"


def _is_conv(lf, mod) -> bool:
    for role in ("down", "w1b", "k2", "diff", "b2"):
        if role in mod.params:
            shape = lf.source.info(mod.params[role]).shape
            if len(shape) == 4 and shape[2] * shape[3] > 1:
                return True
    return False


_LDM_BLOCK = re.compile(r"(?:^|[._])(input_blocks|middle_block|output_blocks)[._](\d+)")
_DIFF_BLOCK = re.compile(r"(?:^|[._])(down_blocks|mid_block|up_blocks)[._](?:(\d+)[._])?(attentions|resnets|"
                         r"downsamplers|upsamplers)[._](\d+)")
_FLUX_BLOCK = re.compile(r"(?:^|[._])(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks|"
                         r"joint_blocks)[._](\d+)")
_TE_LAYER = re.compile(r"(?:layers|resblocks|block)[._](\d+)")


def _unet_block(text: str) -> str | None:
    m = _LDM_BLOCK.search(text)
    if m:
        kind, n = m.group(1), int(m.group(2))
        return "MID" if kind == "middle_block" else f"{'IN' if kind == 'input_blocks' else 'OUT'}{n:02d}"
    m = _DIFF_BLOCK.search(text)
    if m:  # diffusers names with SD's 2 resnets per level (SD1/SD2/SDXL): the LDM block numbering
        kind, level, sub, j = m.group(1), int(m.group(2) or 0), m.group(3), int(m.group(4))
        if kind == "mid_block":
            return "MID"
        if kind == "down_blocks":
            return f"IN{3 * (level + 1):02d}" if sub == "downsamplers" else f"IN{3 * level + j + 1:02d}"
        return f"OUT{3 * level + 2:02d}" if sub == "upsamplers" else f"OUT{3 * level + j:02d}"
    return None


def _dit_block(text: str) -> str | None:
    m = _FLUX_BLOCK.search(text)
    if not m:
        return None
    kind = {"double_blocks": "double", "transformer_blocks": "double", "single_blocks": "single",
            "single_transformer_blocks": "single", "joint_blocks": "joint"}[m.group(1)]
    return f"{kind} {int(m.group(2))}"


_DIT_FAMILIES = ("flux", "sd3", "chroma", "auraflow", "lumina2", "hidream", "pixart", "hunyuan_dit")


def _component_by_name(name: str, family: str | None) -> str | None:
    """The component of a module from its name alone (families without a reference layout)."""
    u = name.replace(".", "_")
    if u.startswith(("lora_te2_", "text_encoder_2_")):
        return "te2"
    if u.startswith(("lora_te1_", "lora_te_", "text_encoder_")):
        return "te1"
    if u.startswith("lora_te3_"):
        return "te3"
    if _LDM_BLOCK.search(name) or _DIFF_BLOCK.search(name) or u.startswith("unet_"):
        return "unet"  # SD-style UNet names (their transformer_blocks sit inside attentions)
    if family in _DIT_FAMILIES or u.startswith(("transformer_", "lora_transformer_")) or \
            re.search(r"(?:^|_)(?:double_blocks|single_blocks|single_transformer_blocks|joint_blocks)_\d", u):
        return "dit"
    if u.startswith(("lora_unet_", "diffusion_model_")):
        return "unet"
    return None


def _block(component: str | None, target: str | None, name: str) -> str | None:
    if component in ("unet", "dit"):
        for text in (target, name):
            if text:
                b = _unet_block(text) if component == "unet" else _dit_block(text)
                if b:
                    return b
        return None
    if component and component.startswith("te"):
        m = _TE_LAYER.search(name)
        return f"layer {int(m.group(1))}" if m else None
    return None


def _block_order(b: str) -> tuple:
    m = re.match(r"^(IN|MID|OUT)(\d*)$", b)
    if m:
        return (0, ("IN", "MID", "OUT").index(m.group(1)), int(m.group(2) or 0))
    m = re.match(r"^(joint|double|single) (\d+)$", b)
    if m:
        return (1, ("joint", "double", "single").index(m.group(1)), int(m.group(2)))
    return (2, 0, 0)


def _num(x: float | None) -> str:
    if x is None:
        return "none"
    return str(int(x)) if float(x).is_integer() else f"{x:.6g}"


_COMPONENT_ORDER = {"unet": 0, "dit": 0, "te1": 1, "te2": 2, "te3": 3}


def _by_count(c: Counter) -> dict[str, int]:
    """Most modules first; ties by value (numbers numerically, "none" last)."""
    def value(k: str) -> tuple:
        try:
            return (0, float(k))
        except ValueError:
            return (1, 0.0)
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], value(kv[0]))))


def _family_from_metadata(metadata: Mapping[str, Any]) -> dict[str, str | None]:
    from ckptlab.arch.families import KOHYA_BASE, MODELSPEC_ARCH

    out: dict[str, str | None] = {}
    ver = metadata.get("ss_base_model_version")
    if isinstance(ver, str) and ver:
        hit = KOHYA_BASE.get(ver)
        out["ss_base_model_version"] = hit[0] if hit else ("sdxl" if ver.startswith("sdxl_") else None)
    arch = metadata.get("modelspec.architecture")
    if isinstance(arch, str) and arch:
        base = arch.partition("/")[0].strip().lower()
        hit = MODELSPEC_ARCH.get(base)
        if hit is None:
            hit = next((MODELSPEC_ARCH[p] for p in sorted(MODELSPEC_ARCH, key=len, reverse=True)
                        if base.startswith(p)), None)
        out["modelspec.architecture"] = hit[0] if hit else None
    return out


def _training(metadata: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in TRAINING_KEYS:
        v = metadata.get(k)
        if v is None or v == "" or v == "None":
            continue
        if k in ("ss_training_started_at", "ss_training_finished_at"):
            try:
                t = float(v)
                out[k] = _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
                continue
            except (TypeError, ValueError, OverflowError, OSError):
                pass
        if not isinstance(v, str):
            from ckptlab.jsonable import dumps

            v = dumps(v)
        out[k] = v if len(v) <= MAX_VALUE_CHARS else v[:MAX_VALUE_CHARS] + f"… [{len(v) - MAX_VALUE_CHARS} more]"
    return out


def info(path: str | Path) -> LoraInfo:
    """Everything ``ckptlab lora info`` says about one LoRA / LyCORIS file (module docstring). Reads the
    header, the 0-d alphas, and (for the hash check) the tensor bytes once, in blocks. Raises ``MismatchError``
    for a file that is no LoRA, the readers' ``FormatError`` / ``UnsafeFileError`` for unreadable or hostile files."""
    from ckptlab.arch.adapters import detect_adapter
    from ckptlab.arch.families import display_name
    from ckptlab.arch.identify import identify
    from ckptlab.errors import MismatchError
    from ckptlab.lora.file import LoraFile
    from ckptlab.lora.naming import reference_targets

    path = Path(path)
    with LoraFile.open(path) as lf:
        meta = lf.metadata
        ident = identify(lf.source)
        infos = lf.source.infos()
        guess = detect_adapter(infos)
        family = ident.family
        family_from: dict[str, str | None] = {"keys": guess.family if guess else None}
        family_from.update(_family_from_metadata(meta))
        found = {k: v for k, v in family_from.items() if v}
        note = None
        if len(set(found.values())) > 1:
            note = "disagree: " + ", ".join(f"{k} says {display_name(v)}" for k, v in found.items()) + \
                   f"; {display_name(family)} is used (metadata wins, as in identify)"
        try:
            table = reference_targets(family)
        except MismatchError:
            table = None

        mods: list[ModuleInfo] = []
        for mod in lf.modules.values():
            target = table.lookup(mod.name) if table is not None else None
            comp = target.component if target is not None else _component_by_name(mod.name, family)
            conv = _is_conv(lf, mod)
            algo = "locon" if mod.algo == "lora" and conv else mod.algo
            if mod.has_dora:
                algo = "dora" if algo == "lora" else f"{algo}+dora"
            rank = lf.rank(mod)
            try:
                alpha = lf.alpha(mod)
            except (MismatchError, ValueError, TypeError):
                alpha = None
            mods.append(ModuleInfo(
                name=mod.name, algo=algo, style=_style(mod, list(mod.params.values())), component=comp,
                block=_block(comp, target.key if target is not None else None, mod.name),
                target=target.key if target is not None else None, rank=rank, alpha=alpha,
                scale=(alpha / rank) if alpha is not None and rank else 1.0, conv=conv))
        extras = len(lf.extras)
    mods.sort(key=lambda m: m.name)

    ranks = Counter(str(m.rank) if m.rank is not None else "none" for m in mods)
    alphas = Counter(_num(m.alpha) for m in mods)
    scales = Counter(_num(m.scale) for m in mods)
    with_rank = {m.rank for m in mods if m.rank is not None}
    with_alpha = {m.alpha for m in mods}
    rank = next(iter(with_rank)) if len(with_rank) == 1 else ("Dynamic" if with_rank else None)
    alpha: float | str | None
    if len(with_alpha) == 1:
        a = next(iter(with_alpha))
        alpha = None if a is None else (int(a) if float(a).is_integer() else a)
    else:
        alpha = "Dynamic" if with_alpha else None
    blocks = Counter(m.block for m in mods if m.block and m.component in ("unet", "dit"))
    components = Counter(m.component or "unknown" for m in mods)
    te_names = _TE_NAMES.get(family or "", {})
    unmatched = None if table is None else [m.name for m in mods if m.target is None]

    notes: list[str] = []
    triggers = trigger_words(meta, notes=notes)
    datasets = dataset_dirs(meta)
    base = {k: str(meta[k])[:MAX_VALUE_CHARS] for k in ("ss_base_model_version", "ss_sd_model_name",
                                                        "modelspec.architecture") if meta.get(k)}
    warnings = list(ident.warnings)
    zero = sum(1 for m in mods if m.alpha == 0)
    if zero:
        warnings.append(f"{zero} module(s) with alpha 0: A1111, ComfyUI and kohya's merge apply them at scale 0 (no "
                        "effect), kohya's training loader as alpha = rank (scale 1)")
    for key, have, what in (("ss_network_dim", rank, "rank"), ("ss_network_alpha", alpha, "alpha")):
        stated = meta.get(key)
        if not isinstance(stated, str) or not stated.strip() or have is None:
            continue
        try:
            agrees = stated.strip() == "Dynamic" if have == "Dynamic" else float(stated) == float(have)
        except ValueError:
            agrees = False
        if not agrees:
            warnings.append(f"{key} says {stated.strip()[:40]!r} but the modules' {what} is {have}")
    return LoraInfo(
        path=str(path), size=path.stat().st_size, kind=ident.kind,
        styles=dict(Counter(m.style for m in mods).most_common()),
        algos=dict(Counter(m.algo for m in mods).most_common()), modules=len(mods),
        family=family, family_name=display_name(family) if family else None, family_from=family_from,
        family_note=note, base_model=base, rank=rank, alpha=alpha,
        ranks=_by_count(ranks), alphas=_by_count(alphas), scales=_by_count(scales),
        components=dict(sorted(components.items(), key=lambda kv: (_COMPONENT_ORDER.get(kv[0], 9), kv[0]))),
        text_encoders={c: te_names.get(c, "?") for c in sorted(components) if c.startswith("te")},
        blocks=dict(sorted(blocks.items(), key=lambda kv: _block_order(kv[0]))),
        conv_modules=sum(m.conv for m in mods),
        unmatched=unmatched[:200] if unmatched is not None else None,
        unmatched_total=len(unmatched) if unmatched is not None else 0,
        training=_training(meta), datasets=datasets, triggers=triggers, trigger_notes=notes,
        hash_check=check_model_hash(path, meta.get("sshs_model_hash")), extras=extras, warnings=warnings,
        module_list=mods)
