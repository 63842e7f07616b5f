"""The value checks every schema runs on creation: a choice among names, a number within a range."""

from __future__ import annotations

import operator
from typing import Any


def one_of(name: str, value: Any, valid: tuple[str, ...]) -> None:
    """ValueError naming the key, its value and the valid choices unless ``value`` is one of them."""
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of: {', '.join(valid)}")


def in_range(
    name: str,
    value: float | None,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> None:
    """ValueError naming the key, its value and the allowed range (``>= 1``, ``in [0, 1)``) unless ``value`` lies
    in it; None (an optional knob left unset) passes."""
    bounds = [(op, bound) for op, bound in ((">=", ge), (">", gt), ("<=", le), ("<", lt)) if bound is not None]
    if value is None or all(_COMPARE[op](value, bound) for op, bound in bounds):
        return
    if len(bounds) == 2:
        (low_op, low), (high_op, high) = bounds
        allowed = f"in {'[' if low_op == '>=' else '('}{low:g}, {high:g}{']' if high_op == '<=' else ')'}"
    else:
        allowed = f"{bounds[0][0]} {bounds[0][1]:g}"
    raise ValueError(f"{name}={value} must be {allowed}")


_COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
