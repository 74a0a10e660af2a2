"""Paired A/B of hot paths: this checkout against a git revision, in one process.

``python -m benchmarks`` compares each technique with another library's algorithm; its ratios
move from run to run (stochastic depth draws a random number of blocks per step, and the machine
drifts). To tell whether a *change of ours* made a path slower, this script loads the package at
``--rev`` under the name ``lightning_reg_base`` next to the working tree's ``lightning_reg`` and
times the same workload with both, interleaved step by step, with identical inputs and identical
random decisions. It prints, per path, the median and mean of ``base_time / new_time`` over the
pairs (> 1: the working tree is faster).

Run: ``python scripts/ab_paired.py --rev HEAD~1`` (one thread; about 3 minutes).
"""

from __future__ import annotations

import argparse
import io
import itertools
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def load_base(rev: str) -> None:
    """Extract ``lightning_reg/`` at ``rev`` as the importable package ``lightning_reg_base``."""
    tar = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "lightning_reg"], capture_output=True, check=True
    ).stdout
    where = Path(tempfile.mkdtemp(prefix="ab_paired_"))
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(where, filter="data")
    pkg = where / "lightning_reg_base"
    (where / "lightning_reg").rename(pkg)
    for path in pkg.rglob("*.py"):
        text = re.sub(r"\blightning_reg\b", "lightning_reg_base", path.read_text())
        path.write_text(text)
    sys.path[:0] = [str(where), str(ROOT)]


def paired(fns: dict[str, Callable[[], object]], pairs: int) -> tuple[float, float]:
    """Median and mean of ``base / new`` wall time over ``pairs`` interleaved pairs."""
    for fn in fns.values():
        fn()
    ratios = []
    for _ in range(pairs):
        took = {}
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            took[name] = time.perf_counter() - start
        ratios.append(took["base"] / took["new"])
    return statistics.median(ratios), statistics.mean(ratios)


def stochastic_depth(width: int) -> dict[str, Callable[[], None]]:
    import lightning_reg_base.stochastic_depth as base

    import lightning_reg.stochastic_depth as new
    from benchmarks.bench_stochastic_depth import DEPTH, P_LAST, Block, _net

    x, y = torch.randn(256, width), torch.randint(0, 10, (256,))
    steps = {}
    for name, module in (("base", base), ("new", new)):
        torch.manual_seed(0)
        model = _net([Block(width) for _ in range(DEPTH)], width)
        module.apply_stochastic_depth(model, P_LAST, block_types=(Block,), mode="batch")
        generator = torch.Generator().manual_seed(0)  # the same decisions for both
        for wrapper in model.modules():
            if isinstance(wrapper, module.StochasticDepthWrapper):
                wrapper.generator = generator
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        steps[name] = step
    return steps


def jacobian(sizes: tuple[int, ...], batch: int) -> dict[str, Callable[[], None]]:
    import lightning_reg_base.jacobian as base

    import lightning_reg.jacobian as new

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
    net, x = nn.Sequential(*layers[:-1]), torch.randn(batch, sizes[0])

    def make(module: object) -> Callable[[], None]:
        def step() -> None:
            leaf = x.detach().requires_grad_(True)
            module.jacobian_penalty(leaf, net(leaf), n_projections="exact").backward()  # type: ignore[attr-defined]

        return step

    return {"base": make(base), "new": make(new)}


def ghost_batch_norm() -> dict[str, Callable[[], None]]:
    import lightning_reg_base.ghost_batch_norm as base

    import lightning_reg.ghost_batch_norm as new

    x = torch.randn(128, 32, 16, 16, requires_grad=True)
    steps = {}
    for name, module in (("base", base), ("new", new)):
        bn = module.GhostBatchNorm2d(32, virtual_batch_size=32)
        steps[name] = lambda bn=bn: bn(x).sum().backward()
    return steps


def max_norm() -> dict[str, Callable[[], None]]:
    import lightning_reg_base.max_norm as base

    import lightning_reg.max_norm as new

    steps = {}
    for name, module in (("base", base), ("new", new)):
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
        model = nn.TransformerEncoder(layer, 10, enable_nested_tensor=False)
        weights = [p for p in model.parameters() if p.dim() > 1]
        steps[name] = lambda w=weights, m=module: m.max_norm_(w, 0.5)
    return steps


def penalties_and_max_norm() -> dict[str, dict[str, Callable[[], None]]]:
    """``add_penalty_grad_`` (L2, 110 tensors) and ``max_norm_`` (37 weights) on the model of
    ``benchmarks/bench_penalties.py``."""
    import lightning_reg_base.max_norm as base_max_norm
    import lightning_reg_base.penalties as base_penalties

    import lightning_reg.max_norm as new_max_norm
    import lightning_reg.penalties as new_penalties
    from benchmarks.bench_penalties import Encoder
    from lightning_reg.core.params import ParamSelection

    torch.manual_seed(0)
    model = Encoder(layers=9)
    nn.functional.cross_entropy(model(torch.randn(32, 16, 128)), torch.zeros(32).long()).backward()
    params, weights = list(model.parameters()), ParamSelection("weights").parameters(model)
    with torch.no_grad():
        for weight in weights:
            weight.mul_(3.0)  # some units outside the ball
    return {
        "l2": {
            "base": lambda: base_penalties.add_penalty_grad_(params, l2=1e-4),
            "new": lambda: new_penalties.add_penalty_grad_(params, l2=1e-4),
        },
        "max_norm": {
            "base": lambda: base_max_norm.max_norm_(weights, 1.0),
            "new": lambda: new_max_norm.max_norm_(weights, 1.0),
        },
    }


def mc_dropout() -> dict[str, Callable[[], None]]:
    import lightning_reg_base.dropout as base

    import lightning_reg.dropout as new
    from benchmarks.bench_dropout import _cnn

    torch.manual_seed(0)
    model, x = _cnn(), torch.randn(4, 3, 16, 16)
    return {
        "base": lambda: base.mc_dropout_predict(model, x, 30, classifier=True),
        "new": lambda: new.mc_dropout_predict(model, x, 30, classifier=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="HEAD", help="the git revision to compare against")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="3 pairs per path (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_base(args.rev)
    cases: list[tuple[str, Callable[[], dict[str, Callable[[], None]]], int]] = [
        (
            "stochastic depth batch, 24 blocks w768 b256, train step",
            lambda: stochastic_depth(768),
            40,
        ),
        (
            "stochastic depth batch, 24 blocks w256 b256, train step",
            lambda: stochastic_depth(256),
            200,
        ),
        (
            "jacobian exact, digits 64-256-256-10 B=128",
            lambda: jacobian((64, 256, 256, 10), 128),
            60,
        ),
        (
            "jacobian exact, mnist 784-512-512-10 B=256",
            lambda: jacobian((784, 512, 512, 10), 256),
            40,
        ),
        ("ghost BN fwd+bwd 128x32x16x16 vbs=32", ghost_batch_norm, 200),
        ("max_norm_ on a 10-layer d=64 encoder's weights", max_norm, 400),
        ("add_penalty_grad_ L2, 110 tensors", lambda: penalties_and_max_norm()["l2"], 400),
        (
            "max_norm_, 37 weights (bench_penalties)",
            lambda: penalties_and_max_norm()["max_norm"],
            400,
        ),
        ("mc_dropout_predict 30 samples, CNN 3x16x16 B=4", mc_dropout, 200),
    ]
    print(f"| path (base = {args.rev}) | pairs | median base/new | mean base/new |")
    print("|---|---:|---:|---:|")
    for name, build, pairs in cases:
        pairs = 3 if args.quick else pairs
        median, mean = paired(build(), pairs)
        print(f"| {name} | {pairs} | {median:.3f} | {mean:.3f} |", flush=True)


if __name__ == "__main__":
    main()
