"""Turn result objects (dataclasses, paths, sets...) into JSON-ready values; one place for it."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from pathlib import PurePath
from typing import Any


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "to_dict"):
            return to_jsonable(obj.to_dict())
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(to_jsonable(v) for v in obj)
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, bytes):
        return obj.hex()
    return obj


#: The deepest nesting ckptlab decodes from an untrusted JSON text (metadata strings, configs, sidecars). Real
#: files nest a handful of levels (kohya ``ss_tag_frequency`` 2, A1111 ``sd_merge_models`` 3, diffusers configs 3);
#: serde_json, which the reference safetensors parser uses, stops at 128.
MAX_JSON_DEPTH = 64


class JSONDepthError(ValueError):
    """A JSON text nested deeper than the limit (a ``ValueError``, like every other malformed JSON)."""


def json_depth(obj: Any) -> int:
    """How deep lists and dicts nest in ``obj`` (a scalar is 0), walked without recursion."""
    deepest = 0
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            o = o.values()
        elif not isinstance(o, list):
            continue
        deepest = max(deepest, d)
        stack.extend((v, d + 1) for v in o if isinstance(v, (dict, list)))
    return deepest


def loads_limited(text: str | bytes, max_depth: int = MAX_JSON_DEPTH, **kw) -> Any:
    """``json.loads`` for untrusted text: nesting deeper than ``max_depth`` raises ``JSONDepthError`` (a
    ``ValueError``) instead of a ``RecursionError`` here, or later in whatever walks the decoded value."""
    try:
        obj = json.loads(text, **kw)
    except RecursionError:
        raise JSONDepthError(f"JSON nested more than {max_depth} levels deep") from None
    if isinstance(obj, (dict, list)) and json_depth(obj) > max_depth:
        raise JSONDepthError(f"JSON nested more than {max_depth} levels deep")
    return obj


def dumps(obj: Any, **kw) -> str:
    return json.dumps(to_jsonable(obj), ensure_ascii=False, **kw)
