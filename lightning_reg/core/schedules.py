"""Schedules of a hyperparameter over training.

A schedule maps training progress to a value. Each schedule counts either epochs or optimizer
steps (``unit="epoch"`` or ``"step"``); callbacks call :meth:`Schedule.value` with both counters
and the schedule picks the one it uses. Schedules are plain, picklable objects with full type
hints, so they load from a LightningCLI YAML.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

from lightning_reg.core.validation import check_choice, check_finite, check_int


class Schedule:
    """Base class: a value as a function of the epoch or the optimizer step.

    Args:
        unit: ``"epoch"`` or ``"step"``: which counter drives the schedule.

    Raises:
        ValueError: for an unknown unit.

    Example:
        >>> LinearSchedule(0.0, 0.4, duration=4, unit="step").value(epoch=0, step=2)
        0.2
    """

    def __init__(self, unit: str = "epoch") -> None:
        self.unit = check_choice("unit", unit, ("epoch", "step"))

    def at(self, t: int) -> float:  # pragma: no cover - abstract
        """The value at counter ``t`` (epochs or steps, as ``unit`` says)."""
        raise NotImplementedError

    def value(self, *, epoch: int, step: int) -> float:
        """The value for the current epoch and global optimizer step."""
        return self.at(epoch if self.unit == "epoch" else step)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class ConstantSchedule(Schedule):
    """Always ``value``.

    Example:
        >>> ConstantSchedule(0.1).at(100)
        0.1
    """

    def __init__(self, value: float, unit: str = "epoch") -> None:
        super().__init__(unit)
        self.value_ = check_finite("value", value)

    def at(self, t: int) -> float:
        return self.value_


class LinearSchedule(Schedule):
    """Linear ramp from ``start`` to ``end`` over ``duration`` units, then flat at ``end``.

    Args:
        start: value at ``t = 0``.
        end: value at ``t >= duration``.
        duration: length of the ramp, in units (>= 1).
        unit: ``"epoch"`` or ``"step"``.

    Example:
        >>> LinearSchedule(0.0, 1.0, duration=4).at(1)
        0.25
    """

    def __init__(self, start: float, end: float, duration: int, unit: str = "epoch") -> None:
        super().__init__(unit)
        self.start = check_finite("start", start)
        self.end = check_finite("end", end)
        self.duration = check_int("duration", duration, minimum=1)

    def at(self, t: int) -> float:
        frac = min(max(t, 0) / self.duration, 1.0)
        return self.start + (self.end - self.start) * frac


class CosineSchedule(LinearSchedule):
    """Half-cosine from ``start`` to ``end`` over ``duration`` units, then flat at ``end``.

    Args:
        start: value at ``t = 0``.
        end: value at ``t >= duration``.
        duration: length of the ramp, in units (>= 1).
        unit: ``"epoch"`` or ``"step"``.

    Example:
        >>> round(CosineSchedule(1.0, 0.0, duration=2).at(1), 6)
        0.5
    """

    def at(self, t: int) -> float:
        frac = min(max(t, 0) / self.duration, 1.0)
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * frac))


class StepSchedule(Schedule):
    """Piecewise constant: ``values[i]`` from ``boundaries[i-1]`` on (``values[0]`` before).

    Args:
        values: one more value than boundaries.
        boundaries: strictly increasing counters where the value changes.

    Raises:
        ValueError: if the lengths do not match or boundaries are not increasing.

    Example:
        >>> StepSchedule([0.5, 0.0], boundaries=[3]).at(3)
        0.0
    """

    def __init__(
        self, values: Sequence[float], boundaries: Sequence[int], unit: str = "epoch"
    ) -> None:
        super().__init__(unit)
        self.values = [check_finite(f"values[{i}]", v) for i, v in enumerate(values)]
        self.boundaries = [check_int(f"boundaries[{i}]", b, 0) for i, b in enumerate(boundaries)]
        if len(self.values) != len(self.boundaries) + 1:
            raise ValueError(
                f"`values` must have len(boundaries) + 1 = {len(self.boundaries) + 1} entries, "
                f"got {len(self.values)}"
            )
        if any(b >= c for b, c in zip(self.boundaries, self.boundaries[1:])):
            raise ValueError(f"`boundaries` must be strictly increasing, got {self.boundaries}")

    def at(self, t: int) -> float:
        return self.values[bisect.bisect_right(self.boundaries, t)]


class CallableSchedule(Schedule):
    """Wrap a user function ``fn(t) -> float``.

    Raises:
        TypeError: if ``fn`` is not callable.

    Example:
        >>> CallableSchedule(lambda epoch: 0.1 * 0.5**epoch).at(2)
        0.025
    """

    def __init__(self, fn: Callable[[int], float], unit: str = "epoch") -> None:
        super().__init__(unit)
        if not callable(fn):
            raise TypeError(f"`fn` must be callable, got {fn!r}")
        self.fn = fn

    def at(self, t: int) -> float:
        return check_finite("schedule value", self.fn(t))


def as_schedule(
    spec: float | Schedule | Callable[[int], float], name: str = "schedule"
) -> Schedule:
    """Turn a number, a :class:`Schedule` or a callable into a :class:`Schedule`.

    Raises:
        TypeError: if ``spec`` is none of these.
        ValueError: if ``spec`` is a non-finite number.
    """
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return ConstantSchedule(check_finite(name, spec))
    if callable(spec):
        return CallableSchedule(spec)
    raise TypeError(f"`{name}` must be a number, a Schedule or a callable, got {spec!r}")
