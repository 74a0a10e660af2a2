"""The ablation runner: the same model, once per technique, strength and seed, then evaluated.

A *backend* builds and trains one run: :class:`DemoBackend` (a bundled dataset and the demo
network) or :class:`~lightning_reg.demo.config.ConfigBackend` (the user's LightningCLI YAML).
:func:`run_ablation` runs the baseline and every technique over the seeds: with ``search`` each
strength of the technique's grid, then it keeps the strength with the best mean *validation*
metric (:func:`~lightning_reg.demo.stats.select_strength`); without, the registry's default.
The combined recipe runs last, with each part at its chosen strength. :meth:`AblationResult.rows`
gives the table: mean ± 95 % CI over seeds, and the paired difference against the baseline with
its paired t-test p-value.

Demo metrics (eval mode, float32, after training; early stopping has restored its best
weights): ``test_acc``, ``gap`` (train − test accuracy, clean inputs), ``test_nll``, ``ece``
(15 bins, test), ``noisy_acc`` (test inputs + Gaussian noise, σ = ``noise_scale`` × each
feature's training std), ``sparsity`` (exact zeros among the weights), ``max_unit_norm``,
``train_s_per_epoch`` (median), ``val_acc`` (what the search selects on), and for early stopping
``stopped_epoch`` / ``restored_epoch`` (1-based).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from lightning_reg import EarlyStoppingCallback, ParamSelection, RegularizationMonitorCallback
from lightning_reg.demo import techniques as registry
from lightning_reg.demo.data import DemoData, load_dataset, make_loader
from lightning_reg.demo.model import DemoClassifier
from lightning_reg.demo.stats import mean_ci, paired_difference, select_strength

__all__ = [
    "DEMO_METRICS",
    "AblationConfig",
    "AblationResult",
    "DemoBackend",
    "Row",
    "RunResult",
    "evaluate",
    "max_unit_norm",
    "run_ablation",
    "weight_sparsity",
]

#: Table columns of a demo run: key → (header, kind). kind: "pct", "pp", "float", "s", "int".
DEMO_METRICS: dict[str, tuple[str, str]] = {
    "test_acc": ("test acc %", "pct"),
    "gap": ("train−test gap pp", "pp"),
    "test_nll": ("test NLL", "float"),
    "ece": ("ECE %", "pct"),
    "noisy_acc": ("noisy acc %", "pct"),
    "sparsity": ("zero weights %", "pct"),
    "max_unit_norm": ("max ‖w_unit‖", "float"),
    "train_s_per_epoch": ("s/epoch", "s"),
}


@dataclass
class AblationConfig:
    """Everything a run depends on. See ``lightning-reg ablate --help``."""

    techniques: list[str] = field(default_factory=registry.all_names)
    dataset: str = "mnist1d"
    model: str = "mlp"
    seeds: int = 3
    epochs: int = 60
    train_size: int | None = None
    batch_size: int = 512
    val_every: int = 2
    lr: float = 1e-2
    optimizer: str = "adam"
    search: bool = False
    noise_scale: float = 0.5
    accelerator: str = "cpu"
    devices: int | str = 1
    precision: str | None = None
    out: Path = Path("ablation")
    logger: str = "wandb"
    wandb_mode: str = "offline"
    wandb_project: str = "lightning-reg"
    split_seed: int = 0
    fast: bool = False
    config: Path | None = None
    epochs_override: int | None = None
    monitor: str = "val_loss"
    mode: str = "min"


@dataclass
class RunResult:
    """One (technique, strength, seed) run: final metrics and the validation curve."""

    technique: str
    strength: Any
    seed: int
    metrics: dict[str, float]
    curve_epochs: list[int] = field(default_factory=list)
    curve_val: list[float] = field(default_factory=list)
    wandb_summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    """One table row: a technique at its chosen strength, aggregated over seeds.

    ``stats[key] = (mean, CI half-width)``; ``delta = (mean difference, CI half-width, p)`` of
    the comparison metric against the baseline, paired by seed. ``reason`` is set when skipped.
    """

    technique: str
    strength: Any = None
    reason: str | None = None
    runs: list[RunResult] = field(default_factory=list)
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)
    delta: tuple[float, float, float] = (math.nan, math.nan, math.nan)

    @property
    def skipped(self) -> bool:
        return self.reason is not None


@dataclass
class AblationResult:
    """All runs of an ablation (the search grid included), with the chosen strengths."""

    config: AblationConfig
    ablation_id: str
    started: datetime
    columns: dict[str, tuple[str, str]]
    #: the metric compared with the baseline (``test_acc``; with ``--config``, the monitor).
    compare: str
    #: the metric the strength is selected on, and its mode.
    select: tuple[str, str]
    runs: list[RunResult] = field(default_factory=list)
    chosen: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    finished: datetime | None = None
    files: dict[str, Path] = field(default_factory=dict)
    #: the closed wandb run objects by run name, and the summary run, if wandb was used.
    wandb_runs: dict[str, Any] = field(default_factory=dict)

    def runs_of(self, technique: str, strength: Any = ...) -> list[RunResult]:
        """The runs of ``technique`` (at ``strength``, default: the chosen one), by seed."""
        if strength is ...:
            strength = self.chosen.get(technique)
        return sorted(
            (r for r in self.runs if r.technique == technique and r.strength == strength),
            key=lambda r: r.seed,
        )

    def rows(self) -> list[Row]:
        """The table, in run order; skipped techniques have a reason and no statistics."""
        base = {r.seed: r.metrics.get(self.compare, math.nan) for r in self.runs_of("baseline")}
        rows = []
        for name in self.order:
            if name in self.skipped:
                rows.append(Row(name, reason=self.skipped[name]))
                continue
            runs = self.runs_of(name)
            keys = list(dict.fromkeys(k for r in runs for k in r.metrics))
            stats = {k: mean_ci([r.metrics.get(k, math.nan) for r in runs]) for k in keys}
            seeds = [r.seed for r in runs if r.seed in base]
            delta = paired_difference(
                [r.metrics.get(self.compare, math.nan) for r in runs if r.seed in base],
                [base[s] for s in seeds],
            )
            rows.append(Row(name, self.chosen.get(name), None, runs, stats, delta))
        return rows

    def search_rows(self) -> list[dict[str, Any]]:
        """One row per (technique, strength) that ran: mean selection and comparison metric."""
        out = []
        seen: list[tuple[str, Any]] = []
        for r in self.runs:
            key = (r.technique, registry.strength_label(r.technique, r.strength))
            if key not in seen:
                seen.append(key)
        for name, label in seen:
            runs = [
                r
                for r in self.runs
                if r.technique == name and registry.strength_label(name, r.strength) == label
            ]
            sel, comp = self.select[0], self.compare
            chosen = registry.strength_label(name, self.chosen.get(name)) == label
            out.append(
                {
                    "technique": name,
                    "strength": label,
                    "seeds": len(runs),
                    f"{sel}_mean": mean_ci([r.metrics.get(sel, math.nan) for r in runs])[0],
                    f"{comp}_mean": mean_ci([r.metrics.get(comp, math.nan) for r in runs])[0],
                    "chosen": chosen,
                }
            )
        return out


# ------------------------------------------------------------------------ measurements
def weight_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero entries among the weights (``ParamSelection("weights")``)."""
    params = ParamSelection("weights").parameters(model, allow_empty=True)
    total = sum(p.numel() for p in params)
    if total == 0:
        return 0.0
    return sum(int((p.detach() == 0).sum()) for p in params) / total


def max_unit_norm(model: nn.Module) -> float:
    """The largest L2 norm of one unit's incoming weights (dim 0 units) over all weights."""
    best = 0.0
    for p in ParamSelection("weights").parameters(model, allow_empty=True):
        best = max(best, float(p.detach().flatten(1).norm(dim=1).max()))
    return best


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == y).float().mean())


@torch.no_grad()
def evaluate(
    module: nn.Module, data: DemoData, *, noise_scale: float = 0.5, noise_draws: int = 3
) -> dict[str, float]:
    """Final metrics of a trained module, in eval mode, on CPU in float32."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    was_training = module.training
    module = module.to("cpu").float().eval()
    try:
        train_logits = module(data.x_train)
        val_logits = module(data.x_val)
        test_logits = module(data.x_test)
        gen = torch.Generator().manual_seed(1234)
        std = data.feature_std()
        noisy = [
            _accuracy(
                module(
                    data.x_test
                    + torch.randn(data.x_test.shape, generator=gen) * (noise_scale * std)
                ),
                data.y_test,
            )
            for _ in range(noise_draws)
        ]
        metrics = {
            "train_acc": _accuracy(train_logits, data.y_train),
            "val_acc": _accuracy(val_logits, data.y_val),
            "val_nll": float(F.cross_entropy(val_logits, data.y_val)),
            "test_acc": _accuracy(test_logits, data.y_test),
            "test_nll": float(F.cross_entropy(test_logits, data.y_test)),
            "ece": float(
                multiclass_calibration_error(
                    test_logits.softmax(dim=1), data.y_test, data.num_classes, n_bins=15
                )
            ),
            "noisy_acc": statistics.fmean(noisy),
            "sparsity": weight_sparsity(module),
            "max_unit_norm": max_unit_norm(module),
        }
        metrics["gap"] = metrics["train_acc"] - metrics["test_acc"]
        return metrics
    finally:
        module.train(was_training)


class EpochTimer(Callback):
    """Wall time of the training part of each epoch (validation excluded)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start: float | None = None

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def _stop(self) -> None:
        if self._start is not None:
            self.times.append(time.perf_counter() - self._start)
            self._start = None

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._stop()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()

    def median(self) -> float:
        return statistics.median(self.times) if self.times else math.nan


def early_stopping_epochs(callbacks: list[Callback], epochs_run: int) -> dict[str, float]:
    """``stopped_epoch`` and ``restored_epoch`` (1-based) of an early-stopping callback."""
    for cb in callbacks:
        if isinstance(cb, EarlyStoppingCallback):
            stopped = cb.stopped_epoch + 1 if cb.stopped_epoch > 0 else epochs_run
            return {"stopped_epoch": float(stopped), "restored_epoch": float(cb.best_epoch + 1)}
    return {}


def lean_trainer_kwargs(cfg: AblationConfig) -> dict[str, Any]:
    """Trainer flags without checkpointing, progress bar or model summary."""
    kwargs: dict[str, Any] = dict(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    if cfg.precision is not None:
        kwargs["precision"] = cfg.precision
    return kwargs


# ------------------------------------------------------------------------------ backends
class DemoBackend:
    """Runs on a bundled dataset with the demo network (``--dataset``, ``--model``)."""

    columns = DEMO_METRICS

    def __init__(self, cfg: AblationConfig) -> None:
        self.cfg = cfg
        self.data = load_dataset(cfg.dataset, train_size=cfg.train_size, split_seed=cfg.split_seed)
        self.kind = self.data.info.kind
        self.compare = "test_acc"
        self.select = ("val_acc", "max")
        self.steps_per_epoch = math.ceil(len(self.data.y_train) / cfg.batch_size)

    def _module(self, recipe: registry.Recipe | None = None) -> DemoClassifier:
        cls = (recipe.module_class if recipe else None) or DemoClassifier
        arch = (recipe.arch if recipe else None) or self.cfg.model
        if self.kind == "tabular":
            arch = "auto"
        return cls(
            self.kind,
            list(self.data.input_shape),
            self.data.num_classes,
            lr=self.cfg.lr,
            optimizer=self.cfg.optimizer,
            cosine=False,
            arch=arch,
        )

    def context(self) -> registry.TechniqueContext:
        return registry.TechniqueContext(
            num_classes=self.data.num_classes,
            kind=self.kind,
            input_shape=self.data.input_shape,
            batch_size=self.cfg.batch_size,
            steps_per_epoch=self.steps_per_epoch,
            model=self._module(),
            monitor=("val_acc", "max"),
        )

    def skip_reason(self, name: str, ctx: registry.TechniqueContext) -> str | None:
        if name in registry.ARCHITECTURE and self.cfg.model == "cnn":
            return "the run already uses --model cnn"
        return registry.skip_reason(name, ctx)

    def run(
        self, recipe: registry.Recipe, seed: int, logger: Any, extra: list[Callback]
    ) -> tuple[dict[str, float], list[int], list[float], pl.Trainer]:
        cfg = self.cfg
        module = self._module(recipe)
        for key, value in recipe.module_attrs.items():
            setattr(module, key, value)
        for surgery in recipe.surgery:
            surgery(module)
        timer = EpochTimer()
        callbacks = [timer, *recipe.callbacks, *extra]
        trainer = pl.Trainer(
            max_epochs=cfg.epochs,
            callbacks=callbacks,
            logger=logger,
            log_every_n_steps=self.steps_per_epoch,
            check_val_every_n_epoch=cfg.val_every,
            **lean_trainer_kwargs(cfg),
        )
        d = self.data
        train = make_loader(
            d.x_train, d.y_train, batch_size=cfg.batch_size, shuffle=True, seed=seed
        )
        val = make_loader(d.x_val, d.y_val, batch_size=4096, shuffle=False)
        trainer.fit(module, train, val)
        metrics = evaluate(module, d, noise_scale=cfg.noise_scale, noise_draws=1 if cfg.fast else 3)
        metrics["train_s_per_epoch"] = timer.median()
        metrics["epochs_run"] = float(trainer.current_epoch)
        metrics.update(early_stopping_epochs(recipe.callbacks, trainer.current_epoch))
        history = [h.tolist() for h in module.val_history]
        epochs = [cfg.val_every * (i + 1) for i in range(len(history))]
        return metrics, epochs, [c / n for n, c, _ in history], trainer

    def warm_up(self) -> None:
        """One untimed two-batch fit, so the first timed run pays no one-off start-up costs."""
        module = self._module()
        loader = make_loader(
            self.data.x_train, self.data.y_train, batch_size=self.cfg.batch_size, shuffle=False
        )
        pl.Trainer(
            max_epochs=1,
            limit_train_batches=2,
            limit_val_batches=1,
            logger=False,
            **lean_trainer_kwargs(self.cfg),
        ).fit(module, loader, loader)
        evaluate(module, self.data, noise_draws=1)


# ------------------------------------------------------------------------------ loggers
def _make_logger(
    cfg: AblationConfig, ablation_id: str, technique: str, strength: Any, seed: int
) -> Any:
    label = registry.strength_label(technique, strength)
    name = f"{technique}-seed{seed}" + ("" if label == "-" else f"-{label}")
    if cfg.logger == "none":
        return False
    if cfg.logger == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(cfg.out / "logs", name=ablation_id, version=name)
    if cfg.logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(cfg.out / "logs", name=ablation_id, version=name)
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(
        project=cfg.wandb_project,
        name=name,
        group=ablation_id,
        job_type=technique,
        save_dir=str(cfg.out),
        mode=cfg.wandb_mode,
        config={
            "technique": technique,
            "strength": label,
            "seed": seed,
            "dataset": str(cfg.config) if cfg.config else cfg.dataset,
            "model": cfg.model,
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "description": registry.describe(technique).description,
        },
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
    )


# ----------------------------------------------------------------------------- all runs
ProgressFn = Callable[[str, int, int], None]
WandbHook = Callable[[str, Any], None]


def _jobs(cfg: AblationConfig, names: list[str], skipped: dict[str, str]) -> list[tuple[str, Any]]:
    """(technique, strength) pairs to run before the combined recipe."""
    jobs: list[tuple[str, Any]] = []
    for name in names:
        if name in skipped or name == registry.COMBINED_NAME:
            continue
        t = registry.TECHNIQUES[name]
        strengths = t.grid if cfg.search and t.grid else (t.default,)
        jobs += [(name, s) for s in strengths]
    return jobs


def run_ablation(
    cfg: AblationConfig,
    *,
    backend: Any = None,
    progress: ProgressFn | None = None,
    wandb_hook: WandbHook | None = None,
) -> AblationResult:
    """Run the baseline, every technique (each grid strength with ``cfg.search``) and combined.

    Args:
        cfg: the configuration.
        backend: what trains one run (default: :class:`DemoBackend` of ``cfg``).
        progress: ``progress(description, done, total)`` called before and after each run.
        wandb_hook: ``wandb_hook(run_name, run)`` called with each open wandb run just before
            it is finished (its ``run.summary`` is readable then).
    """
    backend = backend if backend is not None else DemoBackend(cfg)
    started = datetime.now()
    source = cfg.config.stem if cfg.config else f"{cfg.dataset}-{cfg.model}"
    ablation_id = f"ablation-{source}-{started:%Y%m%d-%H%M%S}"
    cfg.out.mkdir(parents=True, exist_ok=True)
    ctx = backend.context()
    names = list(dict.fromkeys(["baseline", *cfg.techniques]))
    result = AblationResult(
        cfg, ablation_id, started, backend.columns, backend.compare, backend.select, order=names
    )
    for name in names:
        if (reason := backend.skip_reason(name, ctx)) is not None:
            result.skipped[name] = reason
    jobs = _jobs(cfg, names, result.skipped)
    combined = registry.COMBINED_NAME in names and registry.COMBINED_NAME not in result.skipped
    total = (len(jobs) + combined) * cfg.seeds
    done = 0

    def one(name: str, strength: Any, seed: int) -> None:
        nonlocal done
        label = registry.strength_label(name, strength)
        what = f"{name} {'' if label == '-' else label + ' '}seed {seed}"
        if progress is not None:
            progress(what, done, total)
        pl.seed_everything(seed, verbose=False)
        recipe = registry.build_recipe(name, ctx, strength)
        logger = _make_logger(cfg, ablation_id, name, strength, seed)
        monitor = RegularizationMonitorCallback(num_classes=ctx.num_classes)
        if cfg.logger == "wandb":
            _ = logger.experiment  # start the wandb run outside the timed part
        metrics, epochs, curve, trainer = backend.run(recipe, seed, logger, [monitor])
        run = RunResult(name, strength, seed, metrics, epochs, curve)
        if cfg.logger == "wandb" and trainer.is_global_zero:
            wandb_run = logger.experiment
            wandb_run.summary.update({f"final/{k}": v for k, v in metrics.items()})
            run.wandb_summary = {k: wandb_run.summary[k] for k in list(wandb_run.summary.keys())}
            if wandb_hook is not None:
                wandb_hook(f"{name}-seed{seed}-{label}", wandb_run)
            wandb_run.finish()
            result.wandb_runs[f"{name}-seed{seed}-{label}"] = wandb_run
        result.runs.append(run)
        done += 1
        if progress is not None:
            progress(what, done, total)

    quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [q.level for q in quiet]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for q in quiet:
            q.setLevel(logging.ERROR)
        try:
            if total > 1 and hasattr(backend, "warm_up"):
                backend.warm_up()
            # Seed-major order: slow drifts of the machine's speed spread over all techniques.
            for seed in range(cfg.seeds):
                for name, strength in jobs:
                    one(name, strength, seed)
            select_key, select_mode = backend.select
            for name in dict.fromkeys(n for n, _ in jobs):
                by_strength = {
                    s: [r.metrics for r in result.runs if r.technique == name and r.strength == s]
                    for n, s in jobs
                    if n == name
                }
                result.chosen[name] = select_strength(by_strength, select_key, select_mode)
            if combined:
                parts = {
                    n: result.chosen.get(n, registry.TECHNIQUES[n].default)
                    for n in registry.COMBINED
                    if backend.skip_reason(n, ctx) is None
                }
                result.chosen[registry.COMBINED_NAME] = parts
                for seed in range(cfg.seeds):
                    one(registry.COMBINED_NAME, parts, seed)
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)
    result.finished = datetime.now()
    return result


def validate_techniques(names: list[str]) -> None:
    """Raise ``ValueError`` for an unknown technique name."""
    known = registry.all_names()
    for name in names:
        if name not in known:
            raise ValueError(f"unknown technique {name!r}; choose from {', '.join(known)}")


def default_techniques() -> list[str]:
    """Every technique, then ``"combined"``."""
    return registry.all_names()
