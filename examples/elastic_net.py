"""Elastic net: the gradient of ``λ1·Σ|w| + λ2/2·Σw²``, here with the proximal L1 part.

python examples/elastic_net.py [--smoke]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl

from lightning_reg.demo.data import DemoDataModule
from lightning_reg.demo.model import DemoClassifier
from lightning_reg.penalties import ElasticNetCallback


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--l1", type=float, default=0.02)
    parser.add_argument("--l2", type=float, default=5e-3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="1 epoch of 2 batches")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    model = DemoClassifier("tabular", [30], 2, optimizer="sgd", lr=0.05)
    trainer = pl.Trainer(
        max_epochs=1 if args.smoke else args.epochs,
        limit_train_batches=2 if args.smoke else None,
        limit_val_batches=1 if args.smoke else None,
        callbacks=[ElasticNetCallback(args.l1, args.l2, proximal=True)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not args.smoke,
        enable_model_summary=not args.smoke,
    )
    trainer.fit(model, DemoDataModule("breast_cancer", train_size=100, batch_size=32))
    weights = [p for p in model.parameters() if p.ndim >= 2]
    result = {
        "val_acc": float(trainer.callback_metrics["val_acc"]),
        "zero_fraction": sum(int((p == 0).sum()) for p in weights)
        / sum(p.numel() for p in weights),
    }
    print(result)
    return result


if __name__ == "__main__":
    main()
