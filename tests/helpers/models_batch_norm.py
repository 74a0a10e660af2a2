"""Models with BatchNorm for the ghost / precise batch-norm tests and DDP scenarios."""

from __future__ import annotations

import torch
from torch import nn


def bn_mlp() -> nn.Sequential:
    """Linear-BN-ReLU-Linear on 8 features, 3 classes."""
    return nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


class TinyResNet(nn.Module):
    """A torchvision-style residual CNN: a stem and two ``BasicBlock`` (BatchNorm inside)."""

    def __init__(self, width: int = 8, num_classes: int = 3) -> None:
        from torchvision.models.resnet import BasicBlock

        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width))
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer1(torch.relu(self.stem(x))).mean(dim=(2, 3)))


class WithAuxiliaryHead(nn.Module):
    """``bn_mlp`` plus an auxiliary head with its own BatchNorm that ``forward`` never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.body = bn_mlp()
        self.aux = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
