"""Statistics of the main job against scipy, and strength selection on validation only."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch
from scipy import stats as scipy_stats

from lightning_reg.demo import techniques as registry
from lightning_reg.demo.ablation import AblationConfig, run_ablation
from lightning_reg.demo.stats import mean_ci, paired_difference, select_strength

VALUES = [0.61, 0.655, 0.632, 0.598, 0.641]
BASE = [0.60, 0.62, 0.63, 0.57, 0.62]


def test_mean_ci_is_scipy_t_interval():
    mean, half = mean_ci(VALUES)
    low, high = scipy_stats.t.interval(
        0.95, len(VALUES) - 1, loc=statistics.fmean(VALUES), scale=scipy_stats.sem(VALUES)
    )
    assert mean == pytest.approx((low + high) / 2, abs=1e-12)
    assert half == pytest.approx((high - low) / 2, rel=1e-10)
    # 90 % too, and NaNs are dropped.
    _, half90 = mean_ci([*VALUES, math.nan], confidence=0.9)
    low, high = scipy_stats.t.interval(0.9, 4, loc=mean, scale=scipy_stats.sem(VALUES))
    assert half90 == pytest.approx((high - low) / 2, rel=1e-10)


def test_mean_ci_of_one_value_has_no_interval():
    mean, half = mean_ci([0.5])
    assert mean == 0.5 and math.isnan(half)
    assert all(math.isnan(v) for v in mean_ci([]))


def test_paired_difference_is_scipy_ttest_rel():
    mean, half, p = paired_difference(VALUES, BASE)
    diffs = [a - b for a, b in zip(VALUES, BASE)]
    assert mean == pytest.approx(statistics.fmean(diffs))
    assert p == pytest.approx(scipy_stats.ttest_rel(VALUES, BASE).pvalue, rel=1e-10)
    # The same test as a one-sample t-test of the differences, and the CI of the differences.
    assert p == pytest.approx(scipy_stats.ttest_1samp(diffs, 0.0).pvalue, rel=1e-10)
    low, high = scipy_stats.t.interval(0.95, 4, loc=mean, scale=scipy_stats.sem(diffs))
    assert half == pytest.approx((high - low) / 2, rel=1e-10)
    # Pairing matters: the unpaired Welch test gives another p-value.
    assert p != pytest.approx(scipy_stats.ttest_ind(VALUES, BASE).pvalue, rel=1e-3)


def test_paired_difference_edge_cases():
    assert paired_difference([0.5, 0.6], [0.5, 0.6]) == (0.0, 0.0, 1.0)
    mean, half, p = paired_difference([0.6, 0.7], [0.5, 0.6])
    assert mean == pytest.approx(0.1) and half == 0.0 and math.isnan(p)  # never marked *
    assert math.isnan(paired_difference([0.6], [0.5])[2])


def test_select_strength_reads_only_the_selection_metric():
    # Validation prefers 1e-3; test prefers 1e-2. Only validation may decide.
    runs = {
        1e-4: [{"val_acc": 0.60, "test_acc": 0.60}, {"val_acc": 0.62, "test_acc": 0.61}],
        1e-3: [{"val_acc": 0.70, "test_acc": 0.55}, {"val_acc": 0.68, "test_acc": 0.56}],
        1e-2: [{"val_acc": 0.50, "test_acc": 0.90}, {"val_acc": 0.52, "test_acc": 0.91}],
    }
    assert select_strength(runs, "val_acc", "max") == 1e-3
    assert select_strength(runs, "test_acc", "max") == 1e-2
    assert select_strength(runs, "val_acc", "min") == 1e-2
    with pytest.raises(ValueError, match="`mode` must be 'max' or 'min', got 'best'"):
        select_strength(runs, "val_acc", "best")
    with pytest.raises(ValueError, match="at least one strength"):
        select_strength({}, "val_acc")


class FakeBackend:
    """Metrics as a function of the strength: validation and test disagree on the best."""

    columns = {"test_acc": ("test acc %", "pct")}
    compare = "test_acc"
    select = ("val_acc", "max")

    def __init__(self) -> None:
        self.seen: list[tuple[float, int]] = []

    def context(self) -> registry.TechniqueContext:
        return registry.TechniqueContext(10, "sequence", (40,), 8, 1, torch.nn.Linear(2, 2))

    def skip_reason(self, name, ctx):
        return None

    def run(self, recipe, seed, logger, extra):
        s = recipe.module_attrs.get("s", 0.0)
        self.seen.append((s, seed))
        val = {0.0: 0.60, 1.0: 0.70, 2.0: 0.65, 3.0: 0.50}[s] + 0.01 * seed
        test = {0.0: 0.60, 1.0: 0.55, 2.0: 0.58, 3.0: 0.95}[s] + 0.01 * seed
        return {"val_acc": val, "test_acc": test}, [1], [val], None


def test_search_chooses_on_validation_and_reports_test(monkeypatch, tmp_path: Path):
    fake = registry.Technique(
        "fake",
        "a technique whose validation and test preferences disagree",
        "-",
        "-",
        "-",
        lambda ctx, s: registry.Recipe(module_attrs={"s": s}),
        grid=(1.0, 2.0, 3.0),
        default=3.0,
        knob="s",
    )
    monkeypatch.setitem(registry.TECHNIQUES, "fake", fake)
    backend = FakeBackend()
    cfg = AblationConfig(
        techniques=["fake"], seeds=3, search=True, logger="none", out=tmp_path / "a"
    )
    result = run_ablation(cfg, backend=backend)
    assert sorted(backend.seen) == sorted(
        [(s, seed) for s in (0.0, 1.0, 2.0, 3.0) for seed in range(3)]
    )
    assert result.chosen["fake"] == 1.0  # best validation, worst-but-one test
    row = {r.technique: r for r in result.rows()}["fake"]
    assert row.stats["test_acc"][0] == pytest.approx(0.56)
    assert row.delta[0] == pytest.approx(0.55 - 0.60)
    search = {r["strength"]: r for r in result.search_rows() if r["technique"] == "fake"}
    assert [k for k, r in search.items() if r["chosen"]] == ["s=1"]
    # Without --search the registry default runs, once per seed.
    backend = FakeBackend()
    cfg = AblationConfig(techniques=["fake"], seeds=2, logger="none", out=tmp_path / "b")
    result = run_ablation(cfg, backend=backend)
    assert sorted(backend.seen) == [(0.0, 0), (0.0, 1), (3.0, 0), (3.0, 1)]
    assert result.chosen["fake"] == 3.0


def test_every_technique_has_a_small_documented_grid():
    for name, t in registry.TECHNIQUES.items():
        if t.grid:
            assert 3 <= len(t.grid) <= 4, name
            assert t.default in t.grid, name
            assert t.knob, name
