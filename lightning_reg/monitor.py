"""Regularization diagnostics: weight norms, sparsity, train − val gap, calibration.

:class:`RegularizationMonitorCallback` watches what regularization does to a model while it
trains. It logs, under ``reg/monitor/...``:

======================================  ==========================================  ==============
key                                     what                                        when
======================================  ==========================================  ==============
``reg/monitor/norm/<layer>``            ``‖W‖₂`` (Frobenius) of each selected       logging steps
                                        weight; ``<layer>`` is the parameter name
                                        without its ``.weight`` suffix
``reg/monitor/norm/total``              ``sqrt(Σ ‖W‖²)`` over the selected weights  logging steps
``reg/monitor/sparsity``                fraction of selected weight entries that    logging steps
                                        are exactly ``0``
``reg/monitor/nonfinite``               number of NaN/inf entries of the selected   logging steps
                                        weights (counted only once a norm is not
                                        finite, otherwise 0)
``reg/monitor/hist/<layer>``            ``wandb.Histogram`` of the finite entries   logging steps
                                        of each weight (only with a ``WandbLogger``)
``reg/monitor/gap/<metric>``            ``train_<metric> − val_<metric>``           train epoch end
``reg/monitor/ece``                     expected calibration error of the           val epoch end
                                        validation predictions (torchmetrics
                                        ``MulticlassCalibrationError``)
======================================  ==========================================  ==============

The step diagnostics are computed only on logging steps (Lightning's ``log_every_n_steps``, or
``every_n_steps``), with one foreach norm kernel for the norms (accumulated in float32 or
wider), exact integer non-zero counts, and a single device-to-host copy of the results. The
selection is resolved again when what is trainable changes (``BackboneFinetuning``). Like
Lightning's own ``LearningRateMonitor``, they are written straight to ``trainer.loggers`` (so
every logger receives them, with Lightning's step counter); the epoch quantities (gap, ECE) go
through ``pl_module.log`` and so also appear in ``trainer.callback_metrics``, where
``EarlyStopping`` or ``ModelCheckpoint`` can monitor them.

How the ECE sees the validation logits (choose one):

1. ``validation_step`` returns a dict with a ``"logits"`` entry; or
2. ``validation_step`` calls the LightningModule itself (``self(x)``): the callback registers a
   forward hook on the LightningModule for the validation epoch and takes the last output of
   each validation batch that has at least two dimensions (a scalar returned by
   ``validation_step`` under DDP's forward redirection is ignored).

The targets are read from the validation batch at ``target_key`` (index or dict key). Soft
(probability) targets are reduced to their arg-max.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

from lightning_reg.core.compat import batches_that_stepped, foreach_norm
from lightning_reg.core.logging import is_logging_step
from lightning_reg.core.param_callback import ParamCallback
from lightning_reg.core.params import ParamSelection
from lightning_reg.core.strategies import ALL_SHARDED
from lightning_reg.core.validation import check_int

__all__ = ["RegularizationMonitorCallback", "layer_key"]

PREFIX = "reg/monitor"


def layer_key(param_name: str) -> str:
    """The ``<layer>`` part of a norm key: the parameter name without a ``.weight`` suffix."""
    return param_name.removesuffix(".weight")


class RegularizationMonitorCallback(ParamCallback):
    """Log weight norms, sparsity, the train − validation gap and calibration (ECE).

    Args:
        every_n_steps: compute the step diagnostics (norms, sparsity, histograms) after every
            ``every_n_steps``-th optimizer step. ``None`` (default) follows the Trainer's
            ``log_every_n_steps``.
        num_classes: number of classes, for the ECE on validation. ``None`` turns the ECE off.
        gap_metrics: metric names whose ``train_prefix + name`` and ``val_prefix + name`` are in
            ``trainer.callback_metrics``; the callback logs their difference (train − val) at
            the end of each training epoch in which validation ran. For an epoch mean rather
            than the last step's value, log the train metric with ``on_epoch=True``. A missing
            metric gives one warning naming what was looked for and what was logged.
        params: which parameters count as weights: ``"weights"`` (ndim >= 2, outside norm
            layers), ``"all"`` or a :class:`~lightning_reg.core.ParamSelection`.
        histograms: with a ``WandbLogger``, also log a ``wandb.Histogram`` per weight.
        histogram_bins: number of histogram bins.
        ece_bins: number of confidence bins of the ECE.
        target_key: index or key of the targets in a validation batch.
        train_prefix: prefix of the train metrics for the gap.
        val_prefix: prefix of the validation metrics for the gap.

    Raises:
        ValueError: if ``every_n_steps`` < 1, ``num_classes`` < 2, ``histogram_bins`` < 1 or
            ``ece_bins`` < 1.
        TypeError: if ``gap_metrics`` is not a sequence of strings.
        RuntimeError: at fit start under a sharded strategy; during validation, when the
            logits cannot be found or do not have shape ``(batch, num_classes)``. The message
            says how to fix it.

    Example:
        >>> import lightning.pytorch as pl
        >>> monitor = RegularizationMonitorCallback(every_n_steps=10, num_classes=10)
        >>> trainer = pl.Trainer(callbacks=[monitor], logger=False, max_epochs=1)

    Reference:
        Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017
        (the expected calibration error).
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        *,
        num_classes: int | None = None,
        gap_metrics: Sequence[str] = ("loss",),
        params: str | ParamSelection = "weights",
        histograms: bool = True,
        histogram_bins: int = 64,
        ece_bins: int = 15,
        target_key: int | str = 1,
        train_prefix: str = "train_",
        val_prefix: str = "val_",
    ) -> None:
        if every_n_steps is not None:
            check_int("every_n_steps", every_n_steps, minimum=1)
        if num_classes is not None:
            check_int("num_classes", num_classes, minimum=2)
        if isinstance(gap_metrics, str) or not all(isinstance(m, str) for m in gap_metrics):
            raise TypeError(f"`gap_metrics` must be a sequence of str, got {gap_metrics!r}")
        if isinstance(target_key, bool) or not isinstance(target_key, (int, str)):
            raise TypeError(f"`target_key` must be an int index or a str key, got {target_key!r}")
        super().__init__(params)
        self.every_n_steps = every_n_steps
        self.num_classes = num_classes
        self.gap_metrics = tuple(gap_metrics)
        self.histograms = bool(histograms)
        self.histogram_bins = check_int("histogram_bins", histogram_bins, minimum=1)
        self.ece_bins = check_int("ece_bins", ece_bins, minimum=1)
        self.target_key = target_key
        self.train_prefix = train_prefix
        self.val_prefix = val_prefix
        #: the latest step diagnostics written to the loggers (global rank 0 only), as floats.
        self.last_metrics: dict[str, float] = {}
        self._last_step = -1
        self._val_epoch = -1
        self._warned_gap = False
        self._ece: Any = None
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._captured: torch.Tensor | None = None

    refused = ALL_SHARDED
    refusal_reason = "the norms of local shards are not the layers' (they would need an all-reduce)"
    needs_optimizer = False

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._module = pl_module
        self._last_step = -1

    # ------------------------------------------------------------ step metrics
    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step, every = trainer.global_step, self.every_n_steps
        due = is_logging_step(trainer) if every is None else step > 0 and step % every == 0
        # `step != _last_step`: once per optimizer step under gradient accumulation.
        if due and step != self._last_step and trainer.loggers and trainer.is_global_zero:
            self._last_step = step
            self.log_step_metrics(trainer)

    @torch.no_grad()
    def compute_step_metrics(self) -> dict[str, torch.Tensor]:
        """Norms and sparsity of the selected weights, as 0-d tensors on their device.

        They are the entries of one vector, so that a single device-to-host copy reads them all.
        """
        selected = self.selected(self._module) if self._module is not None else []
        if not selected:
            return {}
        params = [s.param for s in selected]
        # Norms accumulate in float32 (an fp16 norm overflows at 65504), float64 stays float64.
        wide = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        norms = foreach_norm(params, 2, dtype=wide)
        # Exact int64 counts; torch's foreach norm has no fused kernel for ord 0 anyway.
        nonzero = torch.stack([torch.count_nonzero(p) for p in params]).sum()
        numel = sum(p.numel() for p in params)
        total = torch.linalg.vector_norm(torch.stack(norms))
        keys = [f"{PREFIX}/norm/{layer_key(s.name)}" for s in selected]
        keys += [f"{PREFIX}/norm/total", f"{PREFIX}/sparsity"]
        return dict(zip(keys, torch.stack([*norms, total, 1.0 - nonzero / numel]).unbind()))

    @torch.no_grad()
    def _histograms(self) -> dict[str, Any]:
        import wandb

        selected = self.selected(self._module)  # type: ignore[arg-type]
        flat = [s.param.float().flatten() for s in selected]
        # NaN/inf are left out: the range is that of the finite entries, and histc drops the rest.
        lo = torch.stack([v.masked_fill(~v.isfinite(), math.inf).amin() for v in flat]).tolist()
        hi = torch.stack([v.masked_fill(~v.isfinite(), -math.inf).amax() for v in flat]).tolist()
        out = {}
        for s, v, a, b in zip(selected, flat, lo, hi):
            if math.isfinite(a):  # else no finite entry at all
                b = b if b > a else a + 1.0
                counts = torch.histc(v, bins=self.histogram_bins, min=a, max=b).tolist()
                edges = torch.linspace(a, b, self.histogram_bins + 1, dtype=torch.float64)
                hist = wandb.Histogram(np_histogram=(counts, edges.tolist()))
                out[f"{PREFIX}/hist/{layer_key(s.name)}"] = hist
        return out

    def log_step_metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        """Compute the step diagnostics now and write them to every logger of ``trainer``."""
        values = self.compute_step_metrics()
        if not values:
            return {}
        metrics = dict(zip(values, torch.stack(list(values.values())).tolist()))  # one copy
        # the non-finite entries are counted (on the host) only when a norm is not finite
        finite = math.isfinite(metrics[f"{PREFIX}/norm/total"])
        bad = [] if finite else self.selected(self._module)  # type: ignore[arg-type]
        metrics[f"{PREFIX}/nonfinite"] = float(sum((~s.param.isfinite()).sum() for s in bad))
        self.last_metrics = metrics
        wandb = any(isinstance(logger, WandbLogger) for logger in trainer.loggers)
        hists = self._histograms() if self.histograms and wandb else {}
        for logger in trainer.loggers:
            extra = hists if isinstance(logger, WandbLogger) else {}
            logger.log_metrics({**metrics, **extra}, step=batches_that_stepped(trainer))
        return metrics

    # ----------------------------------------------------------------- the gap
    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val_epoch != trainer.current_epoch:
            return
        metrics = trainer.callback_metrics
        for name in self.gap_metrics:
            train = _lookup(metrics, self.train_prefix + name, ("_epoch", "", "_step"))
            val = _lookup(metrics, self.val_prefix + name, ("", "_epoch"))
            if train is not None and val is not None:
                gap = train.to(pl_module.device) - val.to(pl_module.device)
                pl_module.log(f"{PREFIX}/gap/{name}", gap, on_step=False, on_epoch=True)
            elif not self._warned_gap:
                self._warned_gap = True
                missing = self.train_prefix + name if train is None else self.val_prefix + name
                warnings.warn(
                    f"RegularizationMonitorCallback(gap_metrics={list(self.gap_metrics)}) "
                    f"found no {missing!r} in trainer.callback_metrics (logged: "
                    f"{sorted(metrics)}), so it logs no gap for {name!r}. Log it with "
                    f"`self.log({missing!r}, ...)`, or change `gap_metrics` / `train_prefix`"
                    " / `val_prefix` (`gap_metrics=()` turns this off).",
                    stacklevel=2,
                )

    # ---------------------------------------------------------------- the ECE
    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.num_classes is None or trainer.sanity_checking:
            return
        from torchmetrics.classification import MulticlassCalibrationError

        self._ece = MulticlassCalibrationError(self.num_classes, self.ece_bins).to(pl_module.device)
        self._remove_hook()
        self._hook = pl_module.register_forward_hook(self._capture)

    def _capture(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        # Under DDP, Lightning runs `validation_step` itself through the module's `__call__`
        # (forward redirection), so the hook also sees its return value (often the scalar
        # loss) after the inner `self(x)`: keep only batch-shaped outputs.
        if isinstance(output, torch.Tensor) and output.ndim >= 2:
            self._captured = output.detach()

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._hook is None:
            return
        logits, self._captured = self._captured, None  # the next batch captures its own
        if isinstance(outputs, Mapping) and isinstance(outputs.get("logits"), torch.Tensor):
            logits = outputs["logits"].detach()
        if logits is None or logits.ndim != 2 or logits.shape[1] != self.num_classes:
            got = "no logits" if logits is None else f"logits of shape {tuple(logits.shape)}"
            raise RuntimeError(
                f"RegularizationMonitorCallback(num_classes={self.num_classes}) got {got}; it "
                f"needs the validation logits as (batch, {self.num_classes}): call `self(x)` in "
                "`validation_step`, return {'logits': logits} from it, or fix `num_classes`."
            )
        try:
            target = batch[self.target_key]
        except (KeyError, IndexError, TypeError):
            target = None
        if isinstance(target, torch.Tensor) and target.is_floating_point() and target.ndim == 2:
            target = target.argmax(dim=1)
        if not isinstance(target, torch.Tensor) or target.shape[0] != logits.shape[0]:
            raise RuntimeError(
                f"RegularizationMonitorCallback found no targets for {logits.shape[0]} logits "
                f"at target_key={self.target_key!r} of a {type(batch).__name__} batch: set "
                "`target_key` to their index or dict key, or `num_classes=None` (no ECE)."
            )
        self._ece.update(logits.float().softmax(dim=1), target.long())

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._val_epoch = trainer.current_epoch
        if self._hook is not None:
            self._remove_hook()  # the ECE below syncs across ranks under DDP
            pl_module.log(f"{PREFIX}/ece", self._ece.compute(), on_epoch=True, on_step=False)

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._hook = self._captured = None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._remove_hook()


def _lookup(metrics: Mapping[str, Any], base: str, suffixes: Sequence[str]) -> torch.Tensor | None:
    value = next((metrics[base + s] for s in suffixes if base + s in metrics), None)
    return None if value is None else torch.as_tensor(value).detach().float()
