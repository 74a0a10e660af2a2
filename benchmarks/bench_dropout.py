"""MC dropout: one batched ``mc_predict`` vs ``n`` sequential stochastic forward passes.

Anchor: the usual MC-dropout loop (Gal & Ghahramani's reference code, and most tutorials):
``for _ in range(n): outs.append(model(x))`` with dropout on, then mean/std over the samples.
Ours repeats the input ``n`` times along the batch and runs one forward per memory chunk
(:func:`lightning_reg.dropout.mc_dropout_predict`). Same model, same input, same process.
Goal: >= 2x with 30 samples on a small batch.

Run: ``python -m benchmarks.bench_dropout``
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.common import Row, format_table, interleaved_ms
from lightning_reg.dropout import mc_dropout_mode, mc_dropout_predict


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(128, 256), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(256, 256), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(256, 10),
    )  # fmt: skip


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout2d(0.1),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Dropout2d(0.1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


def sequential_mc(model: nn.Module, x: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """The baseline: ``n`` separate stochastic passes, then the same statistics as ours."""
    with torch.no_grad(), mc_dropout_mode(model):
        probs = torch.stack([model(x).softmax(-1) for _ in range(n)])
    std, mean = torch.std_mean(probs, dim=0)
    entropy = -torch.special.xlogy(mean, mean).sum(-1)
    mutual_info = entropy + torch.special.xlogy(probs, probs).sum(-1).mean(0)
    return mean, std, entropy, mutual_info


def run(quick: bool = False) -> list[Row]:
    """Timed on one thread: on a shared, oversubscribed CPU, OpenMP spinning distorts both."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool) -> list[Row]:
    torch.manual_seed(0)
    n = 30
    repeats = 3 if quick else 10
    rows = []
    cases = [
        ("MLP 128-256-256-10, B=8", _mlp(), torch.randn(8, 128)),
        ("CNN 3x16x16, B=4", _cnn(), torch.randn(4, 3, 16, 16)),
    ]
    for name, model, x in cases:
        model.eval()
        times = interleaved_ms(
            {
                "ours": lambda m=model, x=x: mc_dropout_predict(m, x, n, classifier=True),
                "seq": lambda m=model, x=x: sequential_mc(m, x, n),
            },
            repeats=repeats,
        )
        rows.append(
            Row(
                f"MC dropout, {n} samples, {name}",
                "mc_dropout_predict (batched)",
                f"{n} sequential forwards",
                times["ours"],
                times["seq"],
                target=">= 2x",
            )
        )
    return rows


if __name__ == "__main__":
    print(format_table(run()))
