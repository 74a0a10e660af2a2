"""The only module that touches private Lightning or torch names.

Each name here is pinned by a test in ``tests/test_compat.py``: when an upgrade of Lightning or
torch moves one, that test fails with the name, instead of a technique failing obscurely.
Everything else in ``lightning_reg`` calls these wrappers.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

# Base classes torch keeps private; isinstance checks against them cover every variant
# (1d/2d/3d, lazy, sync; instance norm for NormBase; alpha/feature dropout for DropoutBase).
BatchNormBase = torch.nn.modules.batchnorm._BatchNorm
NormBase = torch.nn.modules.batchnorm._NormBase
DropoutBase = torch.nn.modules.dropout._DropoutNd

# Multi-tensor kernels: one launch for a list of tensors (torch has no public alias yet).
foreach_add_ = torch._foreach_add_
foreach_clamp_max_ = torch._foreach_clamp_max_
foreach_clamp_min = torch._foreach_clamp_min
foreach_clamp_min_ = torch._foreach_clamp_min_
foreach_mul_ = torch._foreach_mul_
foreach_norm = torch._foreach_norm
foreach_sign = torch._foreach_sign
foreach_sub_ = torch._foreach_sub_


def attached_trainer(module: Any) -> pl.Trainer | None:
    """The Trainer a LightningModule is attached to, or ``None`` (``module.trainer`` raises)."""
    return getattr(module, "_trainer", None)


def should_update_logs(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes this training step to the loggers."""
    return trainer._logger_connector.should_update_logs


def batches_that_stepped(trainer: pl.Trainer) -> int:
    """The step index Lightning passes to ``logger.log_metrics`` (falls back to global_step)."""
    loop = getattr(trainer.fit_loop, "epoch_loop", None)
    step = getattr(loop, "_batches_that_stepped", None)
    return trainer.global_step if step is None else int(step)


def grad_scaler_scale(scaler: Any) -> torch.Tensor | None:
    """A ``GradScaler``'s current scale as a tensor (no host sync), ``None`` before first use."""
    return scaler._get_scale_async()


def state_dict_metadata(state_dict: Any) -> dict[str, Any] | None:
    """The per-module version metadata torch attaches to a ``state_dict`` (or ``None``)."""
    return getattr(state_dict, "_metadata", None)
