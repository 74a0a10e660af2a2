"""The ``lightning-reg`` command: the fast ablation end to end, its files, wandb, bad input."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from lightning_reg.demo import cli
from lightning_reg.demo import techniques as registry
from lightning_reg.demo.ablation import default_techniques

pytest.importorskip("wandb")


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """``lightning-reg ablate --fast --out DIR``, in process, with every wandb run's summary."""
    out = tmp_path_factory.mktemp("ablation")
    summaries: dict[str, dict] = {}

    def read_summary(name, run):  # called while the run is still open
        summaries[name] = {key: run.summary[key] for key in run.summary.keys()}

    stdout = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(stdout):
        code, result = cli.run(["ablate", "--fast", "--out", str(out)], wandb_hook=read_summary)
    return SimpleNamespace(
        code=code,
        result=result,
        out=out,
        stdout=stdout.getvalue(),
        summaries=summaries,
        seconds=time.perf_counter() - start,
    )


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_fast_run_exits_zero_and_prints_every_technique(fast_run):
    assert fast_run.code == 0
    expected = default_techniques("image")
    assert "combined" in expected and "baseline" in expected
    # Every registered technique has landed, so all of them ran.
    assert set(expected) == set(registry.all_names())
    rows = [line for line in fast_run.stdout.splitlines() if line.startswith("│")]
    names = [line.split("│")[1].strip() for line in rows]
    assert names == expected
    print(f"\nfast ablation: {fast_run.seconds:.1f} s for {len(fast_run.result.runs)} runs")


def test_fast_run_writes_csv_markdown_png(fast_run):
    out = fast_run.out
    rows = _read_csv(out / "results.csv")
    assert [r["technique"] for r in rows] == default_techniques("image")
    for row in rows:
        assert 0.0 <= float(row["val_acc_mean"]) <= 1.0
        assert float(row["seconds_mean"]) > 0
        assert int(row["seeds"]) == cli.FAST_SEEDS
    markdown = (out / "results.md").read_text()
    for name in default_techniques("image"):
        assert f"\n| {name} | " in markdown
    assert "machine:" in markdown and "date:" in markdown
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_aggregate_is_mean_and_std_of_the_runs(fast_run):
    runs = _read_csv(fast_run.out / "runs.csv")
    table = {r["technique"]: r for r in _read_csv(fast_run.out / "results.csv")}
    for name in ("baseline", "l1_proximal", "jacobian"):
        values = [float(r["val_acc"]) for r in runs if r["technique"] == name]
        assert len(values) == cli.FAST_SEEDS
        # The CSV files hold 8 significant digits.
        mean, std = statistics.fmean(values), statistics.stdev(values)
        assert float(table[name]["val_acc_mean"]) == pytest.approx(mean, abs=1e-7)
        assert float(table[name]["val_acc_std"]) == pytest.approx(std, abs=1e-7)
        gaps = [float(r["train_acc"]) - float(r["val_acc"]) for r in runs if r["technique"] == name]
        assert float(table[name]["gap_mean"]) == pytest.approx(statistics.fmean(gaps), abs=1e-7)


def test_measured_properties_of_the_fast_run(fast_run):
    table = fast_run.result.aggregate()
    # Max-norm: every unit of every weight inside the ball after training.
    assert table["max_norm"]["max_unit_norm"][0] <= registry.MAX_NORM_RADIUS + 1e-5
    assert table["baseline"]["max_unit_norm"][0] > registry.MAX_NORM_RADIUS - 0.5
    # Proximal L1 makes exact zeros; nothing else does.
    assert table["baseline"]["sparsity"][0] == 0.0
    assert table["l1_proximal"]["sparsity"][0] > 0.1
    for row in table.values():
        assert all(math.isfinite(v[0]) for v in row.values())


def test_wandb_offline_runs_and_their_summaries(fast_run):
    out = fast_run.out
    runs = fast_run.result.runs
    offline = list((out / "wandb").glob("offline-run-*"))
    assert len(offline) == len(runs) + 1  # one per run, plus the table run
    assert set(fast_run.summaries) == {f"{r.technique}-seed{r.seed}" for r in runs} | {"table"}
    for run in runs:
        summary = fast_run.summaries[f"{run.technique}-seed{run.seed}"]
        reg_keys = {k for k in summary if k.startswith("reg/")}
        for key in ("reg/monitor/ece", "reg/monitor/sparsity", "reg/monitor/norm/total"):
            assert key in reg_keys, (run.technique, key)
        assert summary["final/val_acc"] == pytest.approx(run.metrics["val_acc"])
    # Techniques log their own reg/<technique>/... keys (DataAugmentationCallback logs only
    # with p < 1, so the augmentation run has the monitor's keys alone).
    own = {
        "l1_proximal": "reg/l1/",
        "max_norm": "reg/max_norm/",
        "dropout": "reg/dropout/",
        "label_smoothing": "reg/label_smoothing/",
        "stochastic_depth": "reg/stochastic_depth/",
        "jacobian": "reg/jacobian/",
        "precise_bn": "reg/precise_bn/",
    }
    missing = {
        technique: prefix
        for technique, prefix in own.items()
        if not any(k.startswith(prefix) for k in fast_run.summaries[f"{technique}-seed0"])
    }
    assert not missing
    table = fast_run.summaries["table"]["ablation/results"]
    assert table["_type"] == "table-file"
    assert table["nrows"] == len(default_techniques("image"))


def test_list_prints_class_formula_paper(capsys):
    assert cli.main(["list"]) == 0
    text = capsys.readouterr().out
    for name in registry.all_names():
        technique = registry.describe(name)
        assert name in text
        assert technique.paper.split(";")[0].split(" ")[0] in text
    assert "MaxNormCallback" in text and "Huang et al. 2016" in text


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["ablate", "--techniques", "nope"], "unknown technique 'nope'"),
        (["ablate", "--techniques", "l2,bogus"], "unknown technique 'bogus'"),
        (["ablate", "--dataset", "mnist"], "invalid choice: 'mnist'"),
        (["ablate", "--train-size", "5"], "--train-size: must be in [20, 1697] for digits, got 5"),
        (["ablate", "--train-size", "1797"], "must be in [20, 1697]"),
        (["ablate", "--dataset", "breast_cancer", "--train-size", "500"], "[20, 469]"),
        (["ablate", "--seeds", "0"], "--seeds: must be in [1, inf], got 0"),
        (["ablate", "--epochs", "two"], "--epochs: must be an integer"),
        (["ablate", "--lr", "-1"], "--lr: must be in (0, inf), got -1"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert fragment in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""


def test_console_script_bad_input(tmp_path):
    exe = shutil.which("lightning-reg")
    command = [exe] if exe else [sys.executable, "-m", "lightning_reg.demo.cli"]
    proc = subprocess.run(
        [*command, "ablate", "--techniques", "nope", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and "unknown technique 'nope'" in lines[0], proc.stderr
    assert not list(tmp_path.iterdir())  # nothing ran


def test_csv_logger_and_tabular_dataset(tmp_path, capsys):
    code, result = cli.run(
        [
            "ablate",
            "--dataset",
            "breast_cancer",
            "--techniques",
            "l1_proximal",
            "--seeds",
            "1",
            "--epochs",
            "2",
            "--logger",
            "csv",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    assert [r.technique for r in result.runs] == ["baseline", "l1_proximal"]
    metrics = tmp_path / "logs" / result.ablation_id / "l1_proximal-seed0" / "metrics.csv"
    header = set(_read_csv(metrics)[0])
    assert {"reg/l1/zero_fraction", "reg/monitor/sparsity", "reg/monitor/ece"} <= header
    rows = {r["technique"]: r for r in _read_csv(tmp_path / "results.csv")}
    # The tabular table reports how many of the 30 input features the first layer still uses.
    assert float(rows["baseline"]["inputs_used_mean"]) == 30
    assert float(rows["l1_proximal"]["inputs_used_mean"]) <= 30
    assert not (tmp_path / "wandb").exists()
    assert "inputs used" in capsys.readouterr().out
