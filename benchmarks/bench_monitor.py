"""RegularizationMonitorCallback: what it costs per training step.

* fit, default interval: a Trainer fit of a small CNN (the demo ``ResidualCNN`` on 8×8 inputs,
  batch 64) with a CSVLogger, with and without the monitor at its default schedule (Lightning's
  ``log_every_n_steps=50``); time per step. Target: ≤ 1.05×.
* fit, every step: the same with ``every_n_steps=1``, the worst case (norms, sparsity and the
  logger write at every step).
* one computation: ``compute_step_metrics()`` alone (one ``_foreach_norm`` for the norms,
  ``count_nonzero`` for the non-zero counts, the selection check included) against one plain
  forward/backward/SGD step of the same model, and against the naive per-parameter loop
  (``p.norm()`` and ``(p == 0).sum().item()`` per weight).

Everything runs on one CPU thread (the model is tiny). Run:
``python -m benchmarks.bench_monitor [--quick]``.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import Row, format_table, interleaved_ms
from lightning_reg.demo.model import ResidualCNN
from lightning_reg.monitor import RegularizationMonitorCallback


def _fit_fn(steps: int, monitor_every: int | str | None, data: torch.Tensor, target: torch.Tensor):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_reg.demo.model import DemoClassifier

    loader = DataLoader(
        TensorDataset(data, target),
        batch_size=64,
        shuffle=False,
        collate_fn=lambda b: list(torch.utils.data.default_collate(b)),
    )

    def fit() -> None:
        torch.manual_seed(0)
        module = DemoClassifier("image", [1, 8, 8], 10, optimizer="sgd", lr=0.05)
        callbacks = []
        if monitor_every != "off":
            callbacks.append(RegularizationMonitorCallback(monitor_every))  # type: ignore[arg-type]
        with tempfile.TemporaryDirectory() as tmp:
            trainer = pl.Trainer(
                accelerator="cpu",
                max_steps=steps,
                callbacks=callbacks,
                logger=CSVLogger(tmp),
                log_every_n_steps=50,
                limit_val_batches=0,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            )
            trainer.fit(module, loader)

    return fit


def _rotated_ms(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median ms per function; the order rotates each repeat (the first of a round runs slower
    here, which ``interleaved_ms``' fixed order would charge to one function)."""
    names = list(fns)
    for name in names:  # warm-up
        fns[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {n: statistics.median(v) for n, v in samples.items()}


def _fit_rows(quick: bool) -> list[Row]:
    steps = 100 if quick else 300
    g = torch.Generator().manual_seed(0)
    data = torch.randn(64 * steps, 1, 8, 8, generator=g)
    target = torch.randint(0, 10, (64 * steps,), generator=g)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ms = _rotated_ms(
            {
                "plain": _fit_fn(steps, "off", data, target),
                "default": _fit_fn(steps, None, data, target),
                "every": _fit_fn(steps, 1, data, target),
            },
            repeats=3 if quick else 9,
        )
    per_step = {k: v / steps for k, v in ms.items()}
    tag = "monitor/fit ResidualCNN 8x8 b64"
    return [
        Row(
            tag,
            "monitor, default schedule (every 50 steps)",
            "plain step",
            per_step["default"],
            per_step["plain"],
            kind="overhead",
            target="<= 1.05x",
        ),
        Row(
            tag,
            "monitor every step (worst case)",
            "plain step",
            per_step["every"],
            per_step["plain"],
            kind="overhead",
            target="(report)",
        ),
    ]


def _compute_rows(quick: bool) -> list[Row]:
    torch.manual_seed(0)
    model = ResidualCNN(1, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    monitor = RegularizationMonitorCallback()
    monitor.on_train_start(None, model)  # type: ignore[arg-type]
    weights = [p for p in model.parameters() if p.ndim >= 2]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def ours() -> None:
        values = monitor.compute_step_metrics()
        torch.stack(list(values.values())).tolist()

    def naive() -> None:
        with torch.no_grad():
            [float(p.norm()) for p in weights]
            [int((p == 0).sum()) for p in weights]

    ms = interleaved_ms(
        {"ours": ours, "naive": naive, "step": step}, repeats=20 if quick else 100, warmup=5
    )
    tag = f"monitor/compute {len(weights)} weights"
    return [
        Row(
            tag,
            "compute_step_metrics (foreach)",
            "one training step",
            ms["ours"],
            ms["step"],
            kind="overhead",
            target="(report)",
        ),
        Row(
            tag,
            "compute_step_metrics (foreach)",
            "per-parameter loop + .item()",
            ms["ours"],
            ms["naive"],
        ),
    ]


def run(quick: bool = False) -> list[Row]:
    """All monitor benchmarks (``quick``: fewer steps and repeats), on one CPU thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only add scheduling noise
    try:
        return [*_compute_rows(quick), *_fit_rows(quick)]
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    print(format_table(run(parser.parse_args().quick)))
