"""Shared benchmark helpers: timing in one process and a uniform result row.

Each ``benchmarks/bench_<technique>.py`` exposes ``run(quick: bool = False) -> list[Row]``.
``python -m benchmarks`` runs them all and prints one table of ratios.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Row:
    """One comparison: ``ours`` against ``baseline``; ``ratio = baseline_ms / ours_ms``.

    ``ratio > 1`` means ours is faster. For overhead rows, ``ratio`` is ``ours_ms / baseline_ms``
    and ``kind="overhead"`` (smaller is better, 1.0 = free). ``target`` is the goal as text.
    """

    benchmark: str
    ours: str
    baseline: str
    ours_ms: float
    baseline_ms: float
    kind: str = "speedup"  # "speedup" or "overhead" or "memory"
    target: str = ""
    note: str = ""

    @property
    def ratio(self) -> float:
        if self.kind == "speedup":
            return self.baseline_ms / self.ours_ms
        return self.ours_ms / self.baseline_ms


def time_ms(fn: Callable[[], object], *, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA-synchronised if available)."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    gc.collect()
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def interleaved_ms(
    fns: dict[str, Callable[[], object]], *, repeats: int = 20, warmup: int = 3
) -> dict[str, float]:
    """Median ms of several functions, measured interleaved so drift hits all equally."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    gc.collect()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def format_table(rows: list[Row]) -> str:
    """A Markdown table of ``rows``."""
    lines = [
        "| benchmark | ours | baseline | ours ms | baseline ms | ratio | kind | target |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.benchmark} | {r.ours} | {r.baseline} | {r.ours_ms:.3f} | "
            f"{r.baseline_ms:.3f} | {r.ratio:.2f}x | {r.kind} | {r.target} |"
        )
    return "\n".join(lines)
