"""Validation helpers shared by every technique.

Each ``check_*`` function returns the (converted) value or raises ``ValueError`` / ``TypeError``
with a message that names the argument, its allowed range and the value received. They reject
NaN and infinities explicitly: ``NaN < 0`` is ``False``, so a naive comparison lets NaN through.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Collection
from typing import Any

import torch


def check_finite(name: str, value: Any) -> float:
    """Return ``value`` as a float, rejecting NaN and ±inf.

    Raises:
        TypeError: if ``value`` is not a real number.
        ValueError: if ``value`` is NaN or infinite.
    """
    return check_range(name, value)


def check_range(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Return ``value`` as a finite float inside the given interval.

    Raises:
        TypeError: if ``value`` is not a real number.
        ValueError: if ``value`` is NaN, infinite or outside the interval.
    """
    scalar = isinstance(value, torch.Tensor) and value.numel() == 1  # a one-element tensor
    if not scalar and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"`{name}` must be a real number, got {value!r} ({type(value).__name__})")
    number = float(value)
    too_low = number < low if low_inclusive else number <= low
    too_high = number > high if high_inclusive else number >= high
    if not math.isfinite(number) or too_low or too_high:
        left = "[" if low_inclusive and math.isfinite(low) else "("
        right = "]" if high_inclusive and math.isfinite(high) else ")"
        raise ValueError(
            f"`{name}` must be a finite number in {left}{low:g}, {high:g}{right}, got {value!r}"
        )
    return number


def check_non_negative(name: str, value: Any) -> float:
    """Return ``value`` if it is a finite number ``>= 0``."""
    return check_range(name, value, 0.0, math.inf)


def check_positive(name: str, value: Any) -> float:
    """Return ``value`` if it is a finite number ``> 0``."""
    return check_range(name, value, 0.0, math.inf, low_inclusive=False)


def check_probability(
    name: str, value: Any, *, allow_zero: bool = True, allow_one: bool = True
) -> float:
    """Return ``value`` if it is a probability in [0, 1] (ends as requested)."""
    return check_range(name, value, 0.0, 1.0, low_inclusive=allow_zero, high_inclusive=allow_one)


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` if it is an integer (not a bool) inside ``[minimum, maximum]``.

    Raises:
        TypeError: if ``value`` is not an ``int``.
        ValueError: if ``value`` is out of range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)  # numpy integers become plain ints
    low = -math.inf if minimum is None else minimum
    high = math.inf if maximum is None else maximum
    if not low <= value <= high:
        raise ValueError(f"`{name}` must be in [{low}, {high}], got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``.

    Raises:
        ValueError: naming the allowed choices and the value received.
    """
    with contextlib.suppress(TypeError):  # an unhashable value is in no set or dict of choices
        if value in choices:
            return value
    allowed = ", ".join(repr(c) for c in choices)
    raise ValueError(f"`{name}` must be one of {allowed}; got {value!r}")
