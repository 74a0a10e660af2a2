"""DDP scenarios for the augmentation / MixUp tests (models live in tests/helpers)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from lightning_reg.augmentation import DataAugmentationCallback, GaussianNoise
from lightning_reg.mixing import MixUpCallback
from tests.helpers.ddp import ddp_trainer_kwargs
from tests.helpers.models import SmallCNN, list_loader, tiny_trainer
from tests.helpers.models_rewriters import ParamRecorder, RecordingModule, image_data


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
