"""Tables and figures of an ablation: rich table, results.csv, results.md, curves.png, wandb."""

from __future__ import annotations

import csv
import math
import os
import platform
from pathlib import Path
from typing import Any

from lightning_reg.demo import techniques as registry
from lightning_reg.demo.ablation import METRICS, AblationResult

__all__ = [
    "format_cell",
    "log_wandb_table",
    "machine_description",
    "rich_table",
    "write_all",
    "write_csv",
    "write_curves",
    "write_markdown",
]


def format_cell(key: str, mean: float, std: float) -> str:
    """``mean ± std`` in the unit of the metric (percent, points, seconds...)."""
    kind = METRICS[key][1] if key in METRICS else "float"
    if math.isnan(mean):
        return "n/a"
    if kind in ("pct", "pp"):
        return f"{100 * mean:.1f} ± {100 * std:.1f}"
    if kind == "s":
        return f"{mean:.2f} ± {std:.2f}" if mean < 10 else f"{mean:.1f} ± {std:.1f}"
    return f"{mean:.3f} ± {std:.3f}"


def _columns(result: AblationResult) -> list[str]:
    cols = list(METRICS)
    if result.config.dataset == "breast_cancer":
        cols.insert(cols.index("max_unit_norm"), "inputs_used")
    return cols


def _header(key: str) -> str:
    if key == "inputs_used":
        return "inputs used"
    return METRICS[key][0]


def _rows(result: AblationResult) -> list[tuple[str, dict[str, tuple[float, float]], float]]:
    table = result.aggregate()
    base = table.get("baseline", {}).get("val_acc", (math.nan, 0.0))[0]
    rows = []
    for name, row in table.items():
        delta = row["val_acc"][0] - base if not math.isnan(base) else math.nan
        rows.append((name, row, delta))
    return rows


def _optimizer(name: str) -> str:
    return "SGD (Nesterov momentum 0.9)" if name == "sgd" else "Adam"


def machine_description() -> str:
    """A one-line description of the machine (CPU model and cores, torch, accelerator)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {cores} CPU cores{gpu}; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def rich_table(result: AblationResult) -> Any:
    """A ``rich.table.Table``: one row per technique; Δ acc is against the baseline."""
    from rich.table import Table

    cfg = result.config
    table = Table(
        title=(
            f"lightning-reg ablation on {cfg.dataset} ({len(result.by_technique())} rows, "
            f"{cfg.seeds} seeds, {cfg.epochs} epochs): mean ± std over seeds"
        )
    )
    table.add_column("technique", no_wrap=True)
    table.add_column("Δ acc pp", justify="right")
    for key in _columns(result):
        table.add_column(_header(key), justify="right")
    for name, row, delta in _rows(result):
        style = "" if math.isnan(delta) or name == "baseline" else ("green" if delta > 0 else "red")
        cells = [f"[{style}]{100 * delta:+.1f}[/]" if style else f"{100 * delta:+.1f}"]
        cells += [format_cell(k, *row.get(k, (math.nan, 0.0))) for k in _columns(result)]
        table.add_row(name, *cells)
    return table


def write_csv(result: AblationResult, path: Path) -> Path:
    """One row per technique: ``<metric>_mean`` and ``<metric>_std`` columns."""
    keys = [*_columns(result), "train_acc", "epochs_run"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["technique", "classes", "seeds", *[f"{k}_{s}" for k in keys for s in ("mean", "std")]]
        )
        for name, row, _ in _rows(result):
            values = []
            for k in keys:
                mean, std = row.get(k, (math.nan, math.nan))
                values += [f"{mean:.8g}", f"{std:.8g}"]
            n = len(result.by_technique()[name])
            writer.writerow([name, registry.describe(name).classes, n, *values])
    return path


def write_runs_csv(result: AblationResult, path: Path) -> Path:
    """One row per (technique, seed) run, raw values."""
    keys = sorted({k for r in result.runs for k in r.metrics})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["technique", "seed", *keys])
        for r in result.runs:
            writer.writerow(
                [r.technique, r.seed, *[f"{r.metrics.get(k, math.nan):.8g}" for k in keys]]
            )
    return path


def markdown_table(result: AblationResult) -> str:
    """The aggregated table in Markdown."""
    cols = _columns(result)
    lines = [
        "| technique | Δ acc pp | " + " | ".join(_header(k) for k in cols) + " |",
        "|---|---:|" + "---:|" * len(cols),
    ]
    for name, row, delta in _rows(result):
        cells = [format_cell(k, *row.get(k, (math.nan, 0.0))) for k in cols]
        lines.append(f"| {name} | {100 * delta:+.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(result: AblationResult, path: Path) -> Path:
    """results.md: the table, the set-up, the machine and the date."""
    cfg = result.config
    n_train = cfg.train_size if cfg.train_size is not None else "default"
    lines = [
        f"# lightning-reg ablation: {cfg.dataset}",
        "",
        f"- date: {result.started:%Y-%m-%d %H:%M} (took "
        f"{(result.finished or result.started) - result.started})",
        f"- machine: {machine_description()}",
        f"- set-up: train size {n_train}, {cfg.seeds} seeds, {cfg.epochs} epochs, batch "
        f"{cfg.batch_size}, {_optimizer(cfg.optimizer)} lr {cfg.lr:g}, validation every "
        f"{cfg.val_every} epochs" + (", --fast" if cfg.fast else ""),
        f"- noisy acc: validation inputs + Gaussian noise, σ = {cfg.noise_scale:g} × feature std",
        "- gap = train accuracy − validation accuracy (eval mode, clean inputs), in points;"
        " Δ acc = validation accuracy − baseline's",
        "",
        markdown_table(result),
        "",
        "| technique | classes | what ran |",
        "|---|---|---|",
    ]
    for name in result.by_technique():
        t = registry.describe(name)
        lines.append(f"| {name} | `{t.classes}` | {t.description} |")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_curves(result: AblationResult, path: Path) -> Path:
    """curves.png: mean validation accuracy per epoch, and bar charts of the gap and the ECE."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = _rows(result)
    names = [name for name, _, _ in rows]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [1.5, 1, 1]})
    cmap = plt.get_cmap("tab20")
    ax = axes[0]
    for i, (name, runs) in enumerate(result.by_technique().items()):
        by_epoch: dict[int, list[float]] = {}
        for r in runs:
            for e, a in zip(r.curve_epochs, r.curve_val_acc):
                by_epoch.setdefault(e, []).append(a)
        if not by_epoch:
            continue
        epochs = sorted(by_epoch)
        mean = [100 * sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]
        style = "-" if name in ("baseline", "combined") else "--"
        width = 2.4 if name in ("baseline", "combined") else 1.2
        ax.plot(epochs, mean, style, lw=width, color=cmap(i % 20), label=name)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%), mean over seeds")
    ax.set_title("validation curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    if ax.get_lines():
        low = min(min(line.get_ydata()) for line in ax.get_lines())
        ax.set_ylim(max(low, 50.0) - 1, 100)
    for ax, key, title in (
        (axes[1], "gap", "train − val accuracy gap (points)"),
        (axes[2], "ece", "expected calibration error (%)"),
    ):
        means = [100 * row[key][0] for _, row, _ in rows]
        stds = [100 * row[key][1] for _, row, _ in rows]
        colors = ["0.3" if n == "baseline" else cmap(i % 20) for i, n in enumerate(names)]
        ax.barh(names, means, xerr=stds, color=colors)
        if "baseline" in names:
            ax.axvline(means[names.index("baseline")], color="k", ls=":", lw=1)
        ax.invert_yaxis()
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(
        f"lightning-reg ablation on {result.config.dataset} "
        f"({result.config.seeds} seeds, {result.config.epochs} epochs)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_wandb_table(result: AblationResult, curves: Path | None) -> Any:
    """Open one more wandb run in the ablation's group with the table (``wandb.Table``)."""
    import wandb

    cfg = result.config
    cols = _columns(result)
    table = wandb.Table(
        columns=[
            "technique",
            "delta_acc",
            *[f"{k}_mean" for k in cols],
            *[f"{k}_std" for k in cols],
        ]
    )
    for name, row, delta in _rows(result):
        means = [row.get(k, (math.nan, math.nan))[0] for k in cols]
        stds = [row.get(k, (math.nan, math.nan))[1] for k in cols]
        table.add_data(name, delta, *means, *stds)
    run = wandb.init(
        project=cfg.wandb_project,
        name=f"{result.ablation_id}-table",
        group=result.ablation_id,
        job_type="summary",
        dir=str(cfg.out),
        mode=cfg.wandb_mode,
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        reinit="create_new",
    )
    payload: dict[str, Any] = {"ablation/results": table}
    if curves is not None and curves.exists():
        payload["ablation/curves"] = wandb.Image(str(curves))
    run.log(payload)
    return run


def write_all(result: AblationResult) -> dict[str, Path]:
    """Write results.csv, runs.csv, results.md and curves.png into ``config.out``."""
    out = result.config.out
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "csv": write_csv(result, out / "results.csv"),
        "runs_csv": write_runs_csv(result, out / "runs.csv"),
        "markdown": write_markdown(result, out / "results.md"),
        "png": write_curves(result, out / "curves.png"),
    }
    result.files.update(files)
    return files
