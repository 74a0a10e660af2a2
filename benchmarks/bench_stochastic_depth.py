"""Stochastic depth: skip the dropped blocks (ours) vs compute-and-mask (torchvision, timm).

A residual MLP of 24 blocks (CPU: width 768, batch 256; CUDA: width 2048, batch 1024, so that
compute, not kernel launches, dominates), ``p_L = 0.5``, linear schedule: the expected fraction
of blocks computed is ``sum_l p_l / L = 1 - 0.5 * 25 / 48 = 0.740``, so the ideal speed-up of
the blocks is ``1 / 0.740 = 1.35x`` (a little less for the whole step: the stem, the head and
the SGD update over all parameters are not skipped).

* train step (forward + backward + SGD step), ours ``mode="batch"`` vs torchvision's
  ``StochasticDepth(mode="batch")`` (block always computed, multiplied by a 0/1 mask);
* ours ``mode="row"`` vs timm's ``DropPath`` (per-sample mask; torchvision's ``mode="row"`` is
  the same algorithm);
* the batch-mode row again at width 256 (batch 256; not with ``--quick``), where a block is cheap
  and the wrapper's per-block Python work shows (issue 12's target, >= 1.25x);
* activation memory: bytes of the tensors autograd saves for backward during one forward
  (``torch.autograd.graph.saved_tensors_hooks``, mean over several forwards; parameters are
  not counted). On CUDA, the peak memory of a train step above the resting state (parameters,
  gradients) is reported as well.

Run: ``python -m benchmarks.bench_stochastic_depth`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.common import Row, format_table, interleaved_ms
from lightning_reg.stochastic_depth import (
    StochasticDepthWrapper,
    apply_stochastic_depth,
    survival_probabilities,
)

DEPTH = 24
P_LAST = 0.5


class Branch(nn.Module):
    """The residual branch ``f``: Linear-ReLU-Linear."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class Block(nn.Module):
    """``x + f(x)``, the block our surgery wraps."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.branch = Branch(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class MaskBlock(nn.Module):
    """``x + drop(f(x))``: torchvision ``StochasticDepth`` / timm ``DropPath`` placement."""

    def __init__(self, width: int, drop: nn.Module) -> None:
        super().__init__()
        self.branch = Branch(width)
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.branch(x))


def _net(blocks: list[nn.Module], width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), *blocks, nn.Linear(width, 10))


def _models(width: int) -> dict[str, nn.Module]:
    from timm.layers import DropPath
    from torchvision.ops import StochasticDepth

    probs = survival_probabilities(DEPTH, P_LAST)
    models: dict[str, nn.Module] = {}
    for mode in ("batch", "row"):
        torch.manual_seed(0)
        ours = _net([Block(width) for _ in range(DEPTH)], width)
        apply_stochastic_depth(ours, P_LAST, block_types=(Block,), mode=mode)
        g = torch.Generator().manual_seed(0)
        for m in ours.modules():
            if isinstance(m, StochasticDepthWrapper):
                m.generator = g
        models[f"ours_{mode}"] = ours
    torch.manual_seed(0)
    models["torchvision_batch"] = _net(
        [MaskBlock(width, StochasticDepth(1 - p, "batch")) for p in probs], width
    )
    torch.manual_seed(0)
    models["timm_droppath"] = _net([MaskBlock(width, DropPath(1 - p)) for p in probs], width)
    return models


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def _saved_bytes(model: nn.Module, x: torch.Tensor, forwards: int) -> float:
    """Mean bytes of activations autograd saves for backward during one training forward."""
    params = {p.data_ptr() for p in model.parameters()}
    total = 0
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # A tensor saved by two ops (ReLU's output, fc2's input) is stored once.
        if t.data_ptr() not in params:
            seen[t.data_ptr(), t.numel()] = t.numel() * t.element_size()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for _ in range(forwards):
            seen.clear()
            model(x).sum()
            total += sum(seen.values())
    return total / forwards


def _cuda_peak_mb(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Mean over ``steps`` of the forward+backward peak allocation above the resting state
    (parameters, no gradients, optimizer state)."""
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    total = 0.0
    for _ in range(steps + 1):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        resting = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss_fn(model(x), y).backward()
        torch.cuda.synchronize()
        total += torch.cuda.max_memory_allocated() - resting
    model.zero_grad(set_to_none=True)
    return total / (steps + 1) / 2**20


def run(quick: bool = False, device: str | None = None) -> list[Row]:
    """Benchmark rows; ``device`` defaults to CUDA when available. CPU timings use the
    current ``torch.get_num_threads()`` (pass ``--threads 1`` on a shared, busy machine:
    OpenMP barriers on oversubscribed cores distort small-kernel timings badly)."""
    torch.manual_seed(0)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if quick:
        width, batch = 128, 32
    else:
        width, batch = (2048, 1024) if device == "cuda" else (768, 256)
    # Each step draws how many blocks run (about ±11 % of the work per step at w768), so the
    # median needs many steps: 6 gave ratios from 1.19x to 1.31x on the same code.
    repeats, warmup, forwards = (3, 1, 2) if quick else (24, 1, 3)
    if device == "cuda" and not quick:
        repeats, forwards = 30, 10
    models = {k: m.to(device) for k, m in _models(width).items()}
    x = torch.randn(batch, width, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if device == "cuda":
        import functools

        sync = torch.cuda.synchronize

        def synced(fn: Callable[[], None]) -> Callable[[], None]:
            @functools.wraps(fn)
            def inner() -> None:
                fn()
                sync()

            return inner
    else:

        def synced(fn: Callable[[], None]) -> Callable[[], None]:
            return fn

    steps = {k: synced(_train_step(m, x, y)) for k, m in models.items()}
    ms = interleaved_ms(steps, repeats=repeats, warmup=warmup)
    kept = sum(survival_probabilities(DEPTH, P_LAST)) / DEPTH
    where = "cuda" if device == "cuda" else f"cpu x{torch.get_num_threads()}"
    net = f"{DEPTH} blocks w{width} b{batch}, p_L={P_LAST}, {where}"
    rows = [
        Row(
            f"train step, {net}",
            "ours batch",
            "torchvision StochasticDepth batch",
            ms["ours_batch"],
            ms["torchvision_batch"],
            target=">= 1.25x",
            note=f"ideal {1 / kept:.2f}x",
        ),
        Row(
            f"train step, {net}",
            "ours row",
            "timm DropPath (row)",
            ms["ours_row"],
            ms["timm_droppath"],
            target=">= 1.1x",
        ),
    ]
    if not quick:
        rows.append(_small_width_row(device, synced, repeats=max(repeats, 40)))
    mb = {k: _saved_bytes(m, x, forwards) / 2**20 for k, m in models.items()}
    for mode, base, base_name in (
        ("batch", "torchvision_batch", "torchvision StochasticDepth batch"),
        ("row", "timm_droppath", "timm DropPath (row)"),
    ):
        rows.append(
            Row(
                f"saved activations MB, {net}",
                f"ours {mode}",
                base_name,
                mb[f"ours_{mode}"],
                mb[base],
                kind="memory",
                target="< 1 (lower)",
            )
        )
    if device == "cuda":
        peak = {k: _cuda_peak_mb(m, x, y, forwards) for k, m in models.items()}
        for mode, base, base_name in (
            ("batch", "torchvision_batch", "torchvision StochasticDepth batch"),
            ("row", "timm_droppath", "timm DropPath (row)"),
        ):
            rows.append(
                Row(
                    f"CUDA fwd+bwd peak MB above resting, {net}",
                    f"ours {mode}",
                    base_name,
                    peak[f"ours_{mode}"],
                    peak[base],
                    kind="memory",
                    target="< 1 (lower)",
                )
            )
    return rows


def _small_width_row(
    device: str, synced: Callable[[Callable[[], None]], Callable[[], None]], repeats: int
) -> Row:
    """Batch mode at width 256 (batch 256): blocks are cheap there, so the wrapper's per-block
    Python work shows (issue 12's target)."""
    width, batch = 256, 256
    models = {k: _models(width)[k].to(device) for k in ("ours_batch", "torchvision_batch")}
    x = torch.randn(batch, width, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    steps = {k: synced(_train_step(m, x, y)) for k, m in models.items()}
    ms = interleaved_ms(steps, repeats=repeats, warmup=2)
    where = "cuda" if device == "cuda" else f"cpu x{torch.get_num_threads()}"
    return Row(
        f"train step, {DEPTH} blocks w{width} b{batch}, p_L={P_LAST}, {where}",
        "ours batch",
        "torchvision StochasticDepth batch",
        ms["ours_batch"],
        ms["torchvision_batch"],
        target=">= 1.25x",
    )


def _main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(format_table(run(quick=args.quick, device=args.device)))


if __name__ == "__main__":
    _main(sys.argv[1:])
