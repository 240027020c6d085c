"""Reading guidance settings from plain mappings (the resolved Hydra config), with errors that name
the config key and say how to fix it. No Hydra or OmegaConf here: `erg/` imports torch only.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any, TypeVar

__all__ = ["GuidanceConfigError", "layer_range", "parse", "positive"]

T = TypeVar("T")


class GuidanceConfigError(ValueError):
    """A guidance setting the user can fix; the message names the key."""


def parse(cls: type[T], node: Mapping[str, Any] | None, path: str) -> T:
    """Build the config dataclass `cls` from `node`, naming unknown keys (with a close match)."""
    assert is_dataclass(cls)
    node = dict(node or {})
    allowed = [f.name for f in fields(cls)]
    unknown = [k for k in node if k not in allowed]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, allowed, n=1)
            hints.append(f"{path}.{key}" + (f" (did you mean {path}.{close[0]}?)" if close else ""))
        raise GuidanceConfigError(
            f"unknown guidance key(s): {', '.join(hints)}. Valid keys of {path}: {', '.join(allowed)}"
        )
    try:
        return cls(**node)
    except GuidanceConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise GuidanceConfigError(f"{path}: {err}") from err


def positive(value: float, key: str) -> float:
    if not (isinstance(value, int | float) and value > 0):
        raise GuidanceConfigError(f"{key} must be > 0, got {value!r}")
    return float(value)


def finite(value: float, key: str) -> float:
    if not (isinstance(value, int | float) and math.isfinite(value)):
        raise GuidanceConfigError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def layer_range(value: Any, key: str) -> range:
    """[l_min, l_max) from a two-element list; layers outside the model are checked by the sampler."""
    if not (isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int) for v in value)):
        raise GuidanceConfigError(f"{key} must be [l_min, l_max] (blocks l_min .. l_max - 1), got {value!r}")
    l_min, l_max = value
    if not 0 <= l_min < l_max:
        raise GuidanceConfigError(f"{key}=[{l_min}, {l_max}] needs 0 <= l_min < l_max (the range is [l_min, l_max))")
    return range(l_min, l_max)
