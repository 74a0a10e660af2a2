"""The demo networks and the LightningModule that trains them.

``MLP``: the plain ReLU MLP of the MNIST-1D paper (40-100-100-10), no normalisation, the
default network of the main job: it overfits MNIST-1D. ``ResidualCNN1d``: a small 1-D residual
CNN with BatchNorm for MNIST-1D (``--model cnn``, the architectural prior). ``ResidualCNN``: a
compact pre-activation ResNet for 8×8 images. ``ResidualMLP``: the same idea for tabular data.
Every residual block is a :class:`ResidualBlock` computing ``x + branch(x)``, shape-preserving by
construction, so stochastic depth, ghost BN and precise BN have something to act on.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from lightning_reg import JacobianPenaltyMixin
from lightning_reg.core.compat import attached_trainer

__all__ = [
    "MLP",
    "DemoClassifier",
    "JacobianDemoClassifier",
    "ResidualBlock",
    "ResidualCNN",
    "ResidualCNN1d",
    "ResidualMLP",
    "build_model",
    "jacobian_classifier",
]


class ResidualBlock(nn.Module):
    """Pre-activation residual block ``x + branch(x)``; ``branch`` is BN-ReLU-layer twice.

    Args:
        width: channels (``conv=True``) or features.
        conv: 3×3 convolutions if True, linear layers otherwise.
        ndim: spatial dimensions of the convolutions (1 or 2).
    """

    def __init__(self, width: int, *, conv: bool = True, ndim: int = 2) -> None:
        super().__init__()
        if conv and ndim == 1:
            norm: type[nn.Module] = nn.BatchNorm1d
            layer = lambda: nn.Conv1d(width, width, 3, padding=1, bias=False)  # noqa: E731
        elif conv:
            norm = nn.BatchNorm2d
            layer = lambda: nn.Conv2d(width, width, 3, padding=1, bias=False)  # noqa: E731
        else:
            norm = nn.BatchNorm1d
            layer = lambda: nn.Linear(width, width, bias=False)  # noqa: E731
        self.branch = nn.Sequential(
            norm(width), nn.ReLU(), layer(), norm(width), nn.ReLU(), layer()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class ResidualCNN(nn.Module):
    """Stem conv, ``depth`` blocks at 8×8, a stride-2 conv, ``depth`` blocks at 4×4, a head.

    Args:
        in_channels: input channels.
        num_classes: output classes.
        width: channels of the first stage (the second has ``2 * width``).
        depth: residual blocks per stage.
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: int = 16, depth: int = 2
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.stage1 = nn.Sequential(*[ResidualBlock(width) for _ in range(depth)])
        self.down = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
        )
        self.stage2 = nn.Sequential(*[ResidualBlock(2 * width) for _ in range(depth)])
        self.pool = nn.Sequential(nn.BatchNorm2d(2 * width), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.stage2(self.down(self.stage1(self.stem(x))))))


class ResidualMLP(nn.Module):
    """Linear stem, ``depth`` residual blocks with BatchNorm1d, BN-ReLU, linear head."""

    def __init__(
        self, in_features: int = 30, num_classes: int = 2, width: int = 64, depth: int = 3
    ) -> None:
        super().__init__()
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.Sequential(*[ResidualBlock(width, conv=False) for _ in range(depth)])
        self.head = nn.Sequential(nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class MLP(nn.Module):
    """The plain ReLU MLP of MNIST-1D: flatten, ``in-100-100-out`` (no normalisation)."""

    def __init__(self, in_features: int = 40, num_classes: int = 10, width: int = 100) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResidualCNN1d(nn.Module):
    """1-D residual CNN for signals ``(B, L)`` or ``(B, C, L)``: stem, blocks, pool, head."""

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: int = 32, depth: int = 2
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.stem = nn.Conv1d(in_channels, width, 5, stride=2, padding=2, bias=False)
        self.blocks = nn.Sequential(*[ResidualBlock(width, ndim=1) for _ in range(depth)])
        self.pool = nn.Sequential(nn.BatchNorm1d(width), nn.ReLU(), nn.AdaptiveAvgPool1d(4))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            x = x.unsqueeze(1)
        return self.head(self.pool(self.blocks(self.stem(x))))


def build_model(
    kind: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: int | None = None,
    arch: str = "auto",
) -> nn.Module:
    """The demo network for ``kind`` and ``arch``.

    ``arch="auto"``: ``"sequence"`` → :class:`MLP`, ``"image"`` → :class:`ResidualCNN`,
    ``"tabular"`` → :class:`ResidualMLP`. ``"mlp"`` is always the plain :class:`MLP`; ``"cnn"``
    is :class:`ResidualCNN1d` for sequences and :class:`ResidualCNN` for images.

    Raises:
        ValueError: for another kind or arch, or ``"cnn"`` on tabular data.
    """
    if kind not in ("sequence", "image", "tabular"):
        raise ValueError(f"`kind` must be one of 'sequence', 'image', 'tabular'; got {kind!r}")
    if arch not in ("auto", "mlp", "cnn"):
        raise ValueError(f"`arch` must be one of 'auto', 'mlp', 'cnn'; got {arch!r}")
    if arch == "mlp" or (arch == "auto" and kind == "sequence"):
        return MLP(math.prod(input_shape), num_classes, width=width or 100)
    if kind == "sequence":
        channels = input_shape[0] if len(input_shape) == 2 else 1
        return ResidualCNN1d(channels, num_classes, width=width or 16)
    if kind == "image":
        return ResidualCNN(input_shape[0], num_classes, width=width or 16)
    if arch == "cnn":
        raise ValueError("`arch` 'cnn' needs image or sequence data, got tabular")
    return ResidualMLP(input_shape[0], num_classes, width=width or 64)


class DemoClassifier(pl.LightningModule):
    """Cross-entropy classifier for list batches ``[x, y]``; ``y`` may be soft targets.

    Logs ``train_loss`` (step and epoch), ``train_acc`` (epoch), ``val_loss`` and ``val_acc``.
    Subclasses (mixins) add loss terms by overriding :meth:`extra_loss`; with
    ``needs_input_grad = True`` the inputs get ``requires_grad`` first.

    Args:
        kind: ``"sequence"``, ``"image"`` or ``"tabular"`` (which network to build).
        input_shape: shape of one input, e.g. ``[40]``, ``[1, 8, 8]`` or ``[30]``.
        num_classes: number of classes.
        width: network width (``None``: the default of each network).
        lr: learning rate.
        optimizer: ``"adam"`` or ``"sgd"`` (SGD with Nesterov momentum 0.9).
        cosine: anneal the learning rate to 0 over ``Trainer(max_epochs)`` (cosine, per epoch).
        arch: ``"auto"``, ``"mlp"`` or ``"cnn"`` (see :func:`build_model`).

    Raises:
        ValueError: for an unknown ``kind``, ``arch`` or ``optimizer``, or a non-positive ``lr``.

    Example:
        >>> module = DemoClassifier("image", [1, 8, 8], 10)
        >>> module(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    needs_input_grad: bool = False

    def __init__(
        self,
        kind: str = "image",
        input_shape: list[int] | tuple[int, ...] = (1, 8, 8),
        num_classes: int = 10,
        width: int | None = None,
        lr: float = 3e-3,
        optimizer: str = "adam",
        cosine: bool = True,
        arch: str = "auto",
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"`lr` must be in (0, inf), got {lr!r}")
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"`optimizer` must be one of 'adam', 'sgd'; got {optimizer!r}")
        self.optimizer_name = optimizer
        self.cosine = cosine
        self.model = build_model(kind, tuple(input_shape), num_classes, width=width, arch=arch)
        self.lr = lr
        self.num_classes = num_classes
        self._val_sums: list[torch.Tensor] = []
        #: per validation epoch: a tensor ``[n, correct, nll_sum]`` (kept on device, no sync).
        self.val_history: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def extra_loss(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        """A term added to the training loss (``None``: nothing). Mixins override it."""
        return None

    @staticmethod
    def _hard(y: torch.Tensor) -> torch.Tensor:
        return y.argmax(dim=1) if y.is_floating_point() and y.ndim == 2 else y

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        if self.needs_input_grad:
            x = x.detach().requires_grad_(True)
        logits = self(x)
        loss = F.cross_entropy(logits.float(), y.float() if y.is_floating_point() else y)
        extra = self.extra_loss(x, logits)
        if extra is not None:
            loss = loss + extra
        acc = (logits.detach().argmax(dim=1) == self._hard(y)).float().mean()
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log("train_acc", acc, on_step=False, on_epoch=True)
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        logits = self(x).float()
        nll = F.cross_entropy(logits, y, reduction="sum")
        correct = (logits.argmax(dim=1) == y).sum()
        n = torch.tensor(float(y.shape[0]), device=logits.device)
        self._val_sums.append(torch.stack([n, correct.float(), nll.detach()]))
        self.log("val_loss", nll / y.shape[0], batch_size=y.shape[0])
        self.log("val_acc", correct.float() / y.shape[0], batch_size=y.shape[0])

    @override
    def on_validation_epoch_end(self) -> None:
        if self._val_sums and not self.trainer.sanity_checking:
            self.val_history.append(torch.stack(self._val_sums).sum(dim=0))
        self._val_sums = []

    @override
    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                self.parameters(), lr=self.lr, momentum=0.9, nesterov=True
            )
        else:
            opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        trainer = attached_trainer(self)
        epochs = getattr(trainer, "max_epochs", None) if trainer is not None else None
        if not self.cosine or not epochs or epochs < 1:
            return opt
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}


class JacobianDemoClassifier(JacobianPenaltyMixin, DemoClassifier):
    """DemoClassifier + ``jacobian_weight · ‖∂f/∂x‖_F²`` in the training loss."""

    needs_input_grad = True

    def extra_loss(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self.jacobian_penalty(x, logits)


def jacobian_classifier() -> type[DemoClassifier]:
    """:class:`JacobianDemoClassifier` (kept for callers of the old lazy factory)."""
    return JacobianDemoClassifier
