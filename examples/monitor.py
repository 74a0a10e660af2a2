"""RegularizationMonitorCallback: norms, sparsity, train − val gap and ECE, logged to wandb.

Logs ``reg/monitor/norm/<layer>``, ``reg/monitor/norm/total``, ``reg/monitor/sparsity`` and
weight histograms on logging steps, ``reg/monitor/gap/<metric>`` at each training epoch end and
``reg/monitor/ece`` after each validation. With ``--logger csv`` it writes a CSV instead; the
wandb run is offline unless ``--wandb-mode online``.

    python examples/monitor.py [--logger wandb|csv] [--smoke]
"""

from __future__ import annotations

import argparse
import tempfile

import lightning.pytorch as pl

from lightning_reg.demo.data import DemoDataModule
from lightning_reg.demo.model import DemoClassifier
from lightning_reg.monitor import RegularizationMonitorCallback
from lightning_reg.penalties import L1Callback


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--logger", choices=["wandb", "csv"], default="wandb")
    parser.add_argument("--wandb-mode", default="offline")
    parser.add_argument("--save-dir", default=None)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="1 epoch of 2 batches")
    args = parser.parse_args(argv)
    save_dir = args.save_dir or tempfile.mkdtemp(prefix="lightning-reg-monitor-")

    if args.logger == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(
            project="lightning-reg-examples", save_dir=save_dir, mode=args.wandb_mode
        )
    else:
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(save_dir, name="monitor")

    pl.seed_everything(0, verbose=False)
    model = DemoClassifier("image", [1, 8, 8], 10, optimizer="sgd", lr=0.05)
    monitor = RegularizationMonitorCallback(
        every_n_steps=1 if args.smoke else 5, num_classes=10, gap_metrics=("acc", "loss")
    )
    trainer = pl.Trainer(
        max_epochs=1 if args.smoke else args.epochs,
        limit_train_batches=2 if args.smoke else None,
        limit_val_batches=1 if args.smoke else None,
        callbacks=[L1Callback(0.02, proximal=True), monitor],
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=not args.smoke,
        enable_model_summary=not args.smoke,
    )
    trainer.fit(model, DemoDataModule("digits", train_size=300))
    result = {
        "sparsity": monitor.last_metrics["reg/monitor/sparsity"],
        "ece": float(trainer.callback_metrics["reg/monitor/ece"]),
        "gap_acc": float(trainer.callback_metrics["reg/monitor/gap/acc"]),
    }
    if args.logger == "wandb":
        logger.experiment.finish()
    print(result, "logs in", save_dir)
    return result


if __name__ == "__main__":
    main()
