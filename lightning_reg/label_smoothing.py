"""Label smoothing: ``ỹ = (1 − α)·onehot(y) + α/K`` as soft training targets.

``F.cross_entropy(logits, smooth_labels(y, α, K))`` equals
``F.cross_entropy(logits, y, label_smoothing=α)``, so the soft targets work with the loss the
user already has. With MixUp/CutMix, pass ``label_smoothing=α`` to the mixing callback instead
(as timm's ``Mixup`` does); stacking both callbacks raises an error that says so.

Pure torch first (:func:`smooth_labels`), then the Lightning class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_reg.core.batch import BatchKey, BatchSlot
from lightning_reg.core.logging import is_logging_step, log_scalars
from lightning_reg.core.schedules import Schedule, as_schedule
from lightning_reg.core.surgery import training_flags_restored
from lightning_reg.core.targets import check_labels, to_soft_targets
from lightning_reg.core.validation import check_int, check_probability

__all__ = ["LabelSmoothingCallback", "smooth_labels", "to_soft_targets"]


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
    return to_soft_targets(targets, num_classes, smoothing=check_probability("alpha", alpha))


class LabelSmoothingCallback(pl.Callback):
    """Replace the training targets by ``(1 − α)·onehot(y) + α/K`` (any loss on soft targets).

    The targets are rewritten in ``on_train_batch_start``; validation, test and predict batches
    keep their hard labels. The model's loss must accept soft targets, as ``F.cross_entropy``
    does. ``α`` may follow a :class:`~lightning_reg.core.schedules.Schedule`; it is logged as
    ``reg/label_smoothing/alpha`` on logging steps.

    **Number of classes.** With ``num_classes=None``, ``K`` is taken, at the first training
    batch, from soft targets already in the batch (their dim 1), else from one forward pass of
    the model on that batch's inputs (under ``torch.no_grad()`` with every module temporarily in
    eval mode, so BatchNorm statistics and dropout RNG are untouched): ``K`` is dim 1 of the
    output. If that fails, a ``RuntimeError`` asks for ``num_classes``. The attribute
    ``num_classes`` then holds the inferred ``K``, which is saved in checkpoints.

    **With MixUp/CutMix** use the mixing callback's ``label_smoothing=`` argument: one callback
    then owns the targets. Stacking this callback with a mixing callback raises at setup.

    Args:
        alpha: smoothing in [0, 1] (used when ``schedule`` is ``None``).
        num_classes: ``K``, or ``None`` to infer it (see above).
        target_key: list index or dict key of the targets in the batch.
        input_key: list index or dict key of the inputs (only to infer ``K``).
        schedule: optional schedule of ``α`` over epochs or steps; values must be in [0, 1].
            Without one, ``self.schedule`` is the constant ``alpha``, as in ``DropoutCallback``.
        target_getter: optional ``getter(batch) -> Tensor`` for the targets.
        target_setter: optional ``setter(batch, value)`` for the targets.

    Raises:
        ValueError: for ``alpha`` outside [0, 1] (NaN included) or ``num_classes < 1``.
        RuntimeError: at setup when a MixUp/CutMix callback is also attached; during training,
            for a tuple batch, labels outside ``[0, K)``, a schedule value outside [0, 1], or
            when ``K`` cannot be inferred.

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
        self.schedule = as_schedule(self.alpha if schedule is None else schedule, "schedule")
        self.target = BatchSlot(
            target_key, getter=target_getter, setter=target_setter, role="target"
        )
        self.input = BatchSlot(input_key, role="input")
        self._checked = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(target_key=self.target.key)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Duck typing (technique modules are leaves): mixing callbacks set `mixes_targets`.
        for mixer in trainer.callbacks:
            if getattr(mixer, "mixes_targets", False):
                raise RuntimeError(
                    f"LabelSmoothingCallback and {type(mixer).__name__} both rewrite the targets. "
                    f"Remove LabelSmoothingCallback and pass `label_smoothing={self.alpha}` to "
                    f"{type(mixer).__name__} instead (as timm's Mixup does)."
                )
        self._checked = False

    def current_alpha(self, trainer: pl.Trainer) -> float:
        """``α`` for the current epoch and step."""
        value = self.schedule.value(epoch=trainer.current_epoch, step=trainer.global_step)
        if not 0.0 <= value <= 1.0:  # NaN fails too
            raise RuntimeError(
                f"Fix the label-smoothing schedule: it gave alpha={value!r} at epoch "
                f"{trainer.current_epoch}, step {trainer.global_step}; alpha must be in [0, 1]."
            )
        return value

    def smooth(self, targets: torch.Tensor, alpha: float | None = None) -> torch.Tensor:
        """Smooth ``targets`` with ``alpha`` (default: the constant ``α``) and the known ``K``."""
        if self.num_classes is None:
            raise RuntimeError("LabelSmoothingCallback has no num_classes yet: pass it.")
        try:
            if not self._checked:  # once: on an accelerator this reads back to the host
                check_labels(targets, self.num_classes)
                self._checked = True
            return smooth_labels(targets, self.alpha if alpha is None else alpha, self.num_classes)
        except ValueError as err:
            raise RuntimeError(f"LabelSmoothingCallback: {err}") from err

    def _infer_num_classes(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, y: torch.Tensor
    ) -> int:
        """``K`` from soft targets, else from dim 1 of one eval-mode forward (state untouched)."""
        if y.is_floating_point() and y.ndim >= 2:
            return int(y.shape[1])
        try:
            with training_flags_restored(pl_module), torch.no_grad():
                pl_module.eval()
                with trainer.precision_plugin.forward_context():
                    return int(pl_module(self.input.get(batch)).shape[1])
        except Exception as err:  # no input, a failing forward, or no (B, K, ...) tensor out
            raise RuntimeError(
                "Cannot infer the number of classes from dim 1 of the model's output on the first "
                f"training batch ({type(err).__name__}: {err}). Pass `num_classes=` instead."
            ) from err

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        alpha = self.current_alpha(trainer)
        y = self.target.get(batch)
        if self.num_classes is None:
            self.num_classes = self._infer_num_classes(trainer, pl_module, batch, y)
        self.target.set(batch, self.smooth(y, alpha))
        if is_logging_step(trainer):
            log_scalars(pl_module, {"reg/label_smoothing/alpha": alpha})

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_classes = self.num_classes or state_dict.get("num_classes")
