"""Ghost batch norm (statistics per virtual batch) and precise BN population statistics.

``GhostBatchNormCallback`` swaps every BatchNorm for ghost batch norm in ``setup``;
``PreciseBatchNormCallback`` recomputes exact running statistics over N training batches
before each validation.

    python examples/batch_norm.py [--virtual-batch-size 16] [--smoke]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl

from lightning_reg import GhostBatchNormCallback, PreciseBatchNormCallback
from lightning_reg.demo.data import DemoDataModule
from lightning_reg.demo.model import DemoClassifier


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--virtual-batch-size", type=int, default=16)
    parser.add_argument("--precise-batches", type=int, default=5)
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
            GhostBatchNormCallback(args.virtual_batch_size),
            PreciseBatchNormCallback(args.precise_batches),
        ],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not args.smoke,
        enable_model_summary=not args.smoke,
    )
    trainer.fit(model, DemoDataModule("digits", train_size=300))
    ghost = sum(type(m).__name__.startswith("GhostBatchNorm") for m in model.modules())
    result = {"val_acc": float(trainer.callback_metrics["val_acc"]), "ghost_layers": ghost}
    print(result)
    return result


if __name__ == "__main__":
    main()
