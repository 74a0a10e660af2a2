"""MixUp, CutMix or both: mix pairs of training samples and their (soft) targets.

MixUp: ``x̃ = λ·x_i + (1−λ)·x_j``, ``ỹ = λ·y_i + (1−λ)·y_j``, ``λ ~ Beta(α, α)``. CutMix pastes
a box of ``x_j`` into ``x_i`` and sets λ to the exact kept area. The targets become soft, so
the loss must accept probabilities (``F.cross_entropy`` does). ``--method both`` switches between
them per batch (timm's ``Mixup``); ``--label-smoothing`` smooths the targets inside the same
callback (do not stack a ``LabelSmoothingCallback``).

    python examples/mixup_cutmix.py [--method mixup|cutmix|both] [--label-smoothing 0.1] [--smoke]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl

from lightning_reg.demo.data import DemoDataModule
from lightning_reg.demo.model import DemoClassifier
from lightning_reg.mixing import CutMixCallback, MixUpCallback, MixUpCutMixCallback


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", choices=["mixup", "cutmix", "both"], default="mixup")
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="1 epoch of 2 batches")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    common = {"num_classes": 10, "label_smoothing": args.label_smoothing}
    if args.method == "mixup":
        callback = MixUpCallback(args.alpha or 0.2, **common)
    elif args.method == "cutmix":
        callback = CutMixCallback(args.alpha or 1.0, **common)
    else:
        callback = MixUpCutMixCallback(mixup_alpha=0.2, cutmix_alpha=1.0, **common)
    model = DemoClassifier("image", [1, 8, 8], 10, optimizer="sgd", lr=0.05)
    trainer = pl.Trainer(
        max_epochs=1 if args.smoke else args.epochs,
        limit_train_batches=2 if args.smoke else None,
        limit_val_batches=1 if args.smoke else None,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not args.smoke,
        enable_model_summary=not args.smoke,
        log_every_n_steps=1 if args.smoke else 50,
    )
    trainer.fit(model, DemoDataModule("digits", train_size=300))
    metrics = trainer.callback_metrics
    result = {
        "val_acc": float(metrics["val_acc"]),
        "mean_lambda": float(metrics[f"reg/{callback.technique}/lambda"]),
    }
    print(result)
    return result


if __name__ == "__main__":
    main()
