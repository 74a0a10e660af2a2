"""Label smoothing: train on ``(1 − α)·onehot(y) + α/K`` instead of one-hot targets.

python examples/label_smoothing.py [--alpha 0.1] [--smoke]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl

from lightning_reg.demo.data import DemoDataModule
from lightning_reg.demo.model import DemoClassifier
from lightning_reg.label_smoothing import LabelSmoothingCallback
from lightning_reg.monitor import RegularizationMonitorCallback


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="1 epoch of 2 batches")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    model = DemoClassifier("image", [1, 8, 8], 10, optimizer="sgd", lr=0.05)
    trainer = pl.Trainer(
        max_epochs=1 if args.smoke else args.epochs,
        limit_train_batches=2 if args.smoke else None,
        limit_val_batches=1 if args.smoke else None,
        callbacks=[
            LabelSmoothingCallback(args.alpha, num_classes=10),
            # ECE on validation, to see what smoothing does to calibration.
            RegularizationMonitorCallback(num_classes=10),
        ],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not args.smoke,
        enable_model_summary=not args.smoke,
    )
    trainer.fit(model, DemoDataModule("digits", train_size=300))
    result = {
        "val_acc": float(trainer.callback_metrics["val_acc"]),
        "ece": float(trainer.callback_metrics["reg/monitor/ece"]),
    }
    print(result)
    return result


if __name__ == "__main__":
    main()
