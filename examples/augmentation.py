"""Batched on-device data augmentation of the training batch only.

``DataAugmentationCallback`` rewrites the inputs of each training batch in
``on_train_batch_start`` with a batched transform: per-sample random parameters, drawn from
the callback's own generator (reproducible under ``seed_everything`` and across a resume).

    python examples/augmentation.py [--smoke]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl

from lightning_reg.augmentation import (
    Compose,
    DataAugmentationCallback,
    GaussianNoise,
    RandomResizedCrop,
)
from lightning_reg.demo.data import DemoDataModule
from lightning_reg.demo.model import DemoClassifier


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="1 epoch of 2 batches")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    transform = Compose(
        [RandomResizedCrop(8, scale=(0.7, 1.0), ratio=(0.85, 1.15)), GaussianNoise(0.1)]
    )
    model = DemoClassifier("image", [1, 8, 8], 10, optimizer="sgd", lr=0.05)
    trainer = pl.Trainer(
        max_epochs=1 if args.smoke else args.epochs,
        limit_train_batches=2 if args.smoke else None,
        limit_val_batches=1 if args.smoke else None,
        callbacks=[DataAugmentationCallback(transform)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not args.smoke,
        enable_model_summary=not args.smoke,
    )
    trainer.fit(model, DemoDataModule("digits", train_size=300))
    result = {"val_acc": float(trainer.callback_metrics["val_acc"])}
    print(result)
    return result


if __name__ == "__main__":
    main()
