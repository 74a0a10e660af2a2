"""The demo networks and the LightningModule that trains them.

``ResidualCNN``: a compact pre-activation ResNet for 8×8 images (two stages of residual blocks,
BatchNorm everywhere), so stochastic depth, ghost BN, dropout and the Jacobian penalty all have
something to act on. ``ResidualMLP``: the same idea for tabular data. Every residual block is a
:class:`ResidualBlock` computing ``x + branch(x)``, shape-preserving by construction.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

__all__ = [
    "DemoClassifier",
    "ResidualBlock",
    "ResidualCNN",
    "ResidualMLP",
    "build_model",
    "jacobian_classifier",
]


class ResidualBlock(nn.Module):
    """Pre-activation residual block ``x + branch(x)``; ``branch`` is BN-ReLU-layer twice.

    Args:
        width: channels (``conv=True``) or features.
        conv: 3×3 convolutions if True, linear layers otherwise.
    """

    def __init__(self, width: int, *, conv: bool = True) -> None:
        super().__init__()
        if conv:
            norm: type[nn.Module] = nn.BatchNorm2d
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


def build_model(
    kind: str, input_shape: tuple[int, ...], num_classes: int, *, width: int | None = None
) -> nn.Module:
    """The demo network for ``kind`` ``"image"`` (ResidualCNN) or ``"tabular"`` (ResidualMLP).

    Raises:
        ValueError: for another kind.
    """
    if kind == "image":
        return ResidualCNN(input_shape[0], num_classes, width=width or 16)
    if kind == "tabular":
        return ResidualMLP(input_shape[0], num_classes, width=width or 64)
    raise ValueError(f"`kind` must be one of 'image', 'tabular'; got {kind!r}")


class DemoClassifier(pl.LightningModule):
    """Cross-entropy classifier for list batches ``[x, y]``; ``y`` may be soft targets.

    Logs ``train_loss`` (step and epoch), ``train_acc`` (epoch), ``val_loss`` and ``val_acc``.
    Subclasses (mixins) add loss terms by overriding :meth:`extra_loss`; with
    ``needs_input_grad = True`` the inputs get ``requires_grad`` first.

    Args:
        kind: ``"image"`` or ``"tabular"`` (which network to build).
        input_shape: shape of one input, e.g. ``[1, 8, 8]`` or ``[30]``.
        num_classes: number of classes.
        width: network width (``None``: the default of each network).
        lr: learning rate.
        optimizer: ``"adam"`` or ``"sgd"`` (SGD with Nesterov momentum 0.9).
        cosine: anneal the learning rate to 0 over ``Trainer(max_epochs)`` (cosine, per epoch).

    Raises:
        ValueError: for an unknown ``kind`` or ``optimizer``, or a non-positive ``lr``.

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
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"`lr` must be in (0, inf), got {lr!r}")
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"`optimizer` must be one of 'adam', 'sgd'; got {optimizer!r}")
        self.optimizer_name = optimizer
        self.cosine = cosine
        self.model = build_model(kind, tuple(input_shape), num_classes, width=width)
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
        epochs = getattr(self.trainer, "max_epochs", None) if self._trainer else None
        if not self.cosine or not epochs or epochs < 1:
            return opt
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}


_JACOBIAN_CLASSIFIER: type[DemoClassifier] | None = None


def jacobian_classifier() -> type[DemoClassifier]:
    """``DemoClassifier`` with :class:`~lightning_reg.jacobian.JacobianPenaltyMixin` (lazy)."""
    global _JACOBIAN_CLASSIFIER
    if _JACOBIAN_CLASSIFIER is None:
        from lightning_reg.jacobian import JacobianPenaltyMixin

        class JacobianDemoClassifier(JacobianPenaltyMixin, DemoClassifier):
            """DemoClassifier + ``jacobian_weight · ‖∂f/∂x‖_F²`` in the training loss."""

            needs_input_grad = True

            def extra_loss(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
                return self.jacobian_penalty(x, logits)

        _JACOBIAN_CLASSIFIER = JacobianDemoClassifier
    return _JACOBIAN_CLASSIFIER
