"""Label-smoothing callback overhead per training step on a small CNN (goal ≤ 1.1×).

Compares one SGD step with the callback's target rewrite (``smooth_labels`` to soft targets,
then ``F.cross_entropy(logits, soft)``) against the plain step with hard labels, and against
torch's built-in ``F.cross_entropy(..., label_smoothing=α)`` (the algorithm other libraries
use), in the same process, interleaved.

Run: ``python -m benchmarks.bench_label_smoothing``
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import Row, format_table, interleaved_ms
from lightning_reg.label_smoothing import LabelSmoothingCallback


def _small_cnn(classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, classes),
    )


def step_fns(batch: int = 64, classes: int = 10, device: str = "cpu") -> dict[str, object]:
    torch.manual_seed(0)
    model = _small_cnn(classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    cb = LabelSmoothingCallback(0.1, num_classes=classes)

    def step(targets: torch.Tensor, **kw: float) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), targets, **kw).backward()
        opt.step()

    return {
        "plain": lambda: step(y),
        "torch_label_smoothing": lambda: step(y, label_smoothing=0.1),
        "callback": lambda: step(cb.smooth(y)),
    }


def run(quick: bool = False) -> list[Row]:
    ms = interleaved_ms(step_fns(), repeats=5 if quick else 40, warmup=2 if quick else 5)
    name = "train step 64x3x32x32 small CNN"
    return [
        Row(
            name,
            "LabelSmoothingCallback rewrite + step",
            "plain step",
            ms["callback"],
            ms["plain"],
            kind="overhead",
            target="<= 1.1x",
        ),
        Row(
            name,
            "LabelSmoothingCallback rewrite + step",
            "F.cross_entropy(label_smoothing)",
            ms["callback"],
            ms["torch_label_smoothing"],
            kind="overhead",
            target="<= 1.1x",
        ),
    ]


if __name__ == "__main__":
    print(format_table(run()))
