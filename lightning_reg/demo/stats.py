"""Statistics of the ablation: confidence intervals, paired tests and strength selection.

- :func:`mean_ci`: mean and the half-width of the 95 % Student-t confidence interval over seeds.
- :func:`paired_difference`: technique − baseline on the same seeds (same split, same
  initialisation), the CI of the mean difference and the two-sided paired t-test p-value.
- :func:`select_strength`: the strength with the best mean *selection* metric (a validation
  metric); it never sees any other metric, so the test split cannot leak into the choice.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["ALPHA", "mean_ci", "paired_difference", "select_strength"]

#: Significance level of the paired test (the table marks p < ALPHA with ``*``).
ALPHA = 0.05


def _finite(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """``(mean, half-width)`` of the Student-t confidence interval of the mean.

    NaN values are dropped. One value gives a NaN half-width; none gives ``(nan, nan)``.
    """
    from scipy import stats

    xs = _finite(values)
    if not xs:
        return math.nan, math.nan
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return mean, math.nan
    sem = statistics.stdev(xs) / math.sqrt(len(xs))
    return mean, float(stats.t.ppf(0.5 + confidence / 2, len(xs) - 1)) * sem


def paired_difference(
    values: Sequence[float], baseline: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float]:
    """``(mean difference, CI half-width, p-value)`` of ``values − baseline``, paired by seed.

    The p-value is the two-sided paired t-test (``scipy.stats.ttest_rel``). With fewer than two
    pairs it is NaN; when every difference is the same, it is 1.0 for all-zero differences and
    NaN otherwise (zero variance: the test is undefined, so no significance is claimed).
    """
    from scipy import stats

    pairs = [
        (float(a), float(b))
        for a, b in zip(values, baseline)
        if math.isfinite(float(a)) and math.isfinite(float(b))
    ]
    diffs = [a - b for a, b in pairs]
    mean, half = mean_ci(diffs, confidence)
    if len(pairs) < 2:
        return mean, half, math.nan
    if max(diffs) == min(diffs):
        return mean, 0.0, 1.0 if diffs[0] == 0 else math.nan
    p = float(stats.ttest_rel([a for a, _ in pairs], [b for _, b in pairs]).pvalue)
    return mean, half, p


def select_strength(
    runs: Mapping[Any, Sequence[Mapping[str, float]]], key: str, mode: str = "max"
) -> Any:
    """The strength whose runs have the best mean ``key`` (``mode`` ``"max"`` or ``"min"``).

    Args:
        runs: strength → the metric dicts of its runs (one per seed).
        key: the selection metric, a validation metric such as ``"val_acc"``.
        mode: ``"max"`` or ``"min"``.

    Ties go to the first strength in ``runs``' order. Strengths whose runs lack ``key`` are
    ignored; if none has it, the first strength is returned.

    Raises:
        ValueError: for an empty ``runs`` or a bad ``mode``.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"`mode` must be 'max' or 'min', got {mode!r}")
    if not runs:
        raise ValueError("`runs` must hold at least one strength")
    best, best_value = next(iter(runs)), math.nan
    for strength, metrics in runs.items():
        value = mean_ci([m.get(key, math.nan) for m in metrics])[0]
        if math.isnan(value):
            continue
        better = value > best_value if mode == "max" else value < best_value
        if math.isnan(best_value) or better:
            best, best_value = strength, value
    return best
