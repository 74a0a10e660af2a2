"""Test helpers for the batch-rewriting callbacks (augmentation, MixUp/CutMix, label smoothing)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from tests.helpers.models import ClassifierModule


class RecordingModule(ClassifierModule):
    """A classifier that keeps a copy of every training and validation batch it receives."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.train_batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.val_batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        x, y = self._unpack(batch)
        self.train_batches.append((x.detach().clone(), y.detach().clone()))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        x, y = self._unpack(batch)
        self.val_batches.append((x.detach().clone(), y.detach().clone()))
        return super().validation_step(batch, batch_idx)


class ParamRecorder(Callback):
    """Records ``last_params`` of another callback after each of its batch rewrites."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.params: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.params.append(_detach(self.target.last_params))


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def image_data(n: int = 32, channels: int = 3, size: int = 8, num_classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, size, size, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return x, y
