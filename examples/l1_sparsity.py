"""Proximal L1 (lasso) on the tabular breast-cancer data: exact zeros and feature selection.

After every optimizer step the weights are soft-thresholded, ``w ← sign(w)·max(|w| − lr·λ, 0)``,
which makes weights exactly zero (the plain subgradient ``λ·sign(w)`` only makes them
oscillate around zero). An input feature whose whole first-layer column is zero is unused.

    python examples/l1_sparsity.py [--strength 0.05] [--smoke]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl

from lightning_reg.demo.data import DemoDataModule
from lightning_reg.demo.model import DemoClassifier
from lightning_reg.penalties import L1Callback


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--strength", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="1 epoch of 2 batches")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    model = DemoClassifier("tabular", [30], 2, optimizer="sgd", lr=0.05)
    trainer = pl.Trainer(
        max_epochs=1 if args.smoke else args.epochs,
        limit_train_batches=2 if args.smoke else None,
        limit_val_batches=1 if args.smoke else None,
        callbacks=[L1Callback(args.strength, proximal=True)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not args.smoke,
        enable_model_summary=not args.smoke,
    )
    trainer.fit(model, DemoDataModule("breast_cancer", train_size=100, batch_size=32))
    weights = [p for p in model.parameters() if p.ndim >= 2]
    zeros = sum(int((p == 0).sum()) for p in weights)
    stem = model.model.stem.weight
    result = {
        "val_acc": float(trainer.callback_metrics["val_acc"]),
        "zero_fraction": zeros / sum(p.numel() for p in weights),
        "features_used": int((stem.abs().sum(dim=0) > 0).sum()),
    }
    print(result)
    return result


if __name__ == "__main__":
    main()
