"""Early stopping: Lightning's ``EarlyStopping`` plus best weights, a late start, a baseline and
Prechelt's rules.

Prechelt ("Early Stopping — But When?", 1998), for a validation error ``E_va`` and a training
error ``E_tr``:

* generalization loss ``GL(t) = 100·(E_va(t)/E_opt(t) − 1)``, where ``E_opt(t)`` is the lowest
  validation error up to epoch ``t``; the rule ``GL_α`` stops as soon as ``GL(t) > α``;
* training progress over a strip of the last ``k`` epochs
  ``P_k(t) = 1000·(Σ E_tr / (k·min E_tr) − 1)``; the rule ``PQ_α`` stops at the end of the first
  strip with ``GL(t)/P_k(t) > α``.

:class:`EarlyStoppingCallback` adds these as criteria inside Lightning's own flow
(``_run_early_stopping_check`` → ``_evaluate_stopping_criteria``), so
``trainer.early_stopping_callback`` finds it and every option of Lightning's version keeps its
meaning and its messages.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.early_stopping import EarlyStopping, EarlyStoppingReason
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_reg.core import validation
from lightning_reg.core.compat import batches_that_stepped
from lightning_reg.core.strategies import ALL_SHARDED, refuse_strategies

__all__ = [
    "CRITERIA",
    "BestWeights",
    "EarlyStoppingCallback",
    "ModeError",
    "generalization_loss",
    "progress_quotient",
    "training_progress",
]

CRITERIA = ("patience", "gl", "pq")
_DEPRECATED_CRITERIA = {"generalization_loss": "gl", "progress_quotient": "pq"}


def generalization_loss(current: float, best: float) -> float:
    """Prechelt's generalization loss ``GL = 100·(E_va/E_opt − 1)`` in percent.

    Args:
        current: the validation error ``E_va(t)`` of this epoch.
        best: the lowest validation error so far, ``E_opt(t)``; must be positive.

    Raises:
        ValueError: if ``best`` is not a positive, finite number (the ratio is meaningless then).

    Example:
        >>> round(generalization_loss(0.75, 0.5), 6)
        50.0
    """
    if not (best > 0 and math.isfinite(best)):
        raise ValueError(
            f"Prechelt's GL needs a positive, finite error (a loss or error rate); best: {best!r}"
        )
    return 100.0 * (current / best - 1.0)


def training_progress(strip: Sequence[float]) -> float:
    """Prechelt's training progress ``P_k = 1000·(Σ E_tr / (k·min E_tr) − 1)`` over a strip.

    Args:
        strip: the training errors of the ``k`` epochs of the strip; all must be positive.

    Raises:
        ValueError: if the strip is empty or holds a non-positive or non-finite error.

    Example:
        >>> training_progress([1.0, 1.0])
        0.0
    """
    if not strip or not (min(strip) > 0 and all(math.isfinite(v) for v in strip)):
        raise ValueError(
            f"Prechelt's training progress needs positive, finite errors; got {list(strip)}"
        )
    return 1000.0 * (sum(strip) / (len(strip) * min(strip)) - 1.0)


def progress_quotient(gl: float, progress: float) -> float:
    """Prechelt's ``PQ = GL / P_k``; ``inf`` when training is flat (``P_k = 0``) and ``GL > 0``.

    Example:
        >>> progress_quotient(2.0, 4.0)
        0.5
    """
    if progress > 0:
        return gl / progress
    return math.inf if gl > 0 else 0.0


class ModeError(MisconfigurationException, ValueError):
    """A bad ``mode``: Lightning's ``MisconfigurationException`` that is also a ``ValueError``."""


def _layout(state: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.shape, v.dtype) if isinstance(v, Tensor) else None for k, v in state.items()}


@dataclass
class BestWeights:
    """A CPU copy of a module's state dict, refreshed in place by :meth:`save`.

    Each save copies every tensor once into preallocated CPU buffers (page-locked when the source
    is on a GPU, for a fast direct copy); it allocates nothing on the device. The buffers are
    reused while names, shapes and dtypes match.

    Attributes:
        state: the copied state dict, or ``None`` before the first save.
        saves: how many times :meth:`save` ran.

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> best = BestWeights()
        >>> best.save(net)
        >>> with torch.no_grad():
        ...     _ = net.weight.add_(1.0)
        >>> best.restore(net)
        >>> torch.equal(net.weight, best.state["weight"])
        True
    """

    state: dict[str, Any] | None = None
    saves: int = 0

    def save(self, module: torch.nn.Module) -> None:
        """Copy ``module.state_dict()`` (parameters, buffers, extra state) into the buffers."""
        source = module.state_dict()  # detached tensors: the copies below record no graph
        if self.state is None or _layout(self.state) != _layout(source):
            self.state = {  # the loop below adds copies of the entries that are no tensors
                k: torch.empty(v.shape, dtype=v.dtype, pin_memory=v.is_cuda)
                for k, v in source.items()
                if isinstance(v, Tensor)
            }
        for k, v in source.items():
            self.state[k] = self.state[k].copy_(v) if isinstance(v, Tensor) else copy.deepcopy(v)
        self.saves += 1

    def restore(self, module: torch.nn.Module) -> None:
        """Load the saved state into ``module``.

        Raises:
            RuntimeError: if nothing was saved, or if the module's state dict no longer has the
                saved names, shapes and dtypes (it was changed after the save); nothing is
                loaded then.
        """
        if self.state is None:
            raise RuntimeError("BestWeights.restore: nothing was saved yet; call `save` first")
        now, saved = _layout(module.state_dict()), _layout(self.state)
        differ = sorted(k for k in now.keys() | saved.keys() if now.get(k, 0) != saved.get(k, 0))
        if differ:
            raise RuntimeError(
                f"cannot restore the best weights: the model changed after they were saved "
                f"({len(differ)} state-dict entries differ in name, shape or dtype, e.g. "
                f"{differ[:3]}), e.g. by a callback that wraps or replaces layers mid-fit. Apply "
                "model surgery in `setup` or before `fit`, or pass `restore_best_weights=False`."
            )
        module.load_state_dict(self.state)


class EarlyStoppingCallback(EarlyStopping):
    """Lightning's ``EarlyStopping`` plus best-weight restoring, ``start_from_epoch``, a
    ``baseline`` and Prechelt's ``GL_α`` / ``PQ_α`` rules.

    With ``criterion="patience"``, no baseline and ``start_from_epoch=0`` it stops at exactly the
    epoch where Lightning's ``EarlyStopping`` stops, with the same ``stopping_reason`` and
    ``stopping_reason_message``. On top of that:

    * ``restore_best_weights``: each improvement copies the module's state dict into CPU buffers
      (:class:`BestWeights`; one device-to-host copy per improvement, no device memory). In
      ``on_fit_end``, whatever ended training, the module gets those weights back. The copy is part
      of the callback's ``state_dict``, so a run resumed from a checkpoint still restores the best
      epoch (checkpoints grow by one copy of the weights). An improvement that reaches the
      ``stopping_threshold`` also counts as the best epoch.
    * ``start_from_epoch``: checks before this epoch neither count nor track a best value (a
      non-finite metric still stops training when ``check_finite``).
    * ``baseline`` (Keras semantics): only an improvement that also beats the baseline resets the
      wait count, so training stops after ``patience`` checks if the baseline is never beaten.
    * ``criterion="gl"``: stop when ``GL(t) > gl_alpha``. ``criterion="pq"``: at the end of each
      strip of ``strip_length`` checks, stop when ``GL(t)/P_k(t) > pq_alpha``, with ``P_k`` read
      from the ``train_monitor`` metric (log it with ``on_epoch=True``). Both need ``mode="min"``
      and a positive error metric, and replace the patience rule (``patience`` is ignored); the
      thresholds and ``check_finite`` still apply. ``E_opt`` is the best value under
      ``min_delta`` (Prechelt's exactly with ``min_delta=0``).

    Under DDP every rank decides on rank zero's value of the metric (log it with
    ``sync_dist=True`` so that it is the global value), so ranks stop together and restore the same
    epoch; a non-finite value on any rank stops all of them. At each counted check it logs
    ``reg/early_stopping/wait`` and ``reg/early_stopping/best_score`` to ``trainer.loggers``.

    Args:
        monitor: the metric to watch (as logged with ``self.log``).
        restore_best_weights: load the best epoch's weights into the module when fit ends.
        start_from_epoch: first epoch whose check counts (>= 0).
        baseline: a finite value the metric must beat to reset the wait count, or ``None``.
        criterion: ``"patience"``, ``"gl"`` or ``"pq"`` (the old names ``"generalization_loss"``
            and ``"progress_quotient"`` still work, with a ``DeprecationWarning``).
        gl_alpha: the α of ``GL_α`` in percent (> 0).
        pq_alpha: the α of ``PQ_α`` (> 0).
        strip_length: Prechelt's strip length ``k`` (>= 1) for ``"pq"``.
        train_monitor: the training-error metric for ``"pq"``.
        **kwargs: the other arguments of Lightning's ``EarlyStopping``, keyword only, with its
            defaults (LightningCLI and jsonargparse list them from its signature):

            - ``min_delta``: an improvement must exceed this (>= 0).
            - ``patience``: checks without improvement before stopping (>= 0), for
              ``"patience"``.
            - ``verbose``: log each improvement and the stop reason, as Lightning does.
            - ``mode``: ``"min"`` or ``"max"``.
            - ``strict``: raise if ``monitor`` (or ``train_monitor``) is missing; else skip the
              check.
            - ``check_finite``: stop when the monitored metric is NaN or infinite.
            - ``stopping_threshold``: stop once the metric reaches this finite value, or
              ``None``.
            - ``divergence_threshold``: stop once the metric is worse than this finite value,
              or ``None``.
            - ``check_on_train_epoch_end``: as in Lightning (``None``: decided from the
              Trainer).
            - ``log_rank_zero_only``: as in Lightning.

    Attributes:
        best_epoch: the epoch of the best value (``-1`` before any).
        best_weights: the :class:`BestWeights` snapshot of that epoch.

    Raises:
        ModeError: (a ``MisconfigurationException`` and a ``ValueError``) for a ``mode`` other
            than ``"min"``/``"max"``.
        ValueError: on a negative ``patience``/``min_delta``/``start_from_epoch``, a non-finite
            threshold, ``min_delta`` or ``baseline``, an unknown ``criterion``, a Prechelt
            criterion with ``mode="max"``, or ``"pq"`` without ``train_monitor``.
        TypeError: when a number argument is not a real number (a string, a bool).
        RuntimeError: during fit, if a monitored metric is missing (``strict=True``), if a
            Prechelt rule meets a non-positive error, or if the best weights no longer fit the
            model (it was changed mid-fit).

    Example:
        >>> from lightning_reg.early_stopping import EarlyStoppingCallback
        >>> cb = EarlyStoppingCallback("val_loss", patience=5, start_from_epoch=2)
        >>> # Trainer(callbacks=[cb]).fit(model): the model then holds the best epoch's weights
        >>> gl = EarlyStoppingCallback("val_loss", criterion="gl", gl_alpha=5.0)

    Reference:
        L. Prechelt, "Early Stopping — But When?", Neural Networks: Tricks of the Trade, 1998.
        Keras ``EarlyStopping`` (``restore_best_weights``, ``start_from_epoch``, ``baseline``).
    """

    def __init__(
        self,
        monitor: str,
        *,
        restore_best_weights: bool = True,
        start_from_epoch: int = 0,
        baseline: float | None = None,
        criterion: str = "patience",
        gl_alpha: float = 5.0,
        pq_alpha: float = 0.5,
        strip_length: int = 5,
        train_monitor: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"`monitor` must be a non-empty metric name, got {monitor!r}")
        if (mode := kwargs.get("mode", "min")) not in self.mode_dict:
            raise ModeError(f"`mode` can be {', '.join(self.mode_dict)}, got {mode}")
        if isinstance(criterion, str) and criterion in _DEPRECATED_CRITERIA:
            new = _DEPRECATED_CRITERIA[criterion]
            msg = f"criterion={criterion!r} is deprecated; use criterion={new!r}"
            warnings.warn(msg, DeprecationWarning, stacklevel=2)
            criterion = new
        validation.check_choice("criterion", criterion, CRITERIA)
        if criterion != "patience" and (mode != "min" or (criterion == "pq" and not train_monitor)):
            raise ValueError(
                f"criterion={criterion!r} needs mode='min' (an error metric: a loss, 1 - accuracy) "
                f"and, for 'pq', a training-error `train_monitor`; got {mode=}, {train_monitor=}"
            )
        # the parent flips the sign of `min_delta` by mode, so it is checked before
        kwargs["min_delta"] = validation.check_non_negative("min_delta", kwargs.get("min_delta", 0))
        super().__init__(monitor, **kwargs)
        patience = validation.check_int("patience", self.patience, 0)
        self.patience = patience if criterion == "patience" else math.inf  # type: ignore[assignment]
        self.baseline = baseline
        for name in ("stopping_threshold", "divergence_threshold", "baseline"):
            value = getattr(self, name)  # a finite number or None
            setattr(self, name, None if value is None else validation.check_finite(name, value))
        self.restore_best_weights = bool(restore_best_weights)
        self.start_from_epoch = validation.check_int("start_from_epoch", start_from_epoch, 0)
        self.criterion = criterion
        self.gl_alpha = validation.check_positive("gl_alpha", gl_alpha)
        self.pq_alpha = validation.check_positive("pq_alpha", pq_alpha)
        self.strip_length = validation.check_int("strip_length", strip_length, 1)
        self.train_monitor = train_monitor
        self.best_epoch = -1
        self.best_weights = BestWeights()
        self._train_strip: deque[float] = deque(maxlen=self.strip_length)
        self._num_checks = 0
        self._check_trainer: pl.Trainer | None = None  # set while a check runs

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.restore_best_weights:
            who = "EarlyStoppingCallback(restore_best_weights=True)"
            why = "keeping the best weights needs the full, unsharded state dict on every rank"
            refuse_strategies(trainer, who, ALL_SHARDED, f"{why}; restore_best_weights=False works")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "best_epoch": self.best_epoch,
            "num_checks": self._num_checks,
            "train_strip": list(self._train_strip),
            "best_weights": self.best_weights.state,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # a checkpoint of Lightning's EarlyStopping loads too
        self.best_epoch = int(state_dict.get("best_epoch", -1))
        self._num_checks = int(state_dict.get("num_checks", 0))
        self._train_strip = deque(state_dict.get("train_strip", ()), maxlen=self.strip_length)
        self.best_weights = BestWeights(state_dict.get("best_weights"))  # saved from CPU buffers

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.restore_best_weights and self.best_weights.state is None:
            rank_zero_warn(
                f"EarlyStoppingCallback: `{self.monitor}` never produced a best value (no check "
                "counted, or every value was non-finite), so the final weights were kept."
            )
        elif self.restore_best_weights:
            self.best_weights.restore(pl_module)
            epoch, best = self.best_epoch, f"{self.monitor} = {float(self.best_score):.3f}"
            self._log_info(trainer, f"Restored the weights of epoch {epoch}, where {best}.", True)

    @override
    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        self._check_trainer = trainer  # Lightning's flow, with the Trainer at hand for ours
        try:
            super()._run_early_stopping_check(trainer)
        finally:
            self._check_trainer = None

    @override
    def _validate_condition_metric(self, logs: dict[str, Tensor]) -> bool:
        valid = super()._validate_condition_metric(logs)
        if not valid or self.criterion != "pq" or self.train_monitor in logs:
            return valid
        msg = (
            f"Early stopping criterion 'pq' needs the training metric `{self.train_monitor}`: "
            f"log it with `self.log(..., on_epoch=True)` or use any of: `{'`, `'.join(logs)}`"
        )
        if self.strict:
            raise RuntimeError(msg)
        if self.verbose:
            rank_zero_warn(msg, category=RuntimeWarning)
        return False

    @override
    def _evaluate_stopping_criteria(self, current: Tensor) -> tuple[bool, str | None]:
        trainer, train = self._check_trainer, None  # None when called directly: a counted check
        if trainer is not None and self.criterion == "pq":
            train = float(trainer.callback_metrics[self.train_monitor])
        if trainer is not None and trainer.world_size > 1:  # every rank decides on rank 0's values
            bad = bool(self.check_finite and not torch.isfinite(current))
            current, train = trainer.strategy.broadcast((current.detach().cpu(), train), src=0)
            if trainer.strategy.reduce_boolean_decision(bad, all=False):  # any rank's NaN stops
                current = torch.full_like(current, math.nan)
        counted = trainer is None or trainer.current_epoch >= self.start_from_epoch
        finite = bool(torch.isfinite(current))
        if not (counted or (self.check_finite and not finite)):
            return False, None
        wait = self.wait_count
        shifted, best = current - self.min_delta, self.best_score.to(current.device)
        improved = (finite or not self.check_finite) and bool(self.monitor_op(shifted, best))
        should_stop, reason = super()._evaluate_stopping_criteria(current)
        if improved:
            self.best_score = current  # also when a threshold stopped first (Lightning skips it)
            if self.baseline is not None and not self.monitor_op(shifted, self.baseline):
                self.wait_count = wait + 1  # an improvement that misses the baseline is no reset
        self._num_checks += 1
        if train is not None:
            self._train_strip.append(train)
        if self.criterion != "patience" and not should_stop and finite:
            should_stop, reason = self._prechelt(current, reason)
        if trainer is not None and improved:
            self.best_epoch = trainer.current_epoch
            if self.restore_best_weights and trainer.lightning_module is not None:
                self.best_weights.save(trainer.lightning_module)
        if trainer is not None and counted:
            self._log_state(trainer)
        return should_stop, reason

    def _prechelt(self, current: Tensor, reason: str | None) -> tuple[bool, str | None]:
        """The ``GL_α`` or ``PQ_α`` rule on an already counted, finite check."""
        try:
            gl = generalization_loss(float(current), float(self.best_score))
            value, alpha, name = gl, self.gl_alpha, "generalization loss GL"
            if self.criterion == "pq" and self._num_checks % self.strip_length:
                return False, reason  # PQ is evaluated at the end of a strip only
            if self.criterion == "pq":
                progress = training_progress(self._train_strip)
                value, alpha = progress_quotient(gl, progress), self.pq_alpha
                name = f"progress quotient GL/P_{self.strip_length} = {gl:.3f}/{progress:.3f}"
        except ValueError as err:
            raise RuntimeError(
                f"EarlyStoppingCallback(criterion={self.criterion!r}) needs a positive error for "
                f"`{self.monitor}` and `train_monitor`; monitor a loss or 1 - accuracy. {err}"
            ) from err
        if value <= alpha:
            return False, reason
        self.stopping_reason = EarlyStoppingReason.PATIENCE_EXHAUSTED
        return True, (
            f"Monitored metric {self.monitor} = {float(current):.3f}: {name} = {value:.3f} > "
            f"{alpha:g}. Best score: {float(self.best_score):.3f}. Signaling Trainer to stop."
        )

    def _log_state(self, trainer: pl.Trainer) -> None:
        wait, best = float(self.wait_count), float(self.best_score)
        metrics = {"reg/early_stopping/wait": wait, "reg/early_stopping/best_score": best}
        # at training-epoch end Lightning logs epoch metrics at the epoch's last step; so do we
        step = max(batches_that_stepped(trainer) - int(bool(self._check_on_train_epoch_end)), 0)
        for logger in trainer.loggers:  # as Lightning's own logger connector does
            logger.log_metrics(metrics, step=step)
            logger.save()
