"""The compatibility matrix: every technique, one tiny model, one way to build each run.

Shared by ``tests/test_matrix.py`` (CPU: DDP, bf16, accumulation, clipping, manual
optimization, mid-epoch resume, LightningCLI, torch.compile) and ``scripts/gpu_check.py``
(CUDA: 16-mixed, bf16-mixed, 2-rank DDP on one GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_reg.jacobian import JacobianPenaltyMixin

NUM_CLASSES = 3
IMAGE = (1, 8, 8)


class MatrixBlock(nn.Module):
    """Shape-preserving residual conv block (a stochastic-depth target)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.bn(self.conv(x)))


class MatrixNet(nn.Module):
    """Conv stem + BN, two residual blocks, dropout, linear head: every technique applies."""

    def __init__(self, width: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(IMAGE[0], width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.blocks = nn.Sequential(MatrixBlock(width), MatrixBlock(width))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.blocks(self.stem(x)).mean(dim=(2, 3))))


class MatrixModule(JacobianPenaltyMixin, pl.LightningModule):
    """Classifier for list batches ``[x, y]`` (y: labels or soft targets).

    ``jacobian_weight > 0`` adds the Jacobian penalty; ``manual=True`` uses manual optimization
    with two optimizers (body and head).
    """

    def __init__(
        self,
        lr: float = 0.05,
        jacobian_weight: float = 0.0,
        manual: bool = False,
        dropout: float = 0.1,
        jacobian_projections: int | str = 1,
    ) -> None:
        super().__init__()
        self.model = MatrixNet(dropout=dropout)
        self.jacobian_projections = jacobian_projections
        self.lr = lr
        self.jacobian_weight = jacobian_weight
        self.manual = manual
        self.automatic_optimization = not manual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch[0], batch[1]
        if self.jacobian_weight > 0:
            x = self.jacobian_inputs(x)
        logits = self(x)
        loss = F.cross_entropy(logits.float(), y)
        if self.jacobian_weight > 0:
            loss = loss + self.jacobian_penalty(x, logits)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        loss = self._loss(batch)
        self.log("train_loss", loss)
        if not self.manual:
            return loss
        opts = self.optimizers()
        for opt in opts:
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in opts:
            opt.step()
        return None

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        self.log("val_loss", F.cross_entropy(self(x).float(), y), sync_dist=True)

    def configure_optimizers(self) -> Any:
        if not self.manual:
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        head = list(self.model.head.parameters())
        body = [p for n, p in self.model.named_parameters() if not n.startswith("head.")]
        return torch.optim.SGD(body, lr=self.lr), torch.optim.Adam(head, lr=self.lr / 10)


class ResumableLoader:
    """A deterministic list of batches that remembers where it is (Lightning's stateful
    dataloader protocol), so a mid-epoch checkpoint resumes at the next batch.

    Only the first live iterator counts the position: a nested pass over the same loader
    (``PreciseBatchNormCallback`` reads the training loader) starts from the beginning and
    leaves the position alone.
    """

    def __init__(self, batches: list[list[torch.Tensor]]) -> None:
        self.batches = batches
        self.position = 0
        self._resume_at = 0
        self._counting = False

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        start, self._resume_at = self._resume_at, 0
        counting = not self._counting
        if counting:
            self._counting = True
            self.position = start
        for i in range(start, len(self.batches)):
            if counting:
                self.position = i + 1
            yield [t.clone() for t in self.batches[i]]
        if counting:
            self._counting = False
            self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_at = int(state["position"])


def make_batches(n_batches: int = 6, batch_size: int = 8, seed: int = 0) -> list[list[Any]]:
    g = torch.Generator().manual_seed(seed)
    return [
        [
            torch.randn(batch_size, *IMAGE, generator=g),
            torch.randint(0, NUM_CLASSES, (batch_size,), generator=g),
        ]
        for _ in range(n_batches)
    ]


def make_loader(n_batches: int = 6, batch_size: int = 8, seed: int = 0) -> ResumableLoader:
    """A resumable loader of ``make_batches`` (a bare list would read as several loaders)."""
    return ResumableLoader(make_batches(n_batches, batch_size, seed))


@dataclass(frozen=True)
class Technique:
    """One row of the matrix."""

    name: str
    callbacks: Callable[[], list[Callback]]
    log_keys: tuple[str, ...]
    jacobian_weight: float = 0.0
    needs_val: bool = False
    yaml: tuple[dict[str, Any], ...] = field(default=())


def _stochastic_depth() -> list[Callback]:
    from lightning_reg.stochastic_depth import StochasticDepthCallback

    return [StochasticDepthCallback(0.5, block_types=(MatrixBlock,), seed=0)]


def _techniques() -> list[Technique]:
    from lightning_reg.augmentation import DataAugmentationCallback, GaussianNoise
    from lightning_reg.dropout import DropoutCallback
    from lightning_reg.early_stopping import EarlyStoppingCallback
    from lightning_reg.ghost_batch_norm import GhostBatchNormCallback
    from lightning_reg.label_smoothing import LabelSmoothingCallback
    from lightning_reg.max_norm import MaxNormCallback
    from lightning_reg.mixing import CutMixCallback, MixUpCallback
    from lightning_reg.monitor import RegularizationMonitorCallback
    from lightning_reg.penalties import ElasticNetCallback, L1Callback, L2Callback
    from lightning_reg.precise_batch_norm import PreciseBatchNormCallback

    def cp(path: str, **init_args: Any) -> dict[str, Any]:
        return {"class_path": f"lightning_reg.{path}", "init_args": init_args}

    return [
        Technique(
            "l2",
            lambda: [L2Callback(1e-2)],
            ("reg/l2/penalty",),
            yaml=(cp("penalties.L2Callback", strength=1e-2),),
        ),
        Technique(
            "l2_decoupled",
            lambda: [L2Callback(1e-2, decoupled=True)],
            ("reg/l2/penalty",),
            yaml=(cp("penalties.L2Callback", strength=1e-2, decoupled=True),),
        ),
        Technique(
            "l1_proximal",
            lambda: [L1Callback(1e-2, proximal=True)],
            ("reg/l1/penalty", "reg/l1/zero_fraction"),
            yaml=(cp("penalties.L1Callback", strength=1e-2, proximal=True),),
        ),
        Technique(
            "elastic_net",
            lambda: [ElasticNetCallback(1e-3, 1e-2)],
            ("reg/elastic_net/penalty",),
            yaml=(cp("penalties.ElasticNetCallback", l1=1e-3, l2=1e-2),),
        ),
        Technique(
            "max_norm",
            lambda: [MaxNormCallback(0.5)],
            ("reg/max_norm/projected_fraction", "reg/max_norm/max_unit_norm"),
            yaml=(cp("max_norm.MaxNormCallback", max_norm=0.5),),
        ),
        Technique(
            "dropout_schedule",
            lambda: [DropoutCallback(0.2)],
            ("reg/dropout/p",),
            yaml=(cp("dropout.DropoutCallback", p=0.2),),
        ),
        Technique(
            "augmentation",
            lambda: [DataAugmentationCallback(GaussianNoise(0.1), p=0.5, seed=0)],
            ("reg/augmentation/applied_fraction",),
            yaml=(
                cp(
                    "augmentation.DataAugmentationCallback",
                    transform=cp("augmentation.GaussianNoise", std=0.1),
                    p=0.5,
                ),
            ),
        ),
        Technique(
            "mixup",
            lambda: [MixUpCallback(0.4, num_classes=NUM_CLASSES, seed=0)],
            ("reg/mixup/lambda",),
            yaml=(cp("mixing.MixUpCallback", alpha=0.4, num_classes=NUM_CLASSES),),
        ),
        Technique(
            "cutmix",
            lambda: [CutMixCallback(1.0, num_classes=NUM_CLASSES, seed=0)],
            ("reg/cutmix/lambda",),
            yaml=(cp("mixing.CutMixCallback", alpha=1.0, num_classes=NUM_CLASSES),),
        ),
        Technique(
            "label_smoothing",
            lambda: [LabelSmoothingCallback(0.1, num_classes=NUM_CLASSES)],
            ("reg/label_smoothing/alpha",),
            yaml=(cp("label_smoothing.LabelSmoothingCallback", alpha=0.1),),
        ),
        Technique(
            "early_stopping",
            lambda: [EarlyStoppingCallback("val_loss", patience=5)],
            ("reg/early_stopping/wait", "reg/early_stopping/best_score"),
            needs_val=True,
            yaml=(cp("early_stopping.EarlyStoppingCallback", monitor="val_loss", patience=5),),
        ),
        Technique(
            "ghost_batch_norm",
            lambda: [GhostBatchNormCallback(4)],
            ("reg/ghost_bn/num_virtual_batches",),
            yaml=(cp("ghost_batch_norm.GhostBatchNormCallback", virtual_batch_size=4),),
        ),
        Technique(
            "precise_batch_norm",
            lambda: [PreciseBatchNormCallback(2)],
            ("reg/precise_bn/num_batches",),
            needs_val=True,
            yaml=(cp("precise_batch_norm.PreciseBatchNormCallback", num_batches=2),),
        ),
        Technique(
            "stochastic_depth",
            _stochastic_depth,
            ("reg/stochastic_depth/dropped_fraction",),
            yaml=(
                cp(
                    "stochastic_depth.StochasticDepthCallback",
                    survival_prob_last=0.5,
                    block_types=["tests.helpers.matrix.MatrixBlock"],
                ),
            ),
        ),
        Technique("jacobian", lambda: [], ("reg/jacobian/frobenius_sq",), jacobian_weight=0.05),
        Technique(
            "monitor",
            lambda: [RegularizationMonitorCallback(every_n_steps=1, num_classes=NUM_CLASSES)],
            ("reg/monitor/sparsity",),
            needs_val=True,
            yaml=(
                cp(
                    "monitor.RegularizationMonitorCallback",
                    every_n_steps=1,
                    num_classes=NUM_CLASSES,
                ),
            ),
        ),
    ]


TECHNIQUES: list[Technique] = _techniques()
BY_NAME = {t.name: t for t in TECHNIQUES}


class KeyRecorder(Callback):
    """Remembers every metric key that reached ``trainer.callback_metrics`` or the loggers."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def _grab(self, trainer: pl.Trainer) -> None:
        self.keys.update(trainer.callback_metrics.keys())
        self.keys.update(trainer.logged_metrics.keys())
        for logger in trainer.loggers:  # metrics sent to the logger directly (CSVLogger)
            keys = getattr(logger.experiment, "metrics_keys", ())  # a no-op stub off rank 0
            if isinstance(keys, (list, tuple, set)):
                self.keys.update(keys)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._grab(trainer)

    def on_validation_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._grab(trainer)

    def on_train_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._grab(trainer)


def build_run(
    technique: Technique,
    *,
    seed: int = 0,
    manual: bool = False,
    deterministic_model: bool = False,
    **trainer_kwargs: Any,
) -> tuple[MatrixModule, pl.Trainer, KeyRecorder]:
    """The module, a quiet Trainer with the technique's callbacks, and a key recorder.

    ``deterministic_model`` removes the model's own randomness (its dropout, random Jacobian
    projections), so only the callbacks' own draws remain, as a resume test needs.
    """
    pl.seed_everything(seed, verbose=False)
    module = MatrixModule(
        jacobian_weight=technique.jacobian_weight,
        manual=manual,
        dropout=0.0 if deterministic_model else 0.1,
        jacobian_projections="exact" if deterministic_model else 1,
    )
    recorder = KeyRecorder()
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        limit_val_batches=2,
    )
    if technique.needs_val:
        kwargs["val_check_interval"] = 2
    kwargs.update(trainer_kwargs)
    kwargs["callbacks"] = [*technique.callbacks(), recorder, *kwargs.get("callbacks", [])]
    if kwargs.get("logger") is False:
        import tempfile

        from lightning.pytorch.loggers import CSVLogger

        kwargs["logger"] = CSVLogger(tempfile.mkdtemp(prefix="matrix_"))
    return module, pl.Trainer(**kwargs), recorder


def state_hash(module: nn.Module, *, buffers: bool = True) -> str:
    """Hash of parameters (and buffers), to compare runs and DDP replicas.

    DDP replicas share parameters but not BatchNorm running statistics: DDP broadcasts rank 0's
    buffers before each forward, and the last forward updates them with each rank's own batch
    (``SyncBatchNorm`` or ``PreciseBatchNormCallback`` make them agree). Compare replicas with
    ``buffers=False``.
    """
    import hashlib

    h = hashlib.sha256()
    tensors = module.state_dict() if buffers else dict(module.named_parameters())
    for name, tensor in sorted(tensors.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()
