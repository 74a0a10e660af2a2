"""Inserting and freezing batch norm: :func:`add_batch_norm`, :class:`BatchNormFreezeCallback`.

For models that have no BatchNorm yet (before ghost or precise BN), and for the common last phase
of fine-tuning where BatchNorm layers normalise with their running statistics.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from lightning_reg.core.logging import is_logging_step, log_scalars
from lightning_reg.core.surgery import (
    ModuleChange,
    TransparentWrapper,
    replace_modules,
    restore_modules,
)
from lightning_reg.core.validation import check_int

__all__ = ["BatchNormAfter", "BatchNormFreezeCallback", "add_batch_norm", "remove_batch_norm"]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_FOLLOWED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_FOR = dict(zip(_FOLLOWED, (nn.BatchNorm1d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)))


class BatchNormAfter(TransparentWrapper):
    """``module`` followed by a new BatchNorm over its output channels.

    For ``nn.Linear`` the BatchNorm1d normalises the last dim (extra leading dims are flattened
    into the batch); for ``ConvNd`` it is a BatchNormNd over ``out_channels``. The wrapped
    module's ``state_dict`` keys are unchanged; the new layer's keys are ``<path>.bn.*``.
    :meth:`unwrap` returns ``module``.

    Args:
        module: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``.
        momentum: momentum of the new BatchNorm.

    Raises:
        TypeError: for another module type.

    Example:
        >>> layer = BatchNormAfter(nn.Linear(3, 4))
        >>> sorted(layer.state_dict())[:3]
        ['bias', 'bn.bias', 'bn.num_batches_tracked']
    """

    def __init__(self, module: nn.Module, momentum: float | None = 0.1) -> None:
        super().__init__(module)
        bn_type = next((b for t, b in _BN_FOR.items() if isinstance(module, t)), None)
        if bn_type is None:
            raise TypeError(f"BatchNormAfter supports Linear/ConvNd, not {type(module).__name__}")
        layer: Any = module
        features = layer.out_features if isinstance(module, nn.Linear) else layer.out_channels
        factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
        self.bn = bn_type(features, momentum=momentum, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.module(x)
        if isinstance(self.module, nn.Linear) and y.ndim != 2:  # BatchNorm1d over the last dim
            return self.bn(y.reshape(-1, y.shape[-1])).reshape(y.shape)
        return self.bn(y)


def add_batch_norm(
    model: nn.Module,
    after: tuple[type[nn.Module], ...] | type[nn.Module] = (nn.Linear, nn.Conv2d),
    *,
    skip_last: bool = True,
    allow_existing: bool = False,
    momentum: float | None = 0.1,
) -> list[ModuleChange]:
    """Insert a BatchNorm after every module of the types in ``after`` (in place).

    Args:
        model: the model to change.
        after: module types to follow with BatchNorm (``nn.Linear``, ``nn.ConvNd``).
        skip_last: leave the last matching module alone (usually the classifier head: batch
            norm on the logits is rarely wanted).
        allow_existing: insert even though the model already has BatchNorm layers.
        momentum: momentum of the new layers.

    Returns:
        The list of changes.

    Raises:
        RuntimeError: if the model already has BatchNorm (unless ``allow_existing``), was
            already changed by ``add_batch_norm``, or has nothing to follow.
        TypeError: if ``after`` names a type other than Linear/Conv1d/2d/3d.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> [c.path for c in add_batch_norm(m)]
        ['0']
    """
    types = (after,) if isinstance(after, type) else tuple(after)
    if not types or not all(isinstance(t, type) and issubclass(t, _FOLLOWED) for t in types):
        raise TypeError(f"`after` must be Linear/Conv1d/Conv2d/Conv3d types, got {after!r}")
    if any(isinstance(m, BatchNormAfter) for m in model.modules()):
        raise RuntimeError(
            "The model already has BatchNorm inserted by add_batch_norm (undo: remove_batch_norm)."
        )
    existing = [n for n, m in model.named_modules() if isinstance(m, _BATCH_NORMS)]
    if existing and not allow_existing:
        raise RuntimeError(
            f"The model already has BatchNorm layers ({existing[:3]}); add_batch_norm is for "
            "models without any. Pass allow_existing=True to insert more anyway."
        )
    targets = [n for n, m in model.named_modules() if n and isinstance(m, types)]
    skip = targets[-1] if skip_last and targets else None
    policy = dict.fromkeys(types, lambda m, p: None if p == skip else BatchNormAfter(m, momentum))
    changes = replace_modules(model, policy)
    if not changes:
        raise RuntimeError(
            f"add_batch_norm found no {[t.__name__ for t in types]} to follow with BatchNorm"
            f"{' (other than the last one, skip_last=True)' if skip else ''}."
        )
    return changes


def remove_batch_norm(model: nn.Module) -> list[ModuleChange]:
    """Undo :func:`add_batch_norm`: the wrapped modules come back, the inserted BN goes.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = add_batch_norm(m)
        >>> [c.new_type for c in remove_batch_norm(m)]
        ['Linear']
    """
    return restore_modules(model, BatchNormAfter)


class BatchNormFreezeCallback(pl.Callback):
    """From epoch ``epoch`` on, keep every BatchNorm layer in eval mode during training.

    Frozen layers normalise with their running statistics and stop updating them (their affine
    parameters still train), a common last phase of fine-tuning. Logs
    ``reg/batch_norm/frozen`` (0 or 1) on logging steps.

    Args:
        epoch: first epoch (0-based) with frozen BatchNorm (>= 0).

    Raises:
        ValueError: if ``epoch`` is not an integer >= 0.
        RuntimeError: at setup, if the model has no BatchNorm.

    Example:
        >>> trainer = pl.Trainer(callbacks=[BatchNormFreezeCallback(10)])  # doctest: +SKIP

    Reference:
        Ioffe & Szegedy, "Batch Normalization", ICML 2015 (inference-mode normalisation).
    """

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = check_int("epoch", epoch, minimum=0)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not any(isinstance(m, _BATCH_NORMS) for m in pl_module.modules()):
            raise RuntimeError("BatchNormFreezeCallback found no BatchNorm layer in the model.")

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        frozen = trainer.current_epoch >= self.epoch
        for module in pl_module.modules() if frozen else ():  # as found now (after any surgery)
            if isinstance(module, _BATCH_NORMS):
                module.training = False
        if is_logging_step(trainer):
            log_scalars(pl_module, {"reg/batch_norm/frozen": float(frozen)})
