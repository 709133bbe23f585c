"""Argument checks, the one home of each (issue 27): integers, numbers and scalars
that may be traced.

One message format: ``ValueError("<name>: expected <what>, got <value!r>")``.
Checks of values that may be traced (inside ``jax.jit``) look at concrete values
only and let tracers pass (:func:`concrete`, :func:`is_traced`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NoReturn

import jax
import numpy as np

__all__ = [
    "is_traced",
    "concrete",
    "fail",
    "check_int",
    "check_number",
    "check_scalar",
    "check_count",
]


def is_traced(x: Any) -> bool:
    """Whether ``x`` is a tracer (an abstract value inside ``jax.jit`` or ``grad``)."""
    return isinstance(x, jax.core.Tracer)


def concrete(v: Any) -> np.ndarray | None:
    """``np.asarray(v)``, or None when ``v`` is traced (or not an array)."""
    if is_traced(v):
        return None
    try:
        return np.asarray(v)
    except Exception:  # pragma: no cover - exotic array types
        return None


def fail(name: str, what: str, value: Any) -> NoReturn:
    """Raises the one message format: ``<name>: expected <what>, got <value!r>``."""
    raise ValueError(f"{name}: expected {what}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def check_int(name: str, v: Any, lo: int = 1, hi: int | None = None, *, optional: bool = False):
    """``v`` as an ``int`` in ``lo..hi`` (``>= lo`` without ``hi``); bools are refused.
    ``optional``: None passes (and is returned)."""
    if optional and v is None:
        return None
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        rng = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
        fail(name, f"{'None or ' if optional else ''}an int {rng}", v)
    return int(v)


def check_number(name: str, v: Any, *, strict: bool = True, unit: str | None = None) -> float:
    """``v`` as a finite ``float`` > 0 (``strict``) or >= 0; bools are refused.
    ``unit`` is named in the message (``"pixel units"``)."""
    ok = isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
    if not (ok and math.isfinite(v) and (v > 0 if strict else v >= 0)):
        what = f"a finite number {'>' if strict else '>='} 0"
        fail(name, what + (f" ({unit})" if unit else ""), v)
    return float(v)


def check_scalar(name: str, v: Any, *, strict: bool = True) -> None:
    """A finite real scalar > 0 (``strict``) or >= 0, concrete or traced (unchecked)."""
    c = concrete(v)
    if c is None:
        return
    if c.ndim != 0 or not np.isfinite(c) or (c <= 0 if strict else c < 0):
        fail(name, f"a finite scalar {'>' if strict else '>='} 0", v)


def check_count(name: str, v: Any, lo: int = 1) -> None:
    """An integer scalar >= ``lo`` (a Python int or a 0-d integer array), concrete or
    traced (unchecked)."""
    c = concrete(v)
    if c is None:
        return
    if c.ndim != 0 or not np.issubdtype(c.dtype, np.integer) or c < lo:
        fail(name, f"an int >= {lo}", v)
