"""Every public constructor against hostile values: NaN, ±inf, negative, zero, huge, wrong types
and empty containers. Each value must raise ``ValueError`` or ``TypeError`` naming the argument,
unless the docs say the value is meaningful (the ``valid`` predicate of each row)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lightning_reg as lr
from lightning_reg.augmentation import GaussianNoise


def real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def integer(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def at_least(x: Any, low: int) -> bool:
    return integer(x) and x >= low


# (argument name, constructor taking the value, when the value is meaningful)
ROWS: list[tuple[str, Callable[[Any], Any], Callable[[Any], bool]]] = [
    ("strength", lambda v: lr.L2Callback(v), lambda v: real(v) and v >= 0),
    ("strength", lambda v: lr.L1Callback(v, proximal=True), lambda v: real(v) and v >= 0),
    ("l1", lambda v: lr.ElasticNetCallback(v, 0.1), lambda v: real(v) and v >= 0),
    ("l2", lambda v: lr.ElasticNetCallback(0.1, v), lambda v: real(v) and v >= 0),
    ("max_norm", lambda v: lr.MaxNormCallback(v), lambda v: real(v) and v > 0),
    ("max_norm", lambda v: lr.WeightConstraintCallback(max_norm=v), lambda v: real(v) and v > 0),
    ("p", lambda v: lr.DropoutCallback(v), lambda v: real(v) and 0 <= v < 1),
    (
        "p",
        lambda v: lr.DataAugmentationCallback(GaussianNoise(0.1), p=v),
        lambda v: real(v) and 0 <= v <= 1,
    ),
    ("std", lambda v: GaussianNoise(v), lambda v: real(v) and v >= 0),
    ("alpha", lambda v: lr.MixUpCallback(v, num_classes=3), lambda v: real(v) and v > 0),
    ("alpha", lambda v: lr.CutMixCallback(v, num_classes=3), lambda v: real(v) and v > 0),
    (
        "num_classes",
        lambda v: lr.MixUpCallback(0.2, num_classes=v),
        lambda v: at_least(v, 1),
    ),
    (
        "mixup_alpha",
        lambda v: lr.MixUpCutMixCallback(mixup_alpha=v, num_classes=3),
        lambda v: real(v) and v >= 0,
    ),
    (
        "label_smoothing",
        lambda v: lr.MixUpCallback(0.2, num_classes=3, label_smoothing=v),
        lambda v: real(v) and 0 <= v <= 1,
    ),
    ("alpha", lambda v: lr.LabelSmoothingCallback(v), lambda v: real(v) and 0 <= v <= 1),
    (
        "patience",
        lambda v: lr.EarlyStoppingCallback("m", patience=v),
        lambda v: integer(v) and v >= 0,
    ),
    (
        "min_delta",
        lambda v: lr.EarlyStoppingCallback("m", min_delta=v),
        lambda v: real(v) and v >= 0,
    ),
    (
        "start_from_epoch",
        lambda v: lr.EarlyStoppingCallback("m", start_from_epoch=v),
        lambda v: integer(v) and v >= 0,
    ),
    (
        "stopping_threshold",
        lambda v: lr.EarlyStoppingCallback("m", stopping_threshold=v),
        lambda v: v is None or real(v),
    ),
    (
        "divergence_threshold",
        lambda v: lr.EarlyStoppingCallback("m", divergence_threshold=v),
        lambda v: v is None or real(v),
    ),
    (
        "baseline",
        lambda v: lr.EarlyStoppingCallback("m", baseline=v),
        lambda v: v is None or real(v),
    ),
    ("virtual_batch_size", lambda v: lr.GhostBatchNormCallback(v), lambda v: integer(v) and v >= 1),
    ("num_batches", lambda v: lr.PreciseBatchNormCallback(v), lambda v: integer(v) and v >= 1),
    ("eps", lambda v: lr.GhostBatchNorm1d(2, eps=v), lambda v: real(v) and v > 0),
    (
        "momentum",
        lambda v: lr.GhostBatchNorm1d(2, momentum=v),
        lambda v: v is None or (real(v) and 0 <= v <= 1),
    ),
    ("survival_prob", lambda v: lr.StochasticDepthCallback(v), lambda v: real(v) and 0 < v <= 1),
    (
        "every_n_steps",
        lambda v: lr.RegularizationMonitorCallback(v),
        lambda v: v is None or (integer(v) and v >= 1),
    ),
    (
        "jacobian_projections",
        lambda v: _jacobian(v),
        lambda v: v == "exact" or (integer(v) and v >= 1),
    ),
    ("jacobian_weight", lambda v: _jacobian_weight(v), lambda v: real(v) and v >= 0),
]


def _jacobian(n: Any) -> None:
    class Holder(lr.JacobianPenaltyMixin):
        pass

    Holder().jacobian_projections = n  # the same check as jacobian_penalty(n_projections=...)
    if isinstance(n, int) and n <= 4:
        x = torch.randn(2, 3, requires_grad=True)
        lr.jacobian_penalty(x, x * 2, n_projections=n)


def _jacobian_weight(w: Any) -> None:
    class Holder(lr.JacobianPenaltyMixin):
        pass

    Holder().jacobian_weight = w


IDS = [f"{row[0]}-{i}" for i, row in enumerate(ROWS)]

HOSTILE = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0, 0.0, -0.0, -1, 1, 2, 1e300, -1e300, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**6), 10**6),
    st.sampled_from(["0.1", "", None, [], (), {}, True, False, object(), "exact"]),
)


@pytest.mark.parametrize(
    "name, build, valid", ROWS, ids=[f"{r[0]}-{i}" for i, r in enumerate(ROWS)]
)
@settings(max_examples=60, deadline=None)
@given(value=HOSTILE)
def test_constructor_rejects_or_accepts_exactly_the_documented_values(name, build, valid, value):
    if valid(value):
        build(value)
        return
    with pytest.raises((ValueError, TypeError)) as info:
        build(value)
    if name != "survival_prob":  # StochasticDepthCallback names it survival_prob_last
        assert name in str(info.value), f"message does not name `{name}`: {info.value}"
    else:
        assert "survival_prob" in str(info.value)
