"""Jacobian regularization: add ``λ·‖∂f(x)/∂x‖_F²`` (random-projection estimate) to the loss.

A callback cannot change the loss, so this is a LightningModule mixin: make the inputs require
grad before the forward pass, then add ``self.jacobian_penalty(x, logits)``.

    python examples/jacobian.py [--weight 0.01] [--smoke]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from lightning_reg.demo.data import DemoDataModule
from lightning_reg.demo.model import ResidualCNN
from lightning_reg.jacobian import JacobianPenaltyMixin


class RobustClassifier(JacobianPenaltyMixin, pl.LightningModule):
    def __init__(self, jacobian_weight: float = 0.01, lr: float = 0.05) -> None:
        super().__init__()
        self.model = ResidualCNN(1, 10)
        self.jacobian_weight = jacobian_weight
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = self.jacobian_inputs(x)  # x.detach().requires_grad_(True)
        logits = self(x)
        loss = F.cross_entropy(logits, y) + self.jacobian_penalty(x, logits)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        noisy = x + 0.5 * torch.randn_like(x)
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())
        self.log("val_noisy_acc", (self(noisy).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, nesterov=True)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weight", type=float, default=0.01)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="1 epoch of 2 batches")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    model = RobustClassifier(args.weight)
    trainer = pl.Trainer(
        max_epochs=1 if args.smoke else args.epochs,
        limit_train_batches=2 if args.smoke else None,
        limit_val_batches=1 if args.smoke else None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not args.smoke,
        enable_model_summary=not args.smoke,
    )
    trainer.fit(model, DemoDataModule("digits", train_size=300))
    result = {k: float(trainer.callback_metrics[k]) for k in ("val_acc", "val_noisy_acc")}
    print(result)
    return result


if __name__ == "__main__":
    main()
