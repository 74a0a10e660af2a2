"""Label smoothing: ``ỹ = (1 − α)·onehot(y) + α/K`` as soft training targets.

``F.cross_entropy(logits, smooth_labels(y, α, K))`` equals
``F.cross_entropy(logits, y, label_smoothing=α)``, so the soft targets work with the loss the
user already has. Smoothing is affine in ``y``, so it commutes with MixUp/CutMix: smoothing the
mixed targets equals mixing the smoothed targets. :class:`LabelSmoothingCallback` makes the two
callback orders give bit-identical targets by always applying the smoothing after the mixing.

Pure torch first (:func:`to_soft_targets`, :func:`smooth_labels`), then the Lightning class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_reg.core.batch import BatchKey, BatchSlot
from lightning_reg.core.logging import is_logging_step, log_scalars
from lightning_reg.core.schedules import Schedule
from lightning_reg.core.validation import check_int, check_probability

__all__ = ["LabelSmoothingCallback", "smooth_labels", "to_soft_targets"]


def to_soft_targets(
    targets: torch.Tensor, num_classes: int, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Integer labels as one-hot float targets; soft float targets are checked and passed on.

    The class dimension is dim 1, as ``F.cross_entropy`` expects: labels ``(B,)`` give
    ``(B, K)``; labels ``(B, d1, ...)`` give ``(B, K, d1, ...)``. Float targets must already
    have ``K`` entries along dim 1 and are returned unchanged.

    Args:
        targets: integer class labels, or float soft targets.
        num_classes: the number of classes ``K`` (>= 1).
        dtype: the float dtype of the one-hot targets.

    Raises:
        ValueError: if a label is outside ``[0, K)``, or soft targets do not have ``K`` classes
            along dim 1.
    """
    k = check_int("num_classes", num_classes, 1)
    if targets.is_floating_point():
        if targets.ndim < 2 or targets.shape[1] != k:
            raise ValueError(
                f"Soft (float) targets must have shape (B, num_classes={k}, ...), got "
                f"{tuple(targets.shape)}; pass integer class labels, or fix `num_classes`."
            )
        return targets
    if targets.dtype == torch.bool or targets.is_complex():
        raise ValueError(f"Targets must be integer class labels or float, got {targets.dtype}")
    # On the CPU the range check is free; on an accelerator it would cost a host sync every
    # step, so there F.one_hot's own device-side check (an error, never a silent wrong target)
    # is relied on instead.
    if targets.numel() > 0 and targets.device.type == "cpu":
        low, high = torch.aminmax(targets)
        if bool((low < 0) | (high >= k)):
            raise ValueError(
                f"Class labels must be in [0, {k - 1}] for num_classes={k}, got labels in "
                f"[{int(low)}, {int(high)}]. Set `num_classes` to the number of classes of your "
                "dataset (ignore_index labels such as -100 are not supported)."
            )
    onehot = F.one_hot(targets.long(), k).to(dtype)
    return onehot.movedim(-1, 1) if onehot.ndim > 2 else onehot


def smooth_labels(targets: torch.Tensor, alpha: float, num_classes: int) -> torch.Tensor:
    """``(1 − α)·onehot(y) + α/K`` for labels, ``(1 − α)·y + α/K`` for soft targets.

    Args:
        targets: integer labels ``(B, ...)`` or soft float targets ``(B, K, ...)``.
        alpha: smoothing in [0, 1].
        num_classes: ``K``.

    Raises:
        ValueError: for ``alpha`` outside [0, 1] (NaN included), labels outside ``[0, K)`` or
            soft targets without ``K`` classes.

    Example:
        >>> smooth_labels(torch.tensor([0, 2]), 0.3, 3)
        tensor([[0.8000, 0.1000, 0.1000],
                [0.1000, 0.1000, 0.8000]])

    Reference:
        Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", CVPR 2016.
    """
    a = check_probability("alpha", alpha)
    soft = to_soft_targets(targets, num_classes)
    return soft * (1.0 - a) + a / num_classes


class LabelSmoothingCallback(Callback):
    """Replace the training targets by ``(1 − α)·onehot(y) + α/K`` (any loss on soft targets).

    The targets are rewritten in ``on_train_batch_start``; validation, test and predict batches
    keep their hard labels. The model's loss must accept soft targets, as ``F.cross_entropy``
    does. ``α`` may follow a :class:`~lightning_reg.core.schedules.Schedule`; it is logged as
    ``reg/label_smoothing/alpha`` on logging steps.

    **Number of classes.** With ``num_classes=None``, ``K`` is taken, at the first training
    batch, from (1) soft targets already in the batch (their dim 1), else (2) a MixUp/CutMix
    callback of this trainer, else (3) one forward pass of the model on that batch's inputs
    (``pl_module(x)``, under ``torch.no_grad()`` with every module temporarily in eval mode, so
    BatchNorm statistics and dropout RNG are untouched): ``K`` is dim 1 of the output. If that
    fails, a ``RuntimeError`` asks for ``num_classes``.

    **With MixUp/CutMix.** The order of the callbacks does not matter: when this callback comes
    before a mixing callback in ``Trainer(callbacks=...)``, it hands its smoothing to that
    callback, which applies it right after mixing. Both orders therefore compute
    ``smooth(mix(y))`` and give bit-identical targets.

    Args:
        alpha: smoothing in [0, 1] (used when ``schedule`` is ``None``).
        num_classes: ``K``, or ``None`` to infer it (see above).
        target_key: list index or dict key of the targets in the batch.
        input_key: list index or dict key of the inputs (only to infer ``K``).
        schedule: optional schedule of ``α`` over epochs or steps; values must be in [0, 1].
        target_getter: optional ``getter(batch) -> Tensor`` for the targets.
        target_setter: optional ``setter(batch, value)`` for the targets.

    Raises:
        ValueError: for ``alpha`` outside [0, 1] (NaN included) or ``num_classes < 1``.
        RuntimeError: during training, for a tuple batch, labels outside ``[0, K)``, a
            schedule value outside [0, 1], or when ``K`` cannot be inferred.

    Example:
        >>> cb = LabelSmoothingCallback(0.1, num_classes=10)
        >>> # Trainer(callbacks=[cb]); training_step: F.cross_entropy(logits, y) as before

    Reference:
        Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", CVPR 2016.
    """

    def __init__(
        self,
        alpha: float = 0.1,
        *,
        num_classes: int | None = None,
        target_key: BatchKey = 1,
        input_key: BatchKey = 0,
        schedule: Schedule | None = None,
        target_getter: Callable[[Any], torch.Tensor] | None = None,
        target_setter: Callable[[Any, torch.Tensor], None] | None = None,
    ) -> None:
        super().__init__()
        self.alpha = check_probability("alpha", alpha)
        self.num_classes = None if num_classes is None else check_int("num_classes", num_classes, 1)
        if schedule is not None and not isinstance(schedule, Schedule):
            raise TypeError(f"`schedule` must be a Schedule or None, got {schedule!r}")
        self.schedule = schedule
        self.target = BatchSlot(
            target_key, getter=target_getter, setter=target_setter, role="target"
        )
        self.input = BatchSlot(input_key, role="input")
        self._k: int | None = self.num_classes
        self._current_alpha = self.alpha
        self._deferred_to: Any = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(target_key=self.target.key)

    def current_alpha(self, trainer: pl.Trainer) -> float:
        """``α`` for the current epoch and step."""
        if self.schedule is None:
            return self.alpha
        value = self.schedule.value(epoch=trainer.current_epoch, step=trainer.global_step)
        if not 0.0 <= value <= 1.0:  # NaN fails too
            raise RuntimeError(
                f"The label-smoothing schedule gave alpha={value!r} at epoch "
                f"{trainer.current_epoch}, step {trainer.global_step}; alpha must be in [0, 1]. "
                "Fix the schedule's start/end values."
            )
        return value

    def smooth(self, targets: torch.Tensor) -> torch.Tensor:
        """Smooth ``targets`` with the current ``α`` and ``K`` (the step's rewrite)."""
        if self._k is None:
            raise RuntimeError("LabelSmoothingCallback has no num_classes yet")
        try:
            return smooth_labels(targets, self._current_alpha, self._k)
        except ValueError as err:
            raise RuntimeError(f"LabelSmoothingCallback: {err}") from err

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_reg.mixing import _MixCallbackBase

        callbacks = list(trainer.callbacks)
        mine = next(i for i, cb in enumerate(callbacks) if cb is self)
        later = [
            cb
            for cb in callbacks[mine + 1 :]
            if isinstance(cb, _MixCallbackBase) and cb.target.key == self.target.key
        ]
        if later:
            self._deferred_to = later[-1]
            self._deferred_to.add_target_postprocessor(self.smooth)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._deferred_to is not None:
            self._deferred_to.remove_target_postprocessor(self.smooth)
            self._deferred_to = None

    def _infer_num_classes(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, y: torch.Tensor
    ) -> int:
        if y.is_floating_point() and y.ndim >= 2:
            return int(y.shape[1])
        from lightning_reg.mixing import _MixCallbackBase

        for cb in trainer.callbacks:
            if isinstance(cb, _MixCallbackBase) and cb.target.key == self.target.key:
                return cb.num_classes
        help_ = "Pass `num_classes=` to LabelSmoothingCallback."
        try:
            x = self.input.get(batch)
        except RuntimeError as err:
            raise RuntimeError(f"Cannot infer the number of classes: {err} {help_}") from err
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                out = pl_module(x)
        except Exception as err:
            raise RuntimeError(
                f"Cannot infer the number of classes: running the model on the first training "
                f"batch failed ({type(err).__name__}: {err}). {help_}"
            ) from err
        finally:
            for module, mode in modes.items():
                module.training = mode
        if not isinstance(out, torch.Tensor) or out.ndim < 2 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise RuntimeError(
                f"Cannot infer the number of classes from the model output {shape}: expected "
                f"logits of shape (B, K, ...). {help_}"
            )
        return int(out.shape[1])

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._current_alpha = self.current_alpha(trainer)
        if self._k is None or self._deferred_to is None:
            y = self.target.get(batch)
            if self._k is None:
                self._k = self._infer_num_classes(trainer, pl_module, batch, y)
            if self._deferred_to is None:
                self.target.set(batch, self.smooth(y))
        if is_logging_step(trainer):
            log_scalars(pl_module, {"reg/label_smoothing/alpha": self._current_alpha})

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"num_classes": self._k}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.num_classes is None:
            self._k = state_dict.get("num_classes")
