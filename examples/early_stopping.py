"""Early stopping that restores the best weights (Lightning's EarlyStopping cannot).

python examples/early_stopping.py [--smoke]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl

from lightning_reg.demo.data import DemoDataModule
from lightning_reg.demo.model import DemoClassifier
from lightning_reg.early_stopping import EarlyStoppingCallback


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--smoke", action="store_true", help="2 epochs of 2 batches")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    stopper = EarlyStoppingCallback("val_loss", patience=args.patience, restore_best_weights=True)
    model = DemoClassifier("image", [1, 8, 8], 10, optimizer="sgd", lr=0.05)
    trainer = pl.Trainer(
        max_epochs=2 if args.smoke else args.epochs,
        limit_train_batches=2 if args.smoke else None,
        limit_val_batches=1 if args.smoke else None,
        callbacks=[stopper],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not args.smoke,
        enable_model_summary=not args.smoke,
    )
    trainer.fit(model, DemoDataModule("digits", train_size=300))
    result = {
        "epochs_run": trainer.current_epoch,
        "best_epoch": stopper.best_epoch,
        "best_val_loss": float(stopper.best_score),
    }
    print(result)
    return result


if __name__ == "__main__":
    main()
