"""Dropout: insert it by surgery, schedule its rate, and predict with MC dropout.

``add_dropout`` puts ``Dropout`` after the chosen module types (here the head's ``Flatten``);
``DropoutCallback`` sets the rate from a schedule (early dropout: p for the first epochs, then
0); ``MCDropoutMixin.mc_predict`` averages stochastic forward passes with BatchNorm kept in
eval mode.

    python examples/dropout.py [--smoke]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
from torch import nn

from lightning_reg.demo.data import DemoDataModule
from lightning_reg.demo.model import DemoClassifier
from lightning_reg.dropout import DropoutCallback, EarlyDropoutSchedule, MCDropoutMixin, add_dropout


class MCDemoClassifier(MCDropoutMixin, DemoClassifier):
    mc_classifier = True


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--p", type=float, default=0.3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="1 epoch of 2 batches")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    model = MCDemoClassifier("image", [1, 8, 8], 10, optimizer="sgd", lr=0.05)
    changes = add_dropout(model, args.p, after=nn.Flatten)
    print(f"inserted dropout after {[c.path for c in changes]}")
    epochs = 1 if args.smoke else args.epochs
    schedule = EarlyDropoutSchedule(args.p, until=max(1, epochs // 2))
    trainer = pl.Trainer(
        max_epochs=epochs,
        limit_train_batches=2 if args.smoke else None,
        limit_val_batches=1 if args.smoke else None,
        callbacks=[DropoutCallback(schedule=schedule)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not args.smoke,
        enable_model_summary=not args.smoke,
    )
    data = DemoDataModule("digits", train_size=300)
    trainer.fit(model, data)
    # MC dropout needs a non-zero rate at prediction time.
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = args.p
    x_val = data.data.x_val[:256]
    mc = model.mc_predict(x_val, 8)
    result = {
        "val_acc": float(trainer.callback_metrics["val_acc"]),
        "mc_mean_entropy": float(mc.entropy.mean()),
    }
    print(result)
    return result


if __name__ == "__main__":
    main()
