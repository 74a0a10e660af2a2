"""Logging helpers: log through Lightning's logger API, only on logging steps."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_reg.core.compat import should_update_logs


def is_logging_step(trainer: pl.Trainer) -> bool:
    """Whether the current training step is one that Lightning writes to the loggers.

    Follows ``Trainer(log_every_n_steps=...)``. Callbacks compute diagnostics only on these
    steps, so the hot path never pays for them.
    """
    return should_update_logs(trainer)


def log_scalars(
    pl_module: pl.LightningModule,
    values: dict[str, torch.Tensor | float],
    *,
    on_step: bool = True,
    on_epoch: bool = False,
) -> None:
    """Log ``values`` (tensors stay on device: no ``.item()``) under their full keys.

    Values are detached and logged without cross-rank sync (``sync_dist=False``): every
    quantity a callback logs is either identical on all ranks or a rank-local diagnostic.
    """
    for key, value in values.items():
        value = value.detach().float() if isinstance(value, torch.Tensor) else value
        pl_module.log(key, value, on_step=on_step, on_epoch=on_epoch, sync_dist=False)
