"""Max-norm: after every optimizer step, each unit's incoming weights lie in a ball of radius r.

In PyTorch layout a unit is dim 0 (a row of a Linear weight, an output channel of a Conv);
units already inside the ball are left unchanged, bit for bit.

    python examples/max_norm.py [--max-norm 1.0] [--smoke]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl

from lightning_reg.demo.data import DemoDataModule
from lightning_reg.demo.model import DemoClassifier
from lightning_reg.max_norm import MaxNormCallback


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="1 epoch of 2 batches")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    model = DemoClassifier("image", [1, 8, 8], 10, optimizer="sgd", lr=0.05)
    trainer = pl.Trainer(
        max_epochs=1 if args.smoke else args.epochs,
        limit_train_batches=2 if args.smoke else None,
        limit_val_batches=1 if args.smoke else None,
        callbacks=[MaxNormCallback(args.max_norm)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not args.smoke,
        enable_model_summary=not args.smoke,
    )
    trainer.fit(model, DemoDataModule("digits", train_size=300))
    weights = [p.detach() for p in model.parameters() if p.ndim >= 2]
    unit_norms = [w.flatten(1).norm(dim=1).max() for w in weights]
    result = {
        "val_acc": float(trainer.callback_metrics["val_acc"]),
        "max_unit_norm": float(max(unit_norms)),
    }
    print(result)
    return result


if __name__ == "__main__":
    main()
