"""Results are small frozen dataclasses; this is the one way they become JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np


def to_jsonable(value: Any) -> Any:
    """Convert a result (dataclass, array, mapping, sequence, scalar) to plain JSON types.

    Non-finite floats become ``null`` would hide a broken certificate, so they
    are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"`` instead.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "__array__") and not isinstance(value, (str, bytes)):
        arr = np.asarray(value)
        return to_jsonable(arr.item() if arr.ndim == 0 else arr.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """JSON text of a result, as ``--json`` prints it."""
    return json.dumps(to_jsonable(value), **kwargs)
