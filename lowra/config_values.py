"""Typed reading of configuration values (``LowRAConfig`` and the methods' own option classes).

Each reader returns the value as a plain Python type or raises a ValueError that names the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["LOW_BITS_INIT_KEYS", "integer", "json_safe", "low_bits_init", "names", "number", "string"]

#: The keys of ``LowRAConfig.low_bits_init``.
LOW_BITS_INIT_KEYS = ("below", "loftq_iters", "init_codebooks")


def integer(name: str, value: Any) -> int:
    try:
        ok = not isinstance(value, bool) and float(value) == int(value)
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def number(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if name != "bits" and not math.isfinite(out):  # bits: NaN fails the budget range check, naming it
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    return value


def low_bits_init(value: Any) -> dict[str, Any]:
    """``low_bits_init`` as a plain dict with exactly :data:`LOW_BITS_INIT_KEYS`, typed."""
    if not isinstance(value, Mapping):
        raise ValueError(f"quant.low_bits_init must be null or a mapping with keys {list(LOW_BITS_INIT_KEYS)}, "
                         f"got {value!r}")
    value = {str(k): v for k, v in value.items()}
    if set(value) != set(LOW_BITS_INIT_KEYS):
        raise ValueError(f"quant.low_bits_init needs exactly the keys {list(LOW_BITS_INIT_KEYS)}, got {sorted(value)}")
    return {"below": number("quant.low_bits_init.below", value["below"]),
            "loftq_iters": integer("quant.low_bits_init.loftq_iters", value["loftq_iters"]),
            "init_codebooks": string("quant.low_bits_init.init_codebooks", value["init_codebooks"])}


def names(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a list of module names, got {value!r}")
    out = tuple(value)
    if not all(isinstance(v, str) for v in out):
        raise ValueError(f"{name} must be a list of module names (strings), got {value!r}")
    return out


def json_safe(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(json_safe(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and json_safe(v) for k, v in value.items())
    return False
