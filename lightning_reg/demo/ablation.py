"""The ablation runner: the same model, once per technique and seed, then evaluated.

Every run trains :class:`~lightning_reg.demo.model.DemoClassifier` from the same seed-dependent
initialisation on the same split, with the technique's recipe added, plus a
:class:`~lightning_reg.monitor.RegularizationMonitorCallback` and an epoch timer. After
training, the model is evaluated in eval mode on the clean training set, the validation set and
a noisy copy of the validation set (Gaussian, σ = ``noise_scale`` × each feature's training
standard deviation).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
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

from lightning_reg.core.params import ParamSelection
from lightning_reg.demo import techniques as registry
from lightning_reg.demo.data import DemoData, load_dataset, make_loader
from lightning_reg.demo.model import DemoClassifier
from lightning_reg.monitor import RegularizationMonitorCallback

__all__ = [
    "METRICS",
    "AblationConfig",
    "AblationResult",
    "RunResult",
    "evaluate",
    "max_unit_norm",
    "run_ablation",
    "weight_sparsity",
]

#: Per-run metrics, in table order: key → (header, kind). kind: "pct", "pp", "float", "s".
METRICS: dict[str, tuple[str, str]] = {
    "val_acc": ("val acc %", "pct"),
    "gap": ("train−val gap pp", "pp"),
    "val_nll": ("val NLL", "float"),
    "ece": ("ECE %", "pct"),
    "confidence": ("mean conf %", "pct"),
    "sparsity": ("zero weights %", "pct"),
    "noisy_acc": ("noisy acc %", "pct"),
    "max_unit_norm": ("max ‖w_unit‖", "float"),
    "seconds": ("s", "s"),
    "train_s_per_epoch": ("train s/epoch", "s"),
}


@dataclass
class AblationConfig:
    """Everything a run depends on. See ``lightning-reg ablate --help``."""

    techniques: list[str] = field(default_factory=registry.all_names)
    dataset: str = "digits"
    seeds: int = 3
    epochs: int = 20
    train_size: int | None = None
    batch_size: int = 64
    val_every: int = 2
    lr: float = 0.05
    optimizer: str = "sgd"
    width: int | None = None
    noise_scale: float = 0.5
    accelerator: str = "auto"
    devices: int | str = 1
    precision: str | None = None
    out: Path = Path("ablation")
    logger: str = "wandb"
    wandb_mode: str = "offline"
    wandb_project: str = "lightning-reg"
    split_seed: int = 0
    fast: bool = False


@dataclass
class RunResult:
    """One (technique, seed) run: final metrics and the validation curve."""

    technique: str
    seed: int
    metrics: dict[str, float]
    curve_epochs: list[int]
    curve_val_acc: list[float]
    curve_val_nll: list[float]
    epochs_run: int
    wandb_summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class AblationResult:
    """All runs of an ablation, with the aggregated table."""

    config: AblationConfig
    ablation_id: str
    runs: list[RunResult]
    started: datetime
    finished: datetime | None = None
    files: dict[str, Path] = field(default_factory=dict)
    #: the last wandb run object per run name (closed) and the summary run, if wandb was used.
    wandb_runs: dict[str, Any] = field(default_factory=dict)

    def by_technique(self) -> dict[str, list[RunResult]]:
        out: dict[str, list[RunResult]] = {}
        for run in self.runs:
            out.setdefault(run.technique, []).append(run)
        return out

    def aggregate(self) -> dict[str, dict[str, tuple[float, float]]]:
        """technique → metric → (mean, std over seeds; std 0 for one seed)."""
        table: dict[str, dict[str, tuple[float, float]]] = {}
        for name, runs in self.by_technique().items():
            row = {}
            for key in (*METRICS, "train_acc", "epochs_run", "inputs_used"):
                values = [r.metrics[key] for r in runs if key in r.metrics]
                if not values:
                    continue
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                row[key] = (statistics.fmean(values), std)
            table[name] = row
        return table


# ------------------------------------------------------------------------ measurements
def weight_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero entries among the weights (``ParamSelection("weights")``)."""
    params = ParamSelection("weights").parameters(model, allow_empty=True)
    total = sum(p.numel() for p in params)
    if total == 0:
        return 0.0
    zeros = sum(int((p.detach() == 0).sum()) for p in params)
    return zeros / total


def max_unit_norm(model: nn.Module) -> float:
    """The largest L2 norm of one unit's incoming weights (dim 0 units) over all weights."""
    best = 0.0
    for p in ParamSelection("weights").parameters(model, allow_empty=True):
        norms = p.detach().flatten(1).norm(dim=1)
        best = max(best, float(norms.max()))
    return best


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == y).float().mean())


@torch.no_grad()
def evaluate(
    module: DemoClassifier, data: DemoData, *, noise_scale: float = 0.5, noise_draws: int = 3
) -> dict[str, float]:
    """Final metrics of a trained module, in eval mode, on CPU in float32."""
    from torchmetrics.classification import MulticlassCalibrationError

    was_training = module.training
    module = module.to("cpu").float().eval()
    try:
        train_logits = module(data.x_train)
        val_logits = module(data.x_val)
        std = data.feature_std()
        gen = torch.Generator().manual_seed(1234)
        noisy = []
        for _ in range(noise_draws):
            noise = torch.randn(data.x_val.shape, generator=gen) * (noise_scale * std)
            noisy.append(_accuracy(module(data.x_val + noise), data.y_val))
        ece = MulticlassCalibrationError(num_classes=data.num_classes, n_bins=15, norm="l1")
        metrics = {
            "train_acc": _accuracy(train_logits, data.y_train),
            "val_acc": _accuracy(val_logits, data.y_val),
            "val_nll": float(F.cross_entropy(val_logits, data.y_val)),
            "ece": float(ece(val_logits.softmax(dim=1), data.y_val)),
            "confidence": float(val_logits.softmax(dim=1).max(dim=1).values.mean()),
            "noisy_acc": statistics.fmean(noisy),
            "sparsity": weight_sparsity(module),
            "max_unit_norm": max_unit_norm(module),
        }
        metrics["gap"] = metrics["train_acc"] - metrics["val_acc"]
        if data.info.kind == "tabular":
            stem = module.model.stem.weight.detach()
            metrics["inputs_used"] = float((stem.abs().sum(dim=0) > 0).sum())
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


# ------------------------------------------------------------------------------ loggers
def _make_logger(cfg: AblationConfig, ablation_id: str, technique: str, seed: int) -> Any:
    name = f"{technique}-seed{seed}"
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
            "seed": seed,
            "dataset": cfg.dataset,
            "epochs": cfg.epochs,
            "train_size": cfg.train_size,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "description": registry.describe(technique).description,
        },
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
    )


def _summary_dict(run: Any) -> dict[str, Any]:
    return {key: run.summary[key] for key in list(run.summary.keys())}


_WANDB_INIT_SECONDS: list[float] = []


# ------------------------------------------------------------------------------ one run
def run_one(
    technique: str,
    seed: int,
    data: DemoData,
    cfg: AblationConfig,
    ablation_id: str,
    *,
    wandb_hook: Callable[[str, Any], None] | None = None,
    noise_draws: int = 3,
) -> tuple[RunResult, Any]:
    """Train and evaluate one (technique, seed) run. Returns the result and the wandb run."""
    pl.seed_everything(seed, verbose=False)
    steps_per_epoch = math.ceil(len(data.y_train) / cfg.batch_size)
    ctx = registry.TechniqueContext(
        num_classes=data.num_classes,
        kind=data.info.kind,
        input_shape=data.input_shape,
        batch_size=cfg.batch_size,
        steps_per_epoch=steps_per_epoch,
        epochs=cfg.epochs,
        val_every=cfg.val_every,
    )
    recipe = registry.build_recipe(technique, ctx)
    module_class = recipe.module_class or DemoClassifier
    module = module_class(
        data.info.kind,
        list(data.input_shape),
        data.num_classes,
        width=cfg.width,
        lr=cfg.lr,
        optimizer=cfg.optimizer,
    )
    for key, value in recipe.module_attrs.items():
        setattr(module, key, value)
    for surgery in recipe.surgery:
        surgery(module)
    timer = EpochTimer()
    monitor = RegularizationMonitorCallback(
        num_classes=data.num_classes, gap_metrics=("acc", "loss")
    )
    logger = _make_logger(cfg, ablation_id, technique, seed)
    trainer_kwargs: dict[str, Any] = dict(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        max_epochs=cfg.epochs,
        callbacks=[timer, *recipe.callbacks, monitor],
        logger=logger,
        log_every_n_steps=steps_per_epoch,
        check_val_every_n_epoch=cfg.val_every,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    if cfg.precision is not None:
        trainer_kwargs["precision"] = cfg.precision
    trainer = pl.Trainer(**trainer_kwargs)
    train_loader = make_loader(
        data.x_train, data.y_train, batch_size=cfg.batch_size, shuffle=True, seed=seed
    )
    val_loader = make_loader(data.x_val, data.y_val, batch_size=4096, shuffle=False)
    if cfg.logger == "wandb" and trainer.is_global_zero:
        t0 = time.perf_counter()
        _ = logger.experiment  # start the wandb run outside the timed part
        _WANDB_INIT_SECONDS.append(time.perf_counter() - t0)
    start = time.perf_counter()
    trainer.fit(module, train_loader, val_loader)
    seconds = time.perf_counter() - start

    metrics = evaluate(module, data, noise_scale=cfg.noise_scale, noise_draws=noise_draws)
    metrics["seconds"] = seconds
    # Median over epochs: robust to the odd epoch slowed down by something else on the machine.
    metrics["train_s_per_epoch"] = statistics.median(timer.times) if timer.times else math.nan
    epochs_run = trainer.current_epoch
    metrics["epochs_run"] = float(epochs_run)
    history = [h.tolist() for h in module.val_history]
    val_epochs = [cfg.val_every * (i + 1) for i in range(len(history))]
    result = RunResult(
        technique=technique,
        seed=seed,
        metrics=metrics,
        curve_epochs=val_epochs,
        curve_val_acc=[c / n for n, c, _ in history],
        curve_val_nll=[s / n for n, _, s in history],
        epochs_run=epochs_run,
    )
    wandb_run = None
    if cfg.logger == "wandb" and trainer.is_global_zero:
        wandb_run = logger.experiment
        wandb_run.summary.update({f"final/{k}": v for k, v in metrics.items()})
        result.wandb_summary = _summary_dict(wandb_run)
        if wandb_hook is not None:
            wandb_hook(f"{technique}-seed{seed}", wandb_run)
        wandb_run.finish()
    return result, wandb_run


def _warm_up(data: DemoData, cfg: AblationConfig) -> None:
    """One untimed two-batch fit, so the first timed run does not pay one-off start-up costs."""
    module = DemoClassifier(
        data.info.kind, list(data.input_shape), data.num_classes, width=cfg.width, lr=cfg.lr
    )
    kwargs: dict[str, Any] = dict(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    if cfg.precision is not None:
        kwargs["precision"] = cfg.precision
    loader = make_loader(data.x_train, data.y_train, batch_size=cfg.batch_size, shuffle=False)
    pl.Trainer(**kwargs).fit(module, loader, loader)
    evaluate(module, data, noise_draws=1)


# ----------------------------------------------------------------------------- all runs
def run_ablation(
    cfg: AblationConfig,
    *,
    progress: Callable[[str, int, int], None] | None = None,
    wandb_hook: Callable[[str, Any], None] | None = None,
) -> AblationResult:
    """Run every (technique, seed) of ``cfg``.

    Args:
        cfg: the configuration.
        progress: ``progress(description, done, total)`` called before and after each run.
        wandb_hook: ``wandb_hook(run_name, run)`` called with each open wandb run just before
            it is finished (its ``run.summary`` is readable then).
    """
    data = load_dataset(cfg.dataset, train_size=cfg.train_size, split_seed=cfg.split_seed)
    started = datetime.now()
    ablation_id = f"ablation-{cfg.dataset}-{started:%Y%m%d-%H%M%S}"
    cfg.out.mkdir(parents=True, exist_ok=True)
    names = [n for n in cfg.techniques if registry.applies_to(n, data.info.kind)]
    # Seed-major order: slow drifts of the machine's speed spread over all techniques.
    jobs = [(n, seed) for seed in range(cfg.seeds) for n in names]
    result = AblationResult(cfg, ablation_id, [], started)
    noise_draws = 1 if cfg.fast else 3
    quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [q.level for q in quiet]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for q in quiet:
            q.setLevel(logging.ERROR)
        try:
            if len(jobs) > 1:
                _warm_up(data, cfg)
            for i, (name, seed) in enumerate(jobs):
                if progress is not None:
                    progress(f"{name} seed {seed}", i, len(jobs))
                run, wandb_run = run_one(
                    name,
                    seed,
                    data,
                    cfg,
                    ablation_id,
                    wandb_hook=wandb_hook,
                    noise_draws=noise_draws,
                )
                result.runs.append(run)
                if wandb_run is not None:
                    result.wandb_runs[f"{name}-seed{seed}"] = wandb_run
                if progress is not None:
                    progress(f"{name} seed {seed}", i + 1, len(jobs))
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)
    result.finished = datetime.now()
    return result


def default_techniques(kind: str | None = None) -> list[str]:
    """Every registered technique that is installed (and applies to ``kind``)."""
    names = [n for n in registry.all_names() if registry.available(n)[0]]
    if kind is not None:
        names = [n for n in names if registry.applies_to(n, kind)]
    return names


def validate_techniques(names: Sequence[str]) -> None:
    """Raise ``ValueError`` for an unknown or uninstalled technique name."""
    known = registry.all_names()
    for name in names:
        if name not in known:
            raise ValueError(f"unknown technique {name!r}; choose from {', '.join(known)}")
        ok, why = registry.available(name)
        if not ok:
            raise ValueError(f"technique {name!r} is not available: {why}")
