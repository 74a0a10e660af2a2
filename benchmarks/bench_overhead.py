"""Each callback's overhead per training step on a common small CNN, inside a real Trainer.

A plain ``Trainer.fit`` of a small CNN (batch 64×3×32×32, SGD) against the same fit with one
callback, measured interleaved in one process (medians of several fits, each callback's fit
right after a plain one). The ratio includes Lightning's own per-step work, as a user sees it.
Targets: <= 1.05x for penalties, constraints and the monitor; <= 1.1x for MixUp and label
smoothing.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from benchmarks.common import Row, format_table


class SmallCNN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, 10),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _configs() -> dict[str, Callable[[], list[Callback]]]:
    from lightning_reg import (
        ElasticNetCallback,
        L1Callback,
        L2Callback,
        LabelSmoothingCallback,
        MaxNormCallback,
        MixUpCallback,
        RegularizationMonitorCallback,
        WeightConstraintCallback,
    )

    return {
        "L2Callback": lambda: [L2Callback(5e-4)],
        "L2Callback(decoupled)": lambda: [L2Callback(5e-4, decoupled=True)],
        "L1Callback(proximal)": lambda: [L1Callback(1e-4, proximal=True)],
        "ElasticNetCallback": lambda: [ElasticNetCallback(1e-5, 5e-4)],
        "MaxNormCallback": lambda: [MaxNormCallback(3.0)],
        "WeightConstraintCallback(non_neg)": lambda: [WeightConstraintCallback("non_neg")],
        "RegularizationMonitorCallback": lambda: [RegularizationMonitorCallback()],
        "MixUpCallback": lambda: [MixUpCallback(0.2, num_classes=10)],
        "LabelSmoothingCallback": lambda: [LabelSmoothingCallback(0.1, num_classes=10)],
    }


TARGETS = {"MixUpCallback": "<= 1.1x", "LabelSmoothingCallback": "<= 1.1x"}


def run(quick: bool = False) -> list[Row]:
    warnings.filterwarnings("ignore")
    steps = 10 if quick else 30
    repeats = 2 if quick else 3
    g = torch.Generator().manual_seed(0)
    batches = [
        [torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)]
        for _ in range(steps)
    ]
    logdir = tempfile.mkdtemp(prefix="bench_overhead_")

    def fit(callbacks: list[Callback]) -> float:
        torch.manual_seed(0)
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=steps,
            logger=CSVLogger(logdir),
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        module = SmallCNN()
        start = time.perf_counter()
        trainer.fit(module, _Loader(batches))
        return (time.perf_counter() - start) * 1e3 / steps

    configs = _configs()
    fit([])  # warm-up
    # Each callback's fit is paired with a plain fit just before it: a machine that drifts over
    # the minutes of a repeat then moves both sides of a ratio (one shared plain sample per
    # repeat gave every row 0.73-0.86x in one run and 1.10-1.26x in another).
    samples: dict[str, list[float]] = {name: [] for name in configs}
    plain: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, make in configs.items():
            plain[name].append(fit([]))
            samples[name].append(fit(make()))
    return [
        Row(
            f"overhead/step, small CNN: {name}",
            name,
            "Trainer without it",
            statistics.median(samples[name]),
            statistics.median(plain[name]),
            kind="overhead",
            target=TARGETS.get(name, "<= 1.05x"),
        )
        for name in configs
    ]


class _Loader:
    """A re-iterable list of list batches (mutable in place, as batch callbacks need)."""

    def __init__(self, batches: list[list[torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter([[t.clone() for t in b] for b in self.batches])


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(format_table(run()))
