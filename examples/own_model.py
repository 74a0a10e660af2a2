"""Your own LightningModule and LightningDataModule, ablated by ``lightning-reg ablate --config``.

    lightning-reg ablate --config examples/configs/ablate_own_model.yaml --monitor val_acc
    python examples/own_model.py --smoke        # one plain fit of the same model

Nothing here knows about ``lightning_reg``: the command adds each technique's callbacks or
surgery to fresh instances built from the YAML (the same file that
``LightningCLI(TinyClassifier, TinyDataModule).fit --config`` accepts). Techniques that need the
model's cooperation are reported as skipped: the Jacobian penalty (no ``JacobianPenaltyMixin``),
ghost/precise BN (no BatchNorm), stochastic depth (no residual block), CutMix (no image inputs).
The loss is ``F.cross_entropy``, which accepts soft targets, so MixUp and label smoothing run.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyDataModule(pl.LightningDataModule):
    """Gaussian blobs in ``features`` dimensions, ``num_classes`` classes, label noise.

    Args:
        n_train: training samples.
        n_val: validation samples.
        features: input dimensions.
        num_classes: classes.
        batch_size: training batch size.
        seed: seed of the generated data (fixed across the ablation's seeds).
    """

    def __init__(
        self,
        n_train: int = 256,
        n_val: int = 256,
        features: int = 16,
        num_classes: int = 4,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        gen = torch.Generator().manual_seed(h.seed)
        centers = torch.randn(h.num_classes, h.features, generator=gen)
        n = h.n_train + h.n_val
        y = torch.randint(0, h.num_classes, (n,), generator=gen)
        x = centers[y] + 1.5 * torch.randn(n, h.features, generator=gen)
        flip = torch.rand(n, generator=gen) < 0.1
        y = torch.where(flip, torch.randint(0, h.num_classes, (n,), generator=gen), y)
        self.train_set = TensorDataset(x[: h.n_train], y[: h.n_train])
        self.val_set = TensorDataset(x[h.n_train :], y[h.n_train :])

    def train_dataloader(self) -> DataLoader:
        # Lists, not tuples: batch-rewriting callbacks (MixUp, label smoothing) edit them in place.
        return DataLoader(
            self.train_set, batch_size=self.hparams.batch_size, shuffle=True, collate_fn=_lists
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=1024, collate_fn=_lists)


def _lists(items: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    xs, ys = zip(*items)
    return [torch.stack(xs), torch.stack(ys)]


class TinyClassifier(pl.LightningModule):
    """A ReLU MLP trained with cross-entropy (soft targets accepted); logs loss and accuracy.

    Args:
        features: input dimensions.
        num_classes: classes.
        hidden: hidden width.
        lr: Adam learning rate.
    """

    def __init__(
        self, features: int = 16, num_classes: int = 4, hidden: int = 64, lr: float = 1e-2
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = F.cross_entropy(logits, y)  # y: class indices, or (B, K) soft targets
        hard = y.argmax(dim=1) if y.is_floating_point() else y
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        self.log("train_acc", (logits.argmax(dim=1) == hard).float().mean(), on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(dim=1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2 epochs, for tests")
    args = parser.parse_args(argv)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_epochs=2 if args.smoke else 30,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TinyClassifier(), TinyDataModule())
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


if __name__ == "__main__":
    print(main())
