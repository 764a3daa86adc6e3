"""Type and range checks shared by every config dataclass: a bad setting fails where it is set.

Each check returns the (normalised) value or raises ``TypeError`` / ``ValueError`` naming the config,
the field, what it got and what it accepts. Booleans are never accepted as numbers, NaN and infinities
are refused unless asked for, and strings are never taken as sequences of names.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any


def _where(owner: str, name: str) -> str:
    return f"{owner}.{name}" if owner else name


def check_float(owner: str, name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False, allow_inf: bool = False) -> float:
    """A real number (not bool, finite unless ``allow_inf``) in [lo, hi] (open ends if asked)."""
    where = _where(owner, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{where} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{where} must be {'<' if hi_open else '<='} {hi}, got {value!r}")
    return v


def check_int(owner: str, name: str, value: Any, *, lo: int | None = None, hi: int | None = None) -> int:
    """An integer (not bool; a float is refused even when whole, so ``2.5`` and ``2.0`` both fail)."""
    where = _where(owner, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where} must be an integer, got {type(value).__name__} {value!r}")
    v = int(value)
    if lo is not None and v < lo:
        raise ValueError(f"{where} must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{where} must be <= {hi}, got {v}")
    return v


def check_bool(owner: str, name: str, value: Any) -> bool:
    """A real bool (``"no"``, ``0`` or ``None`` are refused: they read ambiguously)."""
    if not isinstance(value, bool):
        raise TypeError(f"{_where(owner, name)} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> Any:
    """One of ``choices``."""
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"{_where(owner, name)} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value


def check_str_tuple(owner: str, name: str, value: Any) -> tuple[str, ...]:
    """A sequence of strings as a tuple; a bare string is refused (it would split into characters)."""
    where = _where(owner, name)
    if isinstance(value, str):
        raise TypeError(f"{where} must be a list or tuple of strings, got the string {value!r} "
                        f"(write ({value!r},) for a single entry)")
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{where} must be a list or tuple of strings, got {type(value).__name__}") from None
    bad = [v for v in items if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{where} must hold strings only, got {bad[0]!r}")
    return items


def check_float_tuple(owner: str, name: str, value: Any, *, length: int | None = None,
                      lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> tuple[float, ...]:
    """A sequence of finite numbers (each in range) as a tuple of floats, of ``length`` if given."""
    where = _where(owner, name)
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{where} must be a list or tuple of numbers, got {type(value).__name__} {value!r}")
    items = tuple(value)
    if length is not None and len(items) != length:
        raise ValueError(f"{where} must have {length} entries, got {len(items)}")
    return tuple(check_float(owner, f"{name}[{i}]", v, lo=lo, hi=hi, lo_open=lo_open) for i, v in enumerate(items))


def check_seed(owner: str, name: str, value: Any) -> int:
    """A seed torch accepts: an integer in [0, 2**63 - 1]."""
    return check_int(owner, name, value, lo=0, hi=2**63 - 1)
