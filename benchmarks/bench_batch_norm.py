"""Batch norm as a regularizer: ghost BN per-step cost, precise-BN cost per epoch.

1. Ghost batch norm, one training step (forward + backward) of a BatchNorm2d layer on a
   128x32x16x16 batch with virtual batches of 32 rows:
   * ours against Composer's algorithm (a Python loop of ``F.batch_norm`` over ``x.chunk(n)``
     with momentum / n), as a speedup. On CPU ours is the same fused loop (the CPU batch-norm
     kernel beats any unfused formulation); the side-by-side layout that ghost BN uses on
     accelerators (one fused call for all chunks) is reported too;
   * ours against plain ``nn.BatchNorm2d`` (fused kernel, no virtual batches), as overhead;
   * on a CUDA machine also 1024x64x16x16 with virtual batches of 16 on the GPU: the side-by-side
     layout (ours there) against Composer's loop. It is the evidence for keeping that layout
     (3.6x on an H200 during development, 2026-11-26).
2. Precise BN: the time of one recompute over ``num_batches`` training batches, against one
   training epoch over the same batches (overhead = recompute / epoch), and against fvcore's
   ``update_bn_stats`` algorithm (train mode, momentum 1, running average of batch statistics)
   as a speedup.

Timed on one thread: on a shared, oversubscribed CPU, OpenMP spinning distorts every number.

Run: ``python -m benchmarks.bench_batch_norm``
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import lightning_reg.ghost_batch_norm as ghost_module
from benchmarks.common import Row, format_table, interleaved_ms
from lightning_reg import GhostBatchNorm2d
from lightning_reg.precise_batch_norm import recompute_batch_norm_stats


def composer_ghost_bn(bn: nn.BatchNorm2d, x: torch.Tensor, vbs: int) -> torch.Tensor:
    """Composer's ``GhostBatchNorm.forward``: a loop of BatchNorm calls over the chunks."""
    n = -(-x.shape[0] // vbs)
    momentum = bn.momentum
    bn.momentum = momentum / n
    try:
        return torch.cat([bn(chunk) for chunk in x.chunk(n, 0)], dim=0)
    finally:
        bn.momentum = momentum


def fvcore_update_bn_stats(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """fvcore's ``update_bn_stats``: momentum 1, average the per-batch running stats."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 1.0
    means = [torch.zeros_like(bn.running_mean) for bn in bns]
    variances = [torch.zeros_like(bn.running_var) for bn in bns]
    model.train()
    with torch.no_grad():
        for i, x in enumerate(batches):
            model(x)
            for j, bn in enumerate(bns):
                means[j] += (bn.running_mean - means[j]) / (i + 1)
                variances[j] += (bn.running_var - variances[j]) / (i + 1)
    for j, bn in enumerate(bns):
        bn.running_mean.copy_(means[j])
        bn.running_var.copy_(variances[j])
        bn.momentum = momenta[j]


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


def _ghost_rows(quick: bool) -> list[Row]:
    torch.manual_seed(0)
    vbs = 32
    x = torch.randn(128, 32, 16, 16, requires_grad=True)
    ours = GhostBatchNorm2d(32, virtual_batch_size=vbs)
    vec = GhostBatchNorm2d(32, virtual_batch_size=vbs)
    plain = nn.BatchNorm2d(32)
    composer = nn.BatchNorm2d(32)

    def step(fn):
        def run():
            fn().square().mean().backward()

        return run

    def side_by_side():
        saved = ghost_module._ONE_CALL_PER_CHUNK
        ghost_module._ONE_CALL_PER_CHUNK = set()  # the accelerator layout, on CPU
        try:
            return vec(x)
        finally:
            ghost_module._ONE_CALL_PER_CHUNK = saved

    times = interleaved_ms(
        {
            "ours": step(lambda: ours(x)),
            "vec": step(side_by_side),
            "plain": step(lambda: plain(x)),
            "composer": step(lambda: composer_ghost_bn(composer, x, vbs)),
        },
        repeats=5 if quick else 30,
    )
    name = "GhostBN fwd+bwd, 128x32x16x16, vbs=32"
    return [
        Row(name, "GhostBatchNorm2d (fused loop on CPU)", "Composer chunk loop",
            times["ours"], times["composer"], target="~1x (same algorithm on CPU)"),
        Row(name, "GhostBatchNorm2d side-by-side layout", "Composer chunk loop", times["vec"],
            times["composer"], target="report (meant for GPU)"),
        Row(name, "GhostBatchNorm2d", "nn.BatchNorm2d (no ghost)", times["ours"],
            times["plain"], kind="overhead", target="report"),
    ]  # fmt: skip


def _ghost_cuda_rows(quick: bool) -> list[Row]:
    torch.manual_seed(0)
    vbs, x = 16, torch.randn(1024, 64, 16, 16, device="cuda", requires_grad=True)
    ours = GhostBatchNorm2d(64, virtual_batch_size=vbs, device="cuda")
    composer = nn.BatchNorm2d(64, device="cuda")

    def step(fn):
        def run():
            fn().square().mean().backward()
            torch.cuda.synchronize()

        return run

    times = interleaved_ms(
        {
            "ours": step(lambda: ours(x)),
            "composer": step(lambda: composer_ghost_bn(composer, x, vbs)),
        },
        repeats=5 if quick else 30,
    )
    name = "GhostBN fwd+bwd CUDA, 1024x64x16x16, vbs=16"
    ours_name, base = "GhostBatchNorm2d (side by side)", "Composer chunk loop"
    return [Row(name, ours_name, base, times["ours"], times["composer"], target="> 1x")]


def _precise_rows(quick: bool) -> list[Row]:
    torch.manual_seed(0)
    num_batches = 10 if quick else 40
    batches = [torch.randn(64, 3, 16, 16) for _ in range(num_batches)]
    targets = [torch.randint(0, 10, (64,)) for _ in range(num_batches)]
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def epoch():
        model.train()
        for x, y in zip(batches, targets):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

    def precise():
        recompute_batch_norm_stats(model, batches, num_batches, forward_fn=lambda m, b: m(b))

    def fvcore():
        fvcore_update_bn_stats(model, batches)

    times = interleaved_ms(
        {"epoch": epoch, "precise": precise, "fvcore": fvcore},
        repeats=2 if quick else 5,
        warmup=1,
    )
    name = f"Precise BN, small CNN, {num_batches} batches of 64x3x16x16"
    return [
        Row(name, "recompute_batch_norm_stats", "one training epoch (same batches)",
            times["precise"], times["epoch"], kind="overhead", target="report"),
        Row(name, "recompute_batch_norm_stats (exact)", "fvcore update_bn_stats (approx.)",
            times["precise"], times["fvcore"], target="report"),
    ]  # fmt: skip


def run(quick: bool = False) -> list[Row]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cuda = _ghost_cuda_rows(quick) if torch.cuda.is_available() else []
        return _ghost_rows(quick) + cuda + _precise_rows(quick)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    print(format_table(run()))
