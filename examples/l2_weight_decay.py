"""L2 regularization / weight decay on the digits demo CNN.

Coupled (``grad += λ·w``, the gradient of ``λ/2·Σw²``) or, with ``--decoupled``, decoupled
(``w ← w·(1 − lr·λ)`` before each step; with Adam this is AdamW). Biases and norm layers are
skipped (``params="weights"``).

    python examples/l2_weight_decay.py [--decoupled] [--smoke]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch

from lightning_reg.demo.data import DemoDataModule
from lightning_reg.demo.model import DemoClassifier
from lightning_reg.penalties import L2Callback


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--strength", type=float, default=5e-3)
    parser.add_argument("--decoupled", action="store_true")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="1 epoch of 2 batches")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    model = DemoClassifier("image", [1, 8, 8], 10, optimizer="sgd", lr=0.05)
    trainer = pl.Trainer(
        max_epochs=1 if args.smoke else args.epochs,
        limit_train_batches=2 if args.smoke else None,
        limit_val_batches=1 if args.smoke else None,
        callbacks=[L2Callback(args.strength, decoupled=args.decoupled)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not args.smoke,
        enable_model_summary=not args.smoke,
    )
    trainer.fit(model, DemoDataModule("digits", train_size=300))
    weights = [p for p in model.parameters() if p.ndim >= 2]
    result = {
        "val_acc": float(trainer.callback_metrics["val_acc"]),
        "weight_norm": float(torch.sqrt(sum(p.detach().square().sum() for p in weights))),
    }
    print(result)
    return result


if __name__ == "__main__":
    main()
