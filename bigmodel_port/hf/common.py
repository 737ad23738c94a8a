"""Config-translation helpers shared by the architecture modules."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from reference_numpy.configs import ConfigFieldError

C = TypeVar("C")

# HF activation names -> ours. "gelu" is the exact erf GELU; "gelu_new" / "gelu_pytorch_tanh"
# are the tanh approximation (a different function: the classic porting bug).
ACTIVATIONS_FROM_HF = {
    "gelu": "gelu", "gelu_python": "gelu",
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "relu": "relu", "silu": "silu", "swish": "silu", "tanh": "tanh",
}
ACTIVATIONS_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu", "tanh": "tanh"}


def activation_from_hf(name: str, field: str) -> str:
    """Our activation name for HF's ``name`` (read from config field ``field``)."""
    try:
        return ACTIVATIONS_FROM_HF[name]
    except KeyError:
        raise ValueError(f"config.json {field}={name!r} is not supported; supported: "
                         f"{sorted(ACTIVATIONS_FROM_HF)}") from None


def build_config(cls: type[C], fields: dict[str, Any], hf: dict[str, Any], hf_keys: Mapping[str, str],
                 model_type: str) -> C:
    """``cls(**fields)``; a value the config refuses is reported by its ``config.json`` key.

    ``hf_keys`` maps our field names to the HF keys they are read from (the family's table); a
    field derived from several keys or fixed by the architecture has no entry and is reported
    under our own name. The error stays a ``ValueError``, as every other config.json refusal.
    """
    def source(field: str) -> str:
        key = hf_keys.get(field)
        if key is None:
            return f"(derived {field}={fields.get(field)!r})"
        if key not in hf:
            return f"{key} (absent, default {fields.get(field)!r})"
        return f"{key}={hf[key]!r}"

    try:
        return cls(**fields)
    except ConfigFieldError as err:
        raise ValueError(f"{model_type} config.json: {', '.join(map(source, err.fields))}: {err}") from None


def require(hf: dict[str, Any], key: str, default: Any = ..., *, model_type: str) -> Any:
    """``hf[key]``, the default, or a clear error naming the missing field."""
    if key in hf and hf[key] is not None:
        return hf[key]
    if default is ...:
        raise ValueError(f"{model_type} config.json has no {key!r}")
    return default


def unsupported(hf: dict[str, Any], key: str, allowed: Any, default: Any, model_type: str) -> None:
    """Refuse a config feature we do not implement (instead of silently computing another model)."""
    value = hf.get(key, default)
    ok = value in allowed if isinstance(allowed, (tuple, list, set)) else value == allowed
    if not ok:
        raise ValueError(f"{model_type} config.json {key}={value!r} is not supported (supported: {allowed!r})")


def dtype_from_hf(hf: dict[str, Any]) -> str:
    """Parameter dtype: float32 unless the checkpoint says float64. bfloat16 / float16 weights load
    as float32 (NumPy has neither; the conversion is exact)."""
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return "float64" if name == "float64" else "float32"


def num_labels_from_hf(hf: dict[str, Any], default: int = 2) -> Any:
    """The number of labels: ``id2label``'s length, else ``num_labels`` as written (the config
    class refuses one that is not an int > 0; ``int()`` here would round 2.5 to 2 silently)."""
    if hf.get("id2label"):
        return len(hf["id2label"])
    return hf.get("num_labels", default)


def merge_hf(base: dict[str, Any] | None, ours: dict[str, Any]) -> dict[str, Any]:
    """The HF config to write: the original config.json (keeping fields we do not model, such as
    ``id2label`` or generation ids) updated with every field our config determines."""
    out = dict(base or {})
    out.update(ours)
    return out
