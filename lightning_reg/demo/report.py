"""Tables and figures of an ablation: rich table, results.csv, runs.csv, search.csv, results.md,
curves.png, effects.png and the wandb summary run."""

from __future__ import annotations

import csv
import math
import os
import platform
from pathlib import Path
from typing import Any

from lightning_reg.demo import techniques as registry
from lightning_reg.demo.ablation import AblationResult, Row
from lightning_reg.demo.stats import ALPHA

__all__ = [
    "LEGEND",
    "format_cell",
    "log_wandb_table",
    "machine_description",
    "markdown_table",
    "rich_table",
    "write_all",
    "write_csv",
    "write_curves",
    "write_effects",
    "write_markdown",
    "write_search_csv",
]

LEGEND = (
    "cells: mean ± 95 % CI over seeds (Student t). Δ: paired difference against the baseline "
    f"(same seeds, same split) ± 95 % CI; * marks p < {ALPHA:g} in a two-sided paired t-test."
)


def _kind(result: AblationResult, key: str) -> str:
    return result.columns.get(key, ("", "float"))[1]


def format_cell(kind: str, mean: float, ci: float) -> str:
    """``mean ± ci`` in the unit of the metric kind (``pct``, ``pp``, ``s``, ``float``)."""
    if math.isnan(mean):
        return "n/a"
    scale = 100.0 if kind in ("pct", "pp") else 1.0
    digits = 1 if kind in ("pct", "pp") else (2 if kind == "s" else 3)
    text = f"{scale * mean:.{digits}f}"
    return text if math.isnan(ci) else f"{text} ± {scale * ci:.{digits}f}"


def _delta_name(result: AblationResult) -> str:
    return "delta_acc" if result.compare == "test_acc" else f"delta_{result.compare}"


def _delta_cell(result: AblationResult, row: Row) -> str:
    if row.technique == "baseline" or row.skipped:
        return "-"
    mean, ci, p = row.delta
    kind = _kind(result, result.compare)
    mark = "*" if p < ALPHA else ""
    return format_cell("pp" if kind == "pct" else kind, mean, ci) + mark


def _epochs_cell(row: Row) -> str:
    if "stopped_epoch" not in row.stats:
        return "-"
    stop, best = row.stats["stopped_epoch"][0], row.stats["restored_epoch"][0]
    return f"{stop:.0f} / {best:.0f}"


def _cells(result: AblationResult, row: Row) -> list[str]:
    label = registry.strength_label(row.technique, row.strength) if not row.skipped else "-"
    if row.skipped:
        return [label, f"skipped: {row.reason}", *["" for _ in result.columns], ""]
    return [
        label,
        _delta_cell(result, row),
        *[
            format_cell(kind, *row.stats.get(k, (math.nan, math.nan)))
            for k, (_, kind) in result.columns.items()
        ],
        _epochs_cell(row),
    ]


def _headers(result: AblationResult) -> list[str]:
    compare = result.columns.get(result.compare, (result.compare,))[0]
    return [
        "strength",
        f"Δ {compare.replace('%', 'pp')}",
        *[h for h, _ in result.columns.values()],
        "stop / best epoch",
    ]


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


def _title(result: AblationResult) -> str:
    cfg = result.config
    what = f"{cfg.config}" if cfg.config else f"{cfg.dataset}, {cfg.model}"
    return f"lightning-reg ablation on {what} ({cfg.seeds} seeds, {cfg.epochs} epochs)"


def rich_table(result: AblationResult) -> Any:
    """A ``rich.table.Table``: one row per technique, with the legend as caption."""
    from rich.table import Table

    table = Table(title=_title(result), caption=LEGEND)
    table.add_column("technique", no_wrap=True)
    for header in _headers(result):
        table.add_column(header, justify="right")
    for row in result.rows():
        cells = _cells(result, row)
        if not row.skipped and row.technique != "baseline" and row.delta[2] < ALPHA:
            style = "green" if row.delta[0] > 0 else "red"
            if result.select[1] == "min" and result.compare == result.select[0]:
                style = "red" if row.delta[0] > 0 else "green"
            cells[1] = f"[{style}]{cells[1]}[/]"
        table.add_row(row.technique, *cells)
    return table


def write_csv(result: AblationResult, path: Path) -> Path:
    """One row per technique: ``<metric>_mean`` and ``<metric>_ci`` columns, Δ and p-value."""
    keys = list(result.columns)
    extra = ["stopped_epoch", "restored_epoch", result.select[0]]
    keys += [k for k in extra if k not in keys]
    delta = _delta_name(result)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "technique",
                "status",
                "strength",
                "classes",
                "seeds",
                delta,
                f"{delta}_ci",
                "p_value",
                *[f"{k}_{s}" for k in keys for s in ("mean", "ci")],
                "reason",
            ]
        )
        for row in result.rows():
            values = []
            for k in keys:
                mean, ci = row.stats.get(k, (math.nan, math.nan))
                values += [f"{mean:.8g}", f"{ci:.8g}"]
            writer.writerow(
                [
                    row.technique,
                    "skipped" if row.skipped else "ok",
                    registry.strength_label(row.technique, row.strength) if not row.skipped else "",
                    registry.describe(row.technique).classes,
                    len(row.runs),
                    *[f"{v:.8g}" for v in row.delta],
                    *values,
                    row.reason or "",
                ]
            )
    return path


def write_runs_csv(result: AblationResult, path: Path) -> Path:
    """One row per (technique, strength, seed) run, raw values."""
    keys = sorted({k for r in result.runs for k in r.metrics})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["technique", "strength", "seed", *keys])
        for r in result.runs:
            writer.writerow(
                [
                    r.technique,
                    registry.strength_label(r.technique, r.strength),
                    r.seed,
                    *[f"{r.metrics.get(k, math.nan):.8g}" for k in keys],
                ]
            )
    return path


def write_runs_json(result: AblationResult, path: Path) -> Path:
    """runs.json: every run with its metrics and validation curve (to merge or re-plot runs)."""
    import json

    runs = [
        {
            "technique": r.technique,
            "strength": r.strength,
            "seed": r.seed,
            "metrics": r.metrics,
            "curve_epochs": r.curve_epochs,
            "curve_val": r.curve_val,
        }
        for r in result.runs
    ]
    path.write_text(json.dumps({"chosen": result.chosen, "runs": runs}, indent=1))
    return path


def write_search_csv(result: AblationResult, path: Path) -> Path:
    """search.csv: every (technique, strength) that ran, its mean validation and test metric."""
    rows = result.search_rows()
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["technique"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.8g}" if isinstance(v, float) else v for k, v in row.items()})
    return path


def markdown_table(result: AblationResult) -> str:
    """The aggregated table in Markdown, with its legend."""
    headers = _headers(result)
    lines = [
        "| technique | " + " | ".join(headers) + " |",
        "|---|" + "---:|" * len(headers),
    ]
    for row in result.rows():
        lines.append(f"| {row.technique} | " + " | ".join(_cells(result, row)) + " |")
    return "\n".join(lines) + "\n\n" + LEGEND


def search_markdown(result: AblationResult) -> str:
    """The search grid as Markdown (the chosen strength in bold)."""
    rows = result.search_rows()
    if not rows:
        return ""
    sel, comp = f"{result.select[0]}_mean", f"{result.compare}_mean"
    pct = _kind(result, result.compare) == "pct"
    fmt = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.4g}")
    lines = [f"| technique | strength | {sel} | {comp} |", "|---|---|---:|---:|"]
    for r in rows:
        strength = f"**{r['strength']}**" if r["chosen"] and r["strength"] != "-" else r["strength"]
        lines.append(f"| {r['technique']} | {strength} | {fmt(r[sel])} | {fmt(r[comp])} |")
    return "\n".join(lines)


def write_markdown(result: AblationResult, path: Path, command: str = "") -> Path:
    """results.md: the table, the search grid, the set-up, the machine and the date."""
    cfg = result.config
    took = (result.finished or result.started) - result.started
    setup = (
        f"config {cfg.config}, monitor {cfg.monitor} ({cfg.mode})"
        if cfg.config
        else f"{cfg.dataset}, model {cfg.model}, {cfg.epochs} epochs, batch {cfg.batch_size}, "
        f"{cfg.optimizer} lr {cfg.lr:g}, validation every {cfg.val_every} epochs"
    )
    lines = [
        f"# {_title(result)}",
        "",
        f"- command: `{command}`" if command else "",
        f"- date: {result.started:%Y-%m-%d %H:%M} (took {str(took).split('.')[0]})",
        f"- machine: {machine_description()}",
        f"- set-up: {setup}, {cfg.seeds} seeds"
        + (", --search" if cfg.search else "")
        + (", --fast" if cfg.fast else ""),
        f"- strengths chosen on {result.select[0]} ({result.select[1]}); the test split is "
        "only read for the reported numbers"
        if not cfg.config
        else "",
        "- gap = train − test accuracy (eval mode, clean inputs); noisy acc: test inputs + "
        f"Gaussian noise, σ = {cfg.noise_scale:g} × feature std"
        if not cfg.config
        else "",
        "",
        markdown_table(result),
        "",
    ]
    if cfg.search:
        lines += ["## Search", "", search_markdown(result), ""]
    lines += ["| technique | classes | what ran |", "|---|---|---|"]
    for row in result.rows():
        t = registry.describe(row.technique)
        lines.append(f"| {row.technique} | `{t.classes}` | {t.description} |")
    path.write_text("\n".join(line for line in lines if line is not None) + "\n")
    return path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def write_curves(result: AblationResult, path: Path) -> Path:
    """curves.png: mean validation curve per technique, and the train−test (val) gap bars."""
    plt = _pyplot()
    rows = [r for r in result.rows() if not r.skipped]
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.2), gridspec_kw={"width_ratios": [1.5, 1]})
    cmap = plt.get_cmap("tab20")
    ax = axes[0]
    for i, row in enumerate(rows):
        by_epoch: dict[int, list[float]] = {}
        for r in row.runs:
            for e, a in zip(r.curve_epochs, r.curve_val):
                by_epoch.setdefault(e, []).append(a)
        if not by_epoch:
            continue
        epochs = sorted(by_epoch)
        mean = [100 * sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]
        bold = row.technique in ("baseline", "combined")
        ax.plot(
            epochs,
            mean,
            "-" if bold else "--",
            lw=2.4 if bold else 1.2,
            color=cmap(i % 20),
            label=row.technique,
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%), mean over seeds")
    ax.set_title("validation curves")
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=7, ncol=2)
    ax = axes[1]
    key = (
        "gap"
        if "gap" in result.columns
        else next((k for k in result.columns if k.startswith("gap_")), None)
    )
    names = [r.technique for r in rows]
    if key is not None:
        means = [100 * r.stats.get(key, (math.nan, 0))[0] for r in rows]
        cis = [
            100
            * (r.stats.get(key, (0, 0))[1] if not math.isnan(r.stats.get(key, (0, 0))[1]) else 0)
            for r in rows
        ]
        colors = ["0.3" if n == "baseline" else cmap(i % 20) for i, n in enumerate(names)]
        ax.barh(names, means, xerr=cis, color=colors)
        if "baseline" in names:
            ax.axvline(means[names.index("baseline")], color="k", ls=":", lw=1)
        ax.set_title(f"{result.columns[key][0]} (95 % CI)")
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x")
    fig.suptitle(_title(result))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_effects(result: AblationResult, path: Path) -> Path:
    """effects.png: Δ of the compared metric against the baseline, with 95 % CI bars."""
    plt = _pyplot()
    rows = [r for r in result.rows() if not r.skipped and r.technique != "baseline"]
    pct = _kind(result, result.compare) == "pct"
    scale = 100.0 if pct else 1.0
    names = [f"{r.technique}{' *' if r.delta[2] < ALPHA else ''}" for r in rows]
    means = [scale * r.delta[0] for r in rows]
    cis = [0.0 if math.isnan(r.delta[1]) else scale * r.delta[1] for r in rows]
    higher_better = not (result.select[1] == "min" and result.compare == result.select[0])
    colors = [
        "0.6"
        if r.delta[2] >= ALPHA or math.isnan(r.delta[2])
        else ("tab:green" if (r.delta[0] > 0) == higher_better else "tab:red")
        for r in rows
    ]
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(rows) + 1.8))
    ax.barh(names, means, xerr=cis, color=colors, capsize=3)
    ax.axvline(0, color="k", lw=1)
    ax.invert_yaxis()
    unit = "points" if pct else ""
    ax.set_xlabel(
        f"Δ {result.compare} vs baseline ({unit}), mean ± 95 % CI over seeds".replace(" ()", "")
    )
    ax.set_title(_title(result), fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    fig.text(
        0.01, 0.01, f"* p < {ALPHA:g}, two-sided paired t-test (same seeds and split)", fontsize=8
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_wandb_table(result: AblationResult, images: list[Path]) -> Any:
    """Open one more wandb run in the ablation's group with the table (``wandb.Table``)."""
    import wandb

    cfg = result.config
    keys = list(result.columns)
    table = wandb.Table(
        columns=[
            "technique",
            "status",
            "strength",
            "delta",
            "delta_ci",
            "p_value",
            *[f"{k}_mean" for k in keys],
            *[f"{k}_ci" for k in keys],
        ]
    )
    for row in result.rows():
        table.add_data(
            row.technique,
            "skipped" if row.skipped else "ok",
            registry.strength_label(row.technique, row.strength) if not row.skipped else row.reason,
            *row.delta,
            *[row.stats.get(k, (math.nan, math.nan))[0] for k in keys],
            *[row.stats.get(k, (math.nan, math.nan))[1] for k in keys],
        )
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
    for image in images:
        if image.exists():
            payload[f"ablation/{image.stem}"] = wandb.Image(str(image))
    run.log(payload)
    return run


def write_all(result: AblationResult, command: str = "") -> dict[str, Path]:
    """Write results.csv, runs.csv, search.csv, results.md, curves.png and effects.png."""
    out = result.config.out
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "csv": write_csv(result, out / "results.csv"),
        "runs_csv": write_runs_csv(result, out / "runs.csv"),
        "runs_json": write_runs_json(result, out / "runs.json"),
        "search_csv": write_search_csv(result, out / "search.csv"),
        "markdown": write_markdown(result, out / "results.md", command),
        "curves": write_curves(result, out / "curves.png"),
        "effects": write_effects(result, out / "effects.png"),
    }
    result.files.update(files)
    return files
