"""Stochastic depth: drop whole residual blocks during training (dropped blocks are not run).

Block ``l`` of ``L`` survives with ``p_l = 1 − (l/L)·(1 − p_L)``; in eval mode the model is the
unwrapped model exactly.

    python examples/stochastic_depth.py [--survival-prob-last 0.5] [--smoke]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl

from lightning_reg.demo.data import DemoDataModule
from lightning_reg.demo.model import DemoClassifier, ResidualBlock
from lightning_reg.stochastic_depth import StochasticDepthCallback, expected_depth


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--survival-prob-last", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="1 epoch of 2 batches")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    model = DemoClassifier("image", [1, 8, 8], 10, optimizer="sgd", lr=0.05)
    trainer = pl.Trainer(
        max_epochs=1 if args.smoke else args.epochs,
        limit_train_batches=2 if args.smoke else None,
        limit_val_batches=1 if args.smoke else None,
        callbacks=[StochasticDepthCallback(args.survival_prob_last, block_types=(ResidualBlock,))],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not args.smoke,
        enable_model_summary=not args.smoke,
    )
    trainer.fit(model, DemoDataModule("digits", train_size=300))
    result = {
        "val_acc": float(trainer.callback_metrics["val_acc"]),
        "expected_depth": expected_depth(model),
    }
    print(result)
    return result


if __name__ == "__main__":
    main()
