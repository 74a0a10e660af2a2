"""``lightning-reg ablate --config run.yaml``: the same ablation on the user's own model.

``run.yaml`` holds LightningCLI's ``model:``, ``data:`` and ``trainer:`` sections
(``class_path`` / ``init_args``): the same file ``LightningCLI(...) fit --config run.yaml``
accepts. :class:`ConfigBackend` builds every run with ``LightningCLI(run=False, args=...)``, so
each run gets fresh instances, the user's trainer flags (devices, strategy, precision,
max_epochs...) and the seed; the technique's callbacks are appended to the YAML's callbacks and
its surgery runs on the fresh LightningModule.

Before any run, one *probe* builds the model and data once, draws one training batch ``[x, y]``
and calls ``training_step`` twice: with ``y`` and with one-hot float targets. If the first call
works and the second fails, the loss does not accept soft targets, and MixUp, CutMix and label
smoothing are reported as skipped with the error. The Jacobian penalty needs
:class:`~lightning_reg.JacobianPenaltyMixin` on the module; ghost/precise BN need BatchNorm;
stochastic depth needs a residual block (:func:`~lightning_reg.demo.techniques.skip_reason`).

After ``fit``, ``trainer.validate`` gives every metric the model logs at validation end (after
early stopping has restored its best weights); when ``train_<name>`` (or ``train_<name>_epoch``)
is logged too, the table adds the gap ``train_<name> − val_<name>``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_reg.demo import techniques as registry
from lightning_reg.demo.ablation import (
    AblationConfig,
    EpochTimer,
    early_stopping_epochs,
    max_unit_norm,
    weight_sparsity,
)

__all__ = ["ConfigBackend", "ConfigError"]


class ConfigError(ValueError):
    """Bad ``--config`` input: the CLI prints it as one line and exits with code 2."""


class MetricHistory(Callback):
    """The value of one metric at the end of each validation (the curve of the run)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.epochs: list[int] = []
        self.values: list[float] = []

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.key)
        if value is not None and not trainer.sanity_checking:
            self.epochs.append(trainer.current_epoch + 1)
            self.values.append(float(value))


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _first_batch(cli: Any) -> Any:
    source = cli.datamodule if cli.datamodule is not None else cli.model
    if cli.datamodule is not None:
        cli.datamodule.prepare_data()
        cli.datamodule.setup("fit")
    loader = source.train_dataloader()
    return next(iter(loader)), len(loader)


class ConfigBackend:
    """Builds and trains each run from the user's LightningCLI YAML.

    Raises:
        ConfigError: for a YAML that LightningCLI rejects (missing class, no ``model:``...), and
            from :meth:`run` for a ``--monitor`` the model does not log at validation end.
    """

    def __init__(self, cfg: AblationConfig) -> None:
        if cfg.config is None:
            raise ConfigError("argument --config: a YAML file is required")
        self.cfg = cfg
        self.path = Path(cfg.config)
        self.compare = cfg.monitor
        self.select = (cfg.monitor, cfg.mode)
        #: table columns; filled in from what the first run logs at validation end.
        self.columns: dict[str, tuple[str, str]] = {}
        # Like `python train.py`, class paths resolve from the current folder too.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        self._probe = self._build(seed=0, callbacks=[])
        if type(self._probe.model) is pl.LightningModule:  # LightningCLI's default: no `model:`
            raise ConfigError(
                f"argument --config: {self.path} has no `model:` section (the class_path and "
                "init_args of your LightningModule)"
            )
        self._context = self._make_context()

    # ----------------------------------------------------------------------- building
    def _build(self, seed: int, callbacks: list[Callback]) -> Any:
        from jsonargparse import ArgumentError
        from lightning.pytorch.cli import LightningCLI

        args = ["--config", str(self.path), f"--seed_everything={seed}"]
        if self.cfg.epochs_override is not None:
            args.append(f"--trainer.max_epochs={self.cfg.epochs_override}")
        try:
            return LightningCLI(
                subclass_mode_model=True,
                subclass_mode_data=True,
                save_config_callback=None,
                trainer_defaults={"callbacks": callbacks},
                parser_kwargs={"exit_on_error": False},
                args=args,
                run=False,
            )
        except (ArgumentError, ImportError, TypeError, ValueError) as err:
            raise ConfigError(f"argument --config: {self.path}: {_one_line(err)}") from None

    def context(self) -> registry.TechniqueContext:
        return self._context

    def _make_context(self) -> registry.TechniqueContext:
        cli = self._probe
        model = cli.model
        try:
            batch, steps = _first_batch(cli)
        except Exception as err:
            raise ConfigError(
                f"argument --config: cannot draw a training batch: {_one_line(err)}"
            ) from None
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            x, y = batch, None
        else:
            x, y = batch[0], batch[1]
        soft, why, num_classes = False, "the batch is not [inputs, integer targets]", 0
        if (
            isinstance(x, torch.Tensor)
            and isinstance(y, torch.Tensor)
            and not y.is_floating_point()
        ):
            with torch.no_grad():
                num_classes = int(model(x).shape[-1])
            soft, why = self._soft_target_probe(model, x, y, num_classes)
        return registry.TechniqueContext(
            num_classes=max(num_classes, 2),
            kind="config",
            input_shape=tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else (),
            batch_size=int(x.shape[0]) if isinstance(x, torch.Tensor) else 1,
            steps_per_epoch=max(int(steps), 1),
            model=model,
            monitor=(self.cfg.monitor, self.cfg.mode),
            soft_targets=soft,
            soft_targets_error=why,
        )

    @staticmethod
    def _soft_target_probe(
        model: Any, x: torch.Tensor, y: torch.Tensor, k: int
    ) -> tuple[bool, str]:
        """One ``training_step`` with hard targets, one with one-hot float targets."""
        import warnings

        soft = F.one_hot(y.long(), k).float()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            try:
                model.training_step([x, y], 0)
            except Exception as err:
                return False, f"probe step failed even with hard targets: {_one_line(err)}"
            try:
                model.training_step([x, soft], 0)
            except Exception as err:
                return False, f"{type(err).__name__}: {_one_line(err)}"
        return True, ""

    def skip_reason(self, name: str, ctx: registry.TechniqueContext) -> str | None:
        if name == "cutmix" and len(ctx.input_shape) < 3:
            return "CutMix pastes 2-D boxes: it needs image inputs (B, C, H, W)"
        if name in registry.ARCHITECTURE:
            return "changes the demo's architecture; not for --config"
        return registry.skip_reason(name, ctx)

    # ----------------------------------------------------------------------- one run
    def run(
        self, recipe: registry.Recipe, seed: int, logger: Any, extra: list[Callback]
    ) -> tuple[dict[str, float], list[int], list[float], pl.Trainer]:
        timer, history = EpochTimer(), MetricHistory(self.cfg.monitor)
        cli = self._build(seed, [timer, history, *recipe.callbacks, *extra])
        model, trainer = cli.model, cli.trainer
        for key, value in recipe.module_attrs.items():
            setattr(model, key, value)
        for surgery in recipe.surgery:
            surgery(model)
        if logger is not False:
            trainer.loggers = [logger]
        trainer.fit(model, datamodule=cli.datamodule)
        train = {}
        for key, value in trainer.callback_metrics.items():
            if key.startswith("train_") and not key.endswith("_step"):
                train[key.removesuffix("_epoch")] = float(value)
        logged = trainer.validate(model, datamodule=cli.datamodule, verbose=False)
        metrics = {k: float(v) for k, v in (logged[0] if logged else {}).items()}
        if self.cfg.monitor not in metrics:
            raise ConfigError(
                f"argument --monitor: {self.cfg.monitor!r} is not logged at validation end; "
                f"logged: {', '.join(sorted(metrics)) or 'nothing'}"
            )
        for key in list(metrics):
            name = key.removeprefix("val_")
            if key.startswith("val_") and f"train_{name}" in train:
                metrics[f"gap_{name}"] = train[f"train_{name}"] - metrics[key]
        metrics["sparsity"] = weight_sparsity(model)
        metrics["max_unit_norm"] = max_unit_norm(model)
        metrics["train_s_per_epoch"] = timer.median()
        metrics.update(early_stopping_epochs(recipe.callbacks, trainer.current_epoch))
        if not self.columns:
            for key in metrics:
                if key.startswith("gap_"):
                    self.columns[key] = (f"train−val {key[4:]} gap", "float")
                elif (
                    key not in ("sparsity", "max_unit_norm", "train_s_per_epoch")
                    and "epoch" not in key
                ):
                    self.columns[key] = (key, "float")
            self.columns["sparsity"] = ("zero weights %", "pct")
            self.columns["max_unit_norm"] = ("max ‖w_unit‖", "float")
            self.columns["train_s_per_epoch"] = ("s/epoch", "s")
        return metrics, history.epochs, history.values, trainer
