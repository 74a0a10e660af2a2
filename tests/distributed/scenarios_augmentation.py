"""Shared helpers and DDP scenarios for the augmentation / MixUp / label-smoothing tests."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_reg.augmentation import DataAugmentationCallback, GaussianNoise
from lightning_reg.mixing import MixUpCallback
from tests.helpers.ddp import ddp_trainer_kwargs
from tests.helpers.models import ClassifierModule, SmallCNN, list_loader, tiny_trainer


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


def fit_draws(rank: int, precision: str = "32-true") -> dict[str, Any]:
    """Two DDP steps with augmentation + MixUp; return what each rank drew."""
    pl.seed_everything(7, verbose=False)
    x, y = image_data(32)
    aug = DataAugmentationCallback(GaussianNoise((0.05, 0.2)), p=0.5)
    mix = MixUpCallback(0.4, num_classes=4, mode="sample")
    rec_aug, rec_mix = ParamRecorder(aug), ParamRecorder(mix)
    module = RecordingModule(SmallCNN(in_channels=3, num_classes=4))
    trainer = tiny_trainer(
        max_steps=2,
        precision=precision,
        callbacks=[aug, rec_aug, mix, rec_mix],
        **ddp_trainer_kwargs(),
    )
    trainer.fit(module, list_loader(x, y, batch_size=8))
    return {
        "rank": trainer.global_rank,
        "aug": rec_aug.params,
        "mix": rec_mix.params,
        "target_dtype": str(module.train_batches[0][1].dtype),
    }
