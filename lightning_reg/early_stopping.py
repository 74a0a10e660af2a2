"""Early stopping that restores the best weights, starts late, needs a baseline, or uses Prechelt.

The pure functions at the top are the maths of Prechelt's stopping rules ("Early Stopping — But
When?", 1998) and the off-device weight snapshot:

* generalization loss ``GL(t) = 100·(E_va(t)/E_opt(t) − 1)``, where ``E_opt(t)`` is the lowest
  validation error up to epoch ``t``; the rule ``GL_α`` stops as soon as ``GL(t) > α``;
* training progress over a strip of the last ``k`` epochs
  ``P_k(t) = 1000·(Σ_{t'∈strip} E_tr(t') / (k·min_{t'∈strip} E_tr(t')) − 1)``; the rule ``PQ_α``
  stops at the end of the first strip with ``GL(t)/P_k(t) > α``;
* :func:`snapshot_state_dict_` copies a state dict into preallocated CPU buffers (one
  device-to-host copy of each tensor, no new GPU memory).

:class:`EarlyStoppingCallback` below is a subclass of Lightning's
:class:`~lightning.pytorch.callbacks.EarlyStopping`, so ``trainer.early_stopping_callback`` finds
it and every option of Lightning's version keeps its meaning.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.early_stopping import EarlyStopping, EarlyStoppingReason
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_reg.core.logging import log_scalars
from lightning_reg.core.strategies import ALL_SHARDED, refuse_strategies
from lightning_reg.core.validation import (
    check_choice,
    check_int,
    check_non_negative,
    check_range,
)
from lightning_reg.core.validation import check_finite as _check_finite_number

__all__ = [
    "CRITERIA",
    "EarlyStoppingCallback",
    "generalization_loss",
    "progress_quotient",
    "snapshot_state_dict_",
    "training_progress",
]

# a child of Lightning's logger, so the one-line explanations show up where Lightning's do
log = logging.getLogger("lightning.pytorch.callbacks.lightning_reg.early_stopping")

CRITERIA = ("patience", "generalization_loss", "progress_quotient")


def generalization_loss(current: float, best: float) -> float:
    """Prechelt's generalization loss ``GL = 100·(E_va/E_opt − 1)`` in percent.

    Args:
        current: the validation error ``E_va(t)`` of this epoch.
        best: the lowest validation error so far, ``E_opt(t)``; must be positive.

    Raises:
        ValueError: if ``best`` is not a positive number (the ratio is meaningless then).
    """
    if not best > 0 or not math.isfinite(best):
        raise ValueError(
            "Prechelt's generalization loss needs a positive, finite error metric (a loss or an "
            f"error rate); the best value so far is {best!r}"
        )
    return 100.0 * (current / best - 1.0)


def training_progress(strip: Sequence[float]) -> float:
    """Prechelt's training progress ``P_k = 1000·(Σ E_tr / (k·min E_tr) − 1)`` over a strip.

    Args:
        strip: the training errors of the ``k`` epochs of the strip; all must be positive.

    Raises:
        ValueError: if the strip is empty or its minimum is not positive.
    """
    if len(strip) == 0:
        raise ValueError("`strip` must hold at least one training error, got an empty strip")
    low = min(strip)
    if not low > 0 or not all(math.isfinite(v) for v in strip):
        raise ValueError(
            "Prechelt's training progress needs positive, finite training errors; "
            f"got the strip {list(strip)!r}"
        )
    return 1000.0 * (sum(strip) / (len(strip) * low) - 1.0)


def progress_quotient(gl: float, progress: float) -> float:
    """Prechelt's ``PQ = GL / P_k``; ``inf`` when training is flat (``P_k = 0``) and ``GL > 0``."""
    if progress > 0:
        return gl / progress
    return math.inf if gl > 0 else 0.0


def snapshot_state_dict_(
    buffers: dict[str, Any] | None, state: Mapping[str, Any]
) -> tuple[dict[str, Any], bool]:
    """Copy ``state`` (a module's state dict) into CPU ``buffers``, allocating them if needed.

    Each tensor costs one copy into a preallocated CPU buffer (page-locked when the source is
    on a GPU, so the device-to-host copy is asynchronous); nothing is allocated on the device.
    The buffers are reused across calls as long as names, shapes and dtypes match.

    Args:
        buffers: the buffers of an earlier call, or ``None``.
        state: the state dict to copy (tensors on any device, other values deep-copied).

    Returns:
        ``(buffers, asynchronous)``: the filled buffers and whether a copy from a CUDA device
        may still be in flight (then synchronise before reading them).
    """
    reuse = buffers is not None and buffers.keys() == state.keys()
    if reuse:
        for key, value in state.items():
            old = buffers[key]
            if isinstance(value, Tensor) != isinstance(old, Tensor) or (
                isinstance(value, Tensor) and (old.shape != value.shape or old.dtype != value.dtype)
            ):
                reuse = False
                break
    if not reuse:
        buffers = {}
        for key, value in state.items():
            if isinstance(value, Tensor):
                pin = value.is_cuda and torch.cuda.is_available()
                buffers[key] = torch.empty(
                    value.shape, dtype=value.dtype, device="cpu", pin_memory=pin
                )
            else:
                buffers[key] = None
    assert buffers is not None
    asynchronous = False
    with torch.no_grad():
        for key, value in state.items():
            if isinstance(value, Tensor):
                non_blocking = value.is_cuda and buffers[key].is_pinned()
                buffers[key].copy_(value.detach(), non_blocking=non_blocking)
                asynchronous = asynchronous or non_blocking
            else:
                buffers[key] = copy.deepcopy(value)
    return buffers, asynchronous


class EarlyStoppingCallback(EarlyStopping):
    """Lightning's ``EarlyStopping``, plus best-weight restoring, a late start, a baseline,
    Prechelt's GL/PQ rules and EMA smoothing of the monitored metric.

    With the defaults (``criterion="patience"``, no baseline, no smoothing, ``start_from_epoch=0``)
    it stops at exactly the epoch where Lightning's ``EarlyStopping`` stops. On top of that:

    * ``restore_best_weights``: each time the monitored metric improves, the module's state dict
      (parameters and buffers) is copied into preallocated CPU buffers (one device-to-host copy per
      improvement, no GPU memory). In ``on_fit_end`` (whatever ended training: patience,
      ``max_epochs``/``max_steps``, a threshold, a non-finite metric, another callback) the module
      gets those weights back. The snapshot is part of the callback's ``state_dict``, so it is in
      every checkpoint and a resumed run still restores the best epoch (checkpoints grow by one
      copy of the weights). Fitting that ends with an exception restores nothing.
    * ``start_from_epoch``: checks before this epoch neither count nor track a best value (only a
      non-finite metric still stops training when ``check_finite``).
    * ``baseline`` (Keras semantics): the wait count is reset only by an epoch that improves on
      the best value *and* beats the baseline, so training stops after ``patience`` checks if the
      baseline is never beaten. The best weights are tracked either way.
    * ``criterion="generalization_loss"``: stop when
      ``GL(t) = 100·(E_va(t)/E_opt(t) − 1) > gl_alpha``.
      ``criterion="progress_quotient"``: at the end of each strip of ``strip_length`` checks, stop
      when ``GL(t)/P_k(t) > pq_alpha`` with the training progress ``P_k`` of the strip, read from
      the ``train_monitor`` metric (log it with ``on_epoch=True`` to get epoch means). Both rules
      need ``mode="min"`` and a positive error metric; they replace the patience rule (``wait``
      is still counted and logged), while the thresholds and ``check_finite`` still apply.
      ``E_opt`` is the best value under ``min_delta`` (exactly Prechelt's with ``min_delta=0``).
    * ``smoothing=β``: decisions use the EMA ``s_t = β·s_{t−1} + (1−β)·x_t`` (``s`` starts at the
      first counted value) instead of the raw metric. NaN is never smoothed away: the finiteness
      check looks at the raw value.

    Under DDP every rank takes rank zero's value of the metric (log it with ``sync_dist=True`` so
    that this is the global value), so the best epoch, the stop epoch and the restored weights are
    the same on every rank; a non-finite value on any rank stops all of them. It logs
    ``reg/early_stopping/wait`` and ``reg/early_stopping/best_score`` at each check, and explains
    a stop and the restore in one line at rank zero.

    Args:
        monitor: the metric to watch (as logged with ``self.log``).
        min_delta: an improvement must exceed this (>= 0).
        patience: checks without improvement before stopping (>= 0), for ``"patience"``.
        verbose: log every improvement, as Lightning's ``EarlyStopping`` does.
        mode: ``"min"`` or ``"max"``.
        strict: raise if ``monitor`` (or ``train_monitor``) is missing; else skip the check.
        check_finite: stop when the monitored metric is NaN or infinite.
        stopping_threshold: stop once the metric reaches this value.
        divergence_threshold: stop once the metric is worse than this value.
        check_on_train_epoch_end: as in Lightning (``None``: decide from the Trainer).
        log_rank_zero_only: as in Lightning.
        restore_best_weights: load the best epoch's weights into the module when fit ends.
        start_from_epoch: first epoch whose check counts (>= 0).
        baseline: a value the metric must beat to reset the wait count, or ``None``.
        criterion: ``"patience"``, ``"generalization_loss"`` or ``"progress_quotient"``.
        gl_alpha: the α of ``GL_α`` in percent (> 0).
        pq_alpha: the α of ``PQ_α`` (> 0).
        strip_length: Prechelt's strip length ``k`` (>= 1) for ``"progress_quotient"``.
        train_monitor: the training-error metric for ``"progress_quotient"``.
        smoothing: EMA factor β in [0, 1), or ``None`` for no smoothing.

    Attributes:
        best_epoch: the epoch of the best value (``-1`` before any).
        stop_criterion: which rule stopped training (``"patience"``, ``"generalization_loss"``,
            ``"progress_quotient"``, ``"baseline"``, ``"non_finite"``, ``"stopping_threshold"``,
            ``"divergence_threshold"``), or ``None``. Lightning's ``stopping_reason`` enum is set
            too (``PATIENCE_EXHAUSTED`` for the patience, baseline and Prechelt rules).
        restored_epoch: the epoch whose weights were restored at the end of fit, or ``None``.
        num_snapshots: how many times the weights were copied to the CPU (one per improvement).

    Raises:
        ValueError: on a negative ``patience``/``min_delta``/``start_from_epoch``, a NaN
            ``min_delta`` or ``baseline``, an unknown ``mode``/``criterion``, a Prechelt criterion
            with ``mode="max"``, or ``"progress_quotient"`` without ``train_monitor``.
        RuntimeError: during fit, if a monitored metric is missing (``strict=True``), naming the
            metrics that exist; or if a Prechelt rule meets a non-positive error.

    Example:
        >>> from lightning_reg.early_stopping import EarlyStoppingCallback
        >>> cb = EarlyStoppingCallback("val_loss", patience=5, start_from_epoch=2)
        >>> # trainer = Trainer(callbacks=[cb]); trainer.fit(model)  # model holds the best epoch
        >>> gl = EarlyStoppingCallback("val_loss", criterion="generalization_loss", gl_alpha=5.0)

    Reference:
        L. Prechelt, "Early Stopping — But When?", Neural Networks: Tricks of the Trade, 1998.
        Keras ``EarlyStopping`` (``restore_best_weights``, ``start_from_epoch``, ``baseline``).
    """

    def __init__(
        self,
        monitor: str,
        *,
        min_delta: float = 0.0,
        patience: int = 3,
        verbose: bool = False,
        mode: str = "min",
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_on_train_epoch_end: bool | None = None,
        log_rank_zero_only: bool = False,
        restore_best_weights: bool = True,
        start_from_epoch: int = 0,
        baseline: float | None = None,
        criterion: str = "patience",
        gl_alpha: float = 5.0,
        pq_alpha: float = 0.5,
        strip_length: int = 5,
        train_monitor: str | None = None,
        smoothing: float | None = None,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"`monitor` must be a non-empty metric name, got {monitor!r}")
        min_delta = check_non_negative("min_delta", min_delta)
        patience = check_int("patience", patience, 0)
        check_choice("mode", mode, tuple(self.mode_dict))
        start_from_epoch = check_int("start_from_epoch", start_from_epoch, 0)
        check_choice("criterion", criterion, CRITERIA)
        if baseline is not None:
            baseline = _check_finite_number("baseline", baseline)
        for name, value in (
            ("stopping_threshold", stopping_threshold),
            ("divergence_threshold", divergence_threshold),
        ):
            if value is not None and math.isnan(float(value)):
                raise ValueError(f"`{name}` must be a number or None, got {value!r}")
        gl_alpha = check_range("gl_alpha", gl_alpha, 0.0, low_inclusive=False)
        pq_alpha = check_range("pq_alpha", pq_alpha, 0.0, low_inclusive=False)
        strip_length = check_int("strip_length", strip_length, 1)
        if smoothing is not None:
            smoothing = check_range("smoothing", smoothing, 0.0, 1.0, high_inclusive=False)
        if criterion != "patience" and mode != "min":
            raise ValueError(
                f"`mode` must be 'min' for criterion={criterion!r} (Prechelt's rules need an "
                f"error metric such as a loss or 1 - accuracy); got mode={mode!r}"
            )
        if criterion == "progress_quotient" and not train_monitor:
            raise ValueError(
                "`train_monitor` must name a training-error metric (e.g. 'train_loss_epoch') for "
                f"criterion='progress_quotient'; got {train_monitor!r}"
            )
        super().__init__(
            monitor=monitor,
            min_delta=min_delta,
            patience=patience,
            verbose=verbose,
            mode=mode,
            strict=strict,
            check_finite=check_finite,
            stopping_threshold=stopping_threshold,
            divergence_threshold=divergence_threshold,
            check_on_train_epoch_end=check_on_train_epoch_end,
            log_rank_zero_only=log_rank_zero_only,
        )
        self.restore_best_weights = bool(restore_best_weights)
        self.start_from_epoch = start_from_epoch
        self.baseline = baseline
        self.criterion = criterion
        self.gl_alpha = gl_alpha
        self.pq_alpha = pq_alpha
        self.strip_length = strip_length
        self.train_monitor = train_monitor
        self.smoothing = smoothing or None
        self.best_epoch = -1
        self.stop_criterion: str | None = None
        self.restored_epoch: int | None = None
        self.num_snapshots = 0
        self._ema: Tensor | None = None
        self._num_checks = 0
        self._train_strip: deque[float] = deque(maxlen=strip_length)
        self._best_weights: dict[str, Any] | None = None
        self._copy_event: Any = None
        self._log_in_hook = False

    # ------------------------------------------------------------------ state
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.restore_best_weights:
            refuse_strategies(
                trainer,
                "EarlyStoppingCallback(restore_best_weights=True)",
                ALL_SHARDED,
                "keeping the best weights needs the full, unsharded state dict on every rank "
                "(restore_best_weights=False works with any strategy)",
            )

    @property
    def best_weights(self) -> dict[str, Any] | None:
        """The CPU copy of the best epoch's state dict (``None`` before the first improvement)."""
        self._wait_for_copy()
        return self._best_weights

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            best_epoch=self.best_epoch,
            stop_criterion=self.stop_criterion,
            ema=self._ema,
            num_checks=self._num_checks,
            train_strip=list(self._train_strip),
            best_weights=self.best_weights,
            num_snapshots=self.num_snapshots,
        )
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best_epoch = int(state_dict.get("best_epoch", -1))
        self.stop_criterion = state_dict.get("stop_criterion")
        self._ema = state_dict.get("ema")
        self._num_checks = int(state_dict.get("num_checks", 0))
        self._train_strip = deque(state_dict.get("train_strip", []), maxlen=self.strip_length)
        weights = state_dict.get("best_weights")
        if weights is not None:
            weights = {
                k: v.detach().to("cpu") if isinstance(v, Tensor) else v for k, v in weights.items()
            }
        self._best_weights = weights
        self._copy_event = None
        self.num_snapshots = int(state_dict.get("num_snapshots", 0))

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._check_on_train_epoch_end or self._should_skip_check(trainer):
            return
        self._log_in_hook = True
        try:
            self._run_early_stopping_check(trainer)
        finally:
            self._log_in_hook = False

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._check_on_train_epoch_end or self._should_skip_check(trainer):
            return
        self._run_early_stopping_check(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.restore_best_weights:
            return
        weights = self.best_weights
        if weights is None:
            rank_zero_warn(
                f"EarlyStoppingCallback: `{self.monitor}` never produced a best value (no check "
                "counted, or every value was NaN), so the final weights were NOT replaced."
            )
            return
        pl_module.load_state_dict(weights, strict=True)
        self.restored_epoch = self.best_epoch
        self._info(
            trainer,
            f"EarlyStoppingCallback: restored the weights of epoch {self.best_epoch} "
            f"({self.monitor}={float(self.best_score):.6g}).",
        )

    # ------------------------------------------------------------------ logic
    def _read(self, trainer: pl.Trainer, key: str, logs: Mapping[str, Any]) -> Tensor:
        value = logs[key]
        if not isinstance(value, Tensor):
            value = torch.tensor(value)
        return value.detach().squeeze().cpu()

    def _train_metric_present(self, logs: Mapping[str, Any]) -> bool:
        if self.criterion != "progress_quotient" or self.train_monitor in logs:
            return True
        msg = (
            f"Early stopping criterion 'progress_quotient' needs the training metric "
            f"`{self.train_monitor}`, which is not available. Log it in `training_step` with "
            "`self.log(..., on_epoch=True)` or pick one of: `" + "`, `".join(logs.keys()) + "`"
        )
        if self.strict:
            raise RuntimeError(msg)
        if self.verbose:
            rank_zero_warn(msg, category=RuntimeWarning)
        return False

    @override
    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        logs = trainer.callback_metrics
        if trainer.fast_dev_run or not self._validate_condition_metric(logs):
            return
        if not self._train_metric_present(logs):
            return
        raw = self._read(trainer, self.monitor, logs)
        train = (
            self._read(trainer, self.train_monitor, logs)
            if self.criterion == "progress_quotient" and self.train_monitor
            else None
        )
        local_non_finite = self.check_finite and not bool(torch.isfinite(raw))
        if trainer.world_size > 1:
            # every rank decides on rank zero's values: same best epoch, same restored weights
            raw, train = trainer.strategy.broadcast((raw, train), src=0)
            non_finite = trainer.strategy.reduce_boolean_decision(local_non_finite, all=False)
        else:
            non_finite = local_non_finite

        epoch = trainer.current_epoch
        counting = epoch >= self.start_from_epoch
        current = self._smooth(raw) if counting else raw
        should_stop, reason, improved = self._evaluate(current, train, non_finite, counting)
        if improved:
            self.best_epoch = epoch
            if self.restore_best_weights:
                self._snapshot(trainer.lightning_module)

        should_stop = trainer.strategy.reduce_boolean_decision(should_stop, all=False)
        trainer.should_stop = trainer.should_stop or should_stop
        if should_stop:
            self.stopped_epoch = epoch
            self.stopping_reason_message = reason
            restore = (
                f"; restoring epoch {self.best_epoch} at the end of fit"
                if self.restore_best_weights and self.best_epoch >= 0
                else ""
            )
            self._info(
                trainer,
                f"EarlyStoppingCallback: stop at epoch {epoch}: {(reason or '').rstrip('.')}"
                f"{restore}.",
            )
        elif reason and self.verbose:
            self._log_info(trainer, reason, self.log_rank_zero_only)
        if counting:
            self._log_state(trainer)

    def _smooth(self, raw: Tensor) -> Tensor:
        if self.smoothing is None:
            return raw
        if self._ema is None or not bool(torch.isfinite(self._ema)):
            self._ema = raw.clone()
        else:
            self._ema = self.smoothing * self._ema + (1.0 - self.smoothing) * raw
        return self._ema

    @override
    def _evaluate_stopping_criteria(self, current: Tensor) -> tuple[bool, str | None]:
        non_finite = self.check_finite and not bool(torch.isfinite(current))
        should_stop, reason, _ = self._evaluate(current, None, non_finite, True)
        return should_stop, reason

    def _evaluate(
        self, current: Tensor, train: Tensor | None, non_finite: bool, counting: bool
    ) -> tuple[bool, str | None, bool]:
        """One check: returns ``(should_stop, reason, improved)`` and updates the state."""
        if non_finite:
            self.stopping_reason = EarlyStoppingReason.NON_FINITE_METRIC
            self.stop_criterion = "non_finite"
            return (
                True,
                f"`{self.monitor}` = {float(current)} is not finite (best so far "
                f"{float(self.best_score):.6g}).",
                False,
            )
        if not counting:
            return False, None, False

        self._num_checks += 1
        if train is not None:
            self._train_strip.append(float(train))
        improved = bool(self.monitor_op(current - self.min_delta, self.best_score))
        reason: str | None = None
        if improved:
            reason = self._improvement_message(current)
            self.best_score = current.clone()
            beats_baseline = self.baseline is None or bool(
                self.monitor_op(current - self.min_delta, torch.tensor(self.baseline))
            )
            if beats_baseline:
                self.wait_count = 0
            else:
                self.wait_count += 1
        else:
            self.wait_count += 1

        if self.stopping_threshold is not None and self.monitor_op(
            current, self.stopping_threshold
        ):
            self.stopping_reason = EarlyStoppingReason.STOPPING_THRESHOLD
            self.stop_criterion = "stopping_threshold"
            return (
                True,
                f"`{self.monitor}` = {float(current):.6g} reached the stopping threshold "
                f"{self.stopping_threshold}.",
                improved,
            )
        if self.divergence_threshold is not None and self.monitor_op(
            -current, -self.divergence_threshold
        ):
            self.stopping_reason = EarlyStoppingReason.DIVERGENCE_THRESHOLD
            self.stop_criterion = "divergence_threshold"
            return (
                True,
                f"`{self.monitor}` = {float(current):.6g} is beyond the divergence threshold "
                f"{self.divergence_threshold}.",
                improved,
            )

        if self.criterion == "patience":
            if not improved and self.wait_count >= self.patience:
                self.stopping_reason = EarlyStoppingReason.PATIENCE_EXHAUSTED
                below = self.baseline is not None and not bool(
                    self.monitor_op(self.best_score - self.min_delta, torch.tensor(self.baseline))
                )
                self.stop_criterion = "baseline" if below else "patience"
                extra = f" and never beat the baseline {self.baseline}" if below else ""
                return (
                    True,
                    f"`{self.monitor}` did not improve in the last {self.wait_count} checks{extra} "
                    f"(best {float(self.best_score):.6g} at epoch {self.best_epoch}).",
                    improved,
                )
            return False, reason, improved

        gl = self._generalization_loss(current)
        if self.criterion == "generalization_loss":
            if gl > self.gl_alpha:
                self.stopping_reason = EarlyStoppingReason.PATIENCE_EXHAUSTED
                self.stop_criterion = "generalization_loss"
                return (
                    True,
                    f"generalization loss GL = {gl:.4g}% > gl_alpha = {self.gl_alpha:g} "
                    f"(`{self.monitor}` = {float(current):.6g}, "
                    f"best {float(self.best_score):.6g}).",
                    improved,
                )
            return False, reason, improved

        # progress_quotient: evaluated at the end of each strip of k counted checks
        if self._num_checks % self.strip_length == 0:
            try:
                progress = training_progress(list(self._train_strip))
            except ValueError as err:
                raise RuntimeError(
                    f"EarlyStoppingCallback: `{self.train_monitor}` must be a positive training "
                    f"error for criterion='progress_quotient'. {err}"
                ) from err
            pq = progress_quotient(gl, progress)
            if pq > self.pq_alpha:
                self.stopping_reason = EarlyStoppingReason.PATIENCE_EXHAUSTED
                self.stop_criterion = "progress_quotient"
                return (
                    True,
                    f"progress quotient GL/P_{self.strip_length} = {gl:.4g}/{progress:.4g} = "
                    f"{pq:.4g} > pq_alpha = {self.pq_alpha:g}.",
                    improved,
                )
        return False, reason, improved

    def _generalization_loss(self, current: Tensor) -> float:
        try:
            return generalization_loss(float(current), float(self.best_score))
        except ValueError as err:
            raise RuntimeError(
                f"EarlyStoppingCallback(criterion={self.criterion!r}) monitors `{self.monitor}`, "
                "which must be a positive error (a loss, or 1 - accuracy). Monitor such a metric "
                f"or use criterion='patience'. {err}"
            ) from err

    def _snapshot(self, module: torch.nn.Module) -> None:
        self._wait_for_copy()
        self._best_weights, asynchronous = snapshot_state_dict_(
            self._best_weights, module.state_dict()
        )
        self.num_snapshots += 1
        if asynchronous:
            event = torch.cuda.Event()
            event.record()
            self._copy_event = event

    def _wait_for_copy(self) -> None:
        if self._copy_event is not None:
            self._copy_event.synchronize()
            self._copy_event = None

    def _log_state(self, trainer: pl.Trainer) -> None:
        values = {
            "reg/early_stopping/wait": torch.tensor(float(self.wait_count)),
            "reg/early_stopping/best_score": self.best_score.detach().float().cpu(),
        }
        module = trainer.lightning_module
        if self._log_in_hook:  # on_train_epoch_end: self.log is allowed (on_epoch only)
            device = module.device
            log_scalars(
                module, {k: v.to(device) for k, v in values.items()}, on_step=False, on_epoch=True
            )
            return
        connector = getattr(trainer, "_logger_connector", None)
        if connector is not None and trainer.loggers:  # on_validation_end: self.log is not
            connector.log_metrics(values)

    def _info(self, trainer: pl.Trainer, message: str) -> None:
        if trainer.is_global_zero:
            log.info(message)
