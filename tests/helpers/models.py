"""A tiny model zoo and a generic classifier LightningModule for tests."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_reg.jacobian import JacobianPenaltyMixin


class MLP(nn.Sequential):
    """Linear-ReLU stack: ``in_features -> hidden... -> num_classes``."""

    def __init__(self, in_features: int = 8, hidden: tuple[int, ...] = (16,), num_classes: int = 3):
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class SmallCNN(nn.Module):
    """Conv-BN-ReLU x2, global pool, linear head. Input ``(B, C, H, W)``."""

    def __init__(self, in_channels: int = 1, num_classes: int = 3, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class ResidualBlock(nn.Module):
    """``x + f(x)``: a shape-preserving residual MLP block."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(x)))


class ResidualMLP(nn.Module):
    """Stem, ``depth`` residual blocks, head."""

    def __init__(self, in_features: int = 8, width: int = 16, depth: int = 4, num_classes: int = 3):
        super().__init__()
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.Sequential(*[ResidualBlock(width) for _ in range(depth)])
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class ListDataset(Dataset):
    """Yields ``[x, y]`` lists so batches collate to lists (mutable in place)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        return [self.x[i], self.y[i]]


def random_classification(
    n: int = 64, in_features: int = 8, num_classes: int = 3, seed: int = 0, image: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1, 6, 6) if image else (n, in_features)
    x = torch.randn(*shape, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return x, y


def list_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 16) -> DataLoader:
    return DataLoader(ListDataset(x, y), batch_size=batch_size, shuffle=False)


class ClassifierModule(pl.LightningModule):
    """Cross-entropy classifier around any model; list or dict batches; logs train/val loss.

    Args:
        model: the network.
        lr: learning rate.
        optimizer: ``"sgd"``, ``"sgd_momentum"``, ``"adam"`` or ``"adamw"``.
        weight_decay: passed to the torch optimizer (for reference runs).
        extra_loss: optional ``fn(module) -> Tensor`` added to the loss (reference penalties).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        lr: float = 0.1,
        optimizer: str = "sgd",
        weight_decay: float = 0.0,
        extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
    ):
        super().__init__()
        self.model = model if model is not None else MLP()
        self.lr = lr
        self.optimizer_name = optimizer
        self.weight_decay = weight_decay
        self.extra_loss = extra_loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @staticmethod
    def _unpack(batch):
        if isinstance(batch, dict):
            return batch["x"], batch["y"]
        return batch[0], batch[1]

    def training_step(self, batch, batch_idx):
        x, y = self._unpack(batch)
        logits = self(x)
        loss = F.cross_entropy(logits.float(), y)
        if self.extra_loss is not None:
            loss = loss + self.extra_loss(self.model)
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = self._unpack(batch)
        loss = F.cross_entropy(self(x).float(), y)
        self.log("val_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self):
        params = self.parameters()
        name = self.optimizer_name
        if name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, weight_decay=self.weight_decay)
        if name == "sgd_momentum":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        if name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        raise ValueError(name)


def tiny_trainer(**kwargs) -> pl.Trainer:
    """A quiet CPU Trainer: no checkpointing, no progress bar, no logger unless given."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def param_hash(module: nn.Module) -> str:
    """A hash of every parameter and buffer, to compare replicas across ranks."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


class JacobianClassifier(JacobianPenaltyMixin, ClassifierModule):
    """``ClassifierModule`` whose training loss is ``CE + jacobian_weight·‖J‖_F²``."""

    def __init__(self, jacobian_weight: float = 0.01, projections: int | str = 1, **kwargs):
        super().__init__(**kwargs)
        self.jacobian_weight = jacobian_weight
        self.jacobian_projections = projections
        self.seen_batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        x, y = self._unpack(batch)
        self.seen_batches.append((x.detach().clone(), y.clone()))
        x = self.jacobian_inputs(x)
        logits = self(x)
        loss = F.cross_entropy(logits.float(), y)
        self.log("train_loss", loss)
        return loss + self.jacobian_penalty(x, logits)
