"""The ``lightning-reg`` command: a tiny MNIST-1D ablation end to end, ``--config``, bad input."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch.nn.functional as F
from scipy import stats as scipy_stats

from lightning_reg.demo import cli
from lightning_reg.demo import techniques as registry
from lightning_reg.demo.data import load_dataset

pytest.importorskip("wandb")

ROOT = Path(__file__).resolve().parents[1]
OWN_MODEL_YAML = ROOT / "examples" / "configs" / "ablate_own_model.yaml"
TECHNIQUES = ["l1_proximal", "early_stopping", "ghost_bn", "combined"]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _l1_label() -> str:
    return registry.strength_label("l1_proximal", registry.TECHNIQUES["l1_proximal"].default)


def _run(argv: list[str], hook: Any = None) -> tuple[int, Any, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code, result = cli.run(argv, wandb_hook=hook)
    return code, result, stdout.getvalue()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny MNIST-1D ablation, in process, with every wandb run's summary (offline)."""
    out = tmp_path_factory.mktemp("ablation")
    summaries: dict[str, dict] = {}

    def read_summary(name, run):  # called while the run is still open
        summaries[name] = {key: run.summary[key] for key in run.summary.keys()}

    argv = ["ablate", "--fast", "--epochs", "6", "--val-every", "1", "--techniques", *TECHNIQUES]
    code, result, stdout = _run([*argv, "--out", str(out)], read_summary)
    return SimpleNamespace(code=code, result=result, out=out, stdout=stdout, summaries=summaries)


def test_tiny_run_table_rows_and_skips(tiny_run):
    assert tiny_run.code == 0
    rows = [line for line in tiny_run.stdout.splitlines() if line.startswith("│")]
    names = [line.split("│")[1].strip() for line in rows if line.split("│")[1].strip()]
    assert names == ["baseline", *TECHNIQUES]
    table = {r["technique"]: r for r in _read_csv(tiny_run.out / "results.csv")}
    assert table["ghost_bn"]["status"] == "skipped"
    assert table["ghost_bn"]["reason"] == "the model has no BatchNorm layer"
    assert "skipped: the model has no BatchNorm layer" in tiny_run.stdout
    for name in ("baseline", "l1_proximal", "early_stopping", "combined"):
        assert table[name]["status"] == "ok" and int(table[name]["seeds"]) == cli.FAST_SEEDS
        assert 0.0 < float(table[name]["test_acc_mean"]) <= 1.0
    # Proximal L1 makes exact zeros, the baseline none; early stopping reports its epochs.
    assert (
        float(table["l1_proximal"]["sparsity_mean"])
        > 0.0
        == float(table["baseline"]["sparsity_mean"])
    )
    assert (
        1
        <= float(table["early_stopping"]["restored_epoch_mean"])
        <= float(table["early_stopping"]["stopped_epoch_mean"])
        <= 6
    )
    assert "p < 0.05" in tiny_run.stdout and "paired t-test" in tiny_run.stdout


def test_results_csv_matches_scipy_on_the_runs(tiny_run):
    runs = _read_csv(tiny_run.out / "runs.csv")
    table = {r["technique"]: r for r in _read_csv(tiny_run.out / "results.csv")}
    base = [float(r["test_acc"]) for r in runs if r["technique"] == "baseline"]
    for name in ("l1_proximal", "combined"):
        values = [float(r["test_acc"]) for r in runs if r["technique"] == name]
        assert len(values) == len(base) == cli.FAST_SEEDS
        low, high = scipy_stats.t.interval(
            0.95, len(values) - 1, loc=sum(values) / len(values), scale=scipy_stats.sem(values)
        )
        assert float(table[name]["test_acc_mean"]) == pytest.approx((low + high) / 2, abs=1e-7)
        if math.isfinite(high - low) and high > low:
            assert float(table[name]["test_acc_ci"]) == pytest.approx((high - low) / 2, rel=1e-6)
        diffs = [a - b for a, b in zip(values, base)]
        assert float(table[name]["delta_acc"]) == pytest.approx(sum(diffs) / len(diffs), abs=1e-7)
        if len(set(diffs)) > 1:
            p = scipy_stats.ttest_rel(values, base).pvalue
            assert float(table[name]["p_value"]) == pytest.approx(p, rel=1e-6)


def test_files_of_the_run(tiny_run):
    out = tiny_run.out
    for png in ("curves.png", "effects.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    markdown = (out / "results.md").read_text()
    for name in ("baseline", *TECHNIQUES):
        assert f"\n| {name} | " in markdown
    assert "machine:" in markdown and "paired t-test" in markdown
    search = _read_csv(out / "search.csv")
    assert {r["technique"] for r in search} == {
        "baseline",
        "l1_proximal",
        "early_stopping",
        "combined",
    }


def test_wandb_offline_summaries_read_in_process(tiny_run):
    runs = tiny_run.result.runs
    offline = list((tiny_run.out / "wandb").glob("offline-run-*"))
    assert len(offline) == len(runs) + 1  # one per run, plus the table run
    assert len(tiny_run.summaries) == len(runs) + 1
    for run in runs:
        label = registry.strength_label(run.technique, run.strength)
        summary = tiny_run.summaries[f"{run.technique}-seed{run.seed}-{label}"]
        assert summary["final/test_acc"] == pytest.approx(run.metrics["test_acc"])
        assert "reg/monitor/norm/total" in summary
    l1 = tiny_run.summaries[f"l1_proximal-seed0-{_l1_label()}"]
    assert any(k.startswith("reg/l1/") for k in l1)
    table = tiny_run.summaries["table"]["ablation/results"]
    assert table["_type"] == "table-file" and table["nrows"] == 1 + len(TECHNIQUES)


def test_mnist1d_splits_are_stratified_and_disjoint():
    data = load_dataset("mnist1d")
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (3600, 400, 1000)
    counts = data.y_val.bincount(minlength=10)
    assert int(counts.max() - counts.min()) <= 5  # stratified: ~40 per class
    # The validation split is carved from train; no training sample is in it.
    train = {tuple(row.tolist()) for row in data.x_train[:, :8]}
    assert not any(tuple(row.tolist()) in train for row in data.x_val[:, :8])
    assert abs(float(data.x_train.mean())) < 1e-5
    other = load_dataset("mnist1d", split_seed=1)
    assert not (other.y_val == data.y_val).all()


def test_list_prints_class_formula_paper_grid(capsys):
    assert cli.main(["list"]) == 0
    text = capsys.readouterr().out
    for name in registry.all_names():
        assert name in text
    assert "MaxNormCallback" in text and "Huang et al. 2016" in text
    assert "λ ∈ {0.0001, 0.001, 0.01}" in text


# ----------------------------------------------------------------------------- --config
def _hard_target_class():
    from examples.own_model import TinyClassifier

    class _Hard(TinyClassifier):
        def training_step(self, batch, batch_idx):
            x, y = batch[0], batch[1]
            return F.nll_loss(F.log_softmax(self(x), dim=1), y)  # integer targets only

    return _Hard


def test_config_runs_the_example_and_reports_skips(tmp_path):
    code, result, stdout = _run(
        [
            "ablate",
            "--config",
            str(OWN_MODEL_YAML),
            "--techniques",
            "l2",
            "mixup",
            "jacobian",
            "--monitor",
            "val_acc",
            "--mode",
            "max",
            "--seeds",
            "2",
            "--epochs",
            "2",
            "--logger",
            "none",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    table = {r["technique"]: r for r in _read_csv(tmp_path / "results.csv")}
    assert table["jacobian"]["status"] == "skipped"
    assert "JacobianPenaltyMixin" in table["jacobian"]["reason"]
    assert table["mixup"]["status"] == "ok"  # F.cross_entropy accepts soft targets
    for key in ("val_acc_mean", "val_loss_mean", "gap_acc_mean", "gap_loss_mean", "delta_val_acc"):
        assert key in table["l2"], key
    runs = [r for r in result.runs if r.technique == "l2"]
    assert [r.seed for r in runs] == [0, 1]
    assert runs[0].metrics["gap_acc"] != 0.0
    assert "skipped: the LightningModule does not use JacobianPenaltyMixin" in " ".join(
        stdout.split()
    )


def test_config_probe_skips_soft_target_techniques(tmp_path, monkeypatch):
    import examples.own_model as own

    monkeypatch.setattr(own, "HardTargetClassifier", _hard_target_class(), raising=False)
    yaml_text = OWN_MODEL_YAML.read_text().replace(
        "examples.own_model.TinyClassifier", "examples.own_model.HardTargetClassifier"
    )
    config = tmp_path / "hard.yaml"
    config.write_text(yaml_text)
    code, result, _ = _run(
        [
            "ablate",
            "--config",
            str(config),
            "--techniques",
            "label_smoothing",
            "mixup",
            "l2",
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--logger",
            "none",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 0
    assert set(result.skipped) == {"label_smoothing", "mixup"}
    assert "does not accept soft targets" in result.skipped["mixup"]
    assert {r.technique for r in result.runs} == {"baseline", "l2"}


def _bad_yaml(tmp_path: Path, name: str) -> str:
    text = OWN_MODEL_YAML.read_text()
    if name == "no_model":
        text = re.sub(r"(?ms)^model:.*?(?=^data:)", "", text)
        assert "\nmodel:" not in text and "\ndata:" in text
    elif name == "missing_class":
        text = text.replace("TinyClassifier", "NoSuchClassifier")
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def _assert_one_line_exit_2(argv: list[str], fragment: str, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["ablate", "--techniques", "nope"], "unknown technique 'nope'"),
        (["ablate", "--techniques", "l2,bogus"], "unknown technique 'bogus'"),
        (["ablate", "--dataset", "mnist"], "invalid choice: 'mnist'"),
        (["ablate", "--model", "rnn"], "invalid choice: 'rnn'"),
        (["ablate", "--train-size", "5"], "--train-size: must be in [20, 3900] for mnist1d, got 5"),
        (["ablate", "--dataset", "breast_cancer", "--train-size", "500"], "[20, 369]"),
        (["ablate", "--dataset", "breast_cancer", "--model", "cnn"], "cnn needs mnist1d or digits"),
        (["ablate", "--seeds", "0"], "--seeds: must be in [1, inf], got 0"),
        (["ablate", "--epochs", "two"], "--epochs: must be an integer"),
        (["ablate", "--lr", "-1"], "--lr: must be in (0, inf), got -1"),
        (["ablate", "--config", "/no/such.yaml"], "--config: no such file: /no/such.yaml"),
        (["ablate", "--mode", "best"], "invalid choice: 'best'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, fragment, capsys):
    _assert_one_line_exit_2(argv, fragment, capsys)


@pytest.mark.parametrize(
    ("name", "fragment"), [("no_model", "model"), ("missing_class", "NoSuchClassifier")]
)
def test_bad_config_is_one_line_and_exit_2(name, fragment, tmp_path, capsys):
    path = _bad_yaml(tmp_path, name)
    argv = ["ablate", "--config", path, "--logger", "none", "--out", str(tmp_path / "o")]
    _assert_one_line_exit_2(argv, fragment, capsys)
    assert not (tmp_path / "o" / "results.csv").exists()


def test_unknown_monitor_after_the_first_run_exits_2(tmp_path, capsys):
    argv = [
        "ablate",
        "--config",
        str(OWN_MODEL_YAML),
        "--monitor",
        "val_f1",
        "--epochs",
        "1",
        "--seeds",
        "1",
        "--techniques",
        "l2",
        "--logger",
        "none",
        "--out",
        str(tmp_path),
    ]
    line = _assert_one_line_exit_2(
        argv, "--monitor: 'val_f1' is not logged at validation end; logged: ", capsys
    )
    assert "val_acc, val_loss" in line


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


def test_csv_logger_and_tabular_dataset(tmp_path):
    code, result, _ = _run(
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
    metrics = (
        tmp_path / "logs" / result.ablation_id / f"l1_proximal-seed0-{_l1_label()}" / "metrics.csv"
    )
    header = set(_read_csv(metrics)[0])
    assert {"reg/l1/zero_fraction", "reg/monitor/sparsity"} <= header
    assert not (tmp_path / "wandb").exists()
