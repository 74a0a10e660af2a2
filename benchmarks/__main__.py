"""Run every benchmark in one process and print one table of ratios.

    python -m benchmarks            # full run (about 5 minutes on 2 cores)
    python -m benchmarks --quick    # smaller sizes, for a smoke run
    python -m benchmarks --only penalties overhead

Each ``benchmarks/bench_<name>.py`` exposes ``run(quick) -> list[Row]``. ``--markdown FILE``
also writes the table, the machine and the date to FILE (``benchmarks/README.md`` is made so).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import sys
import time
import traceback

import torch

from benchmarks.common import Row, format_table

NAMES = [
    "penalties",
    "overhead",
    "stochastic_depth",
    "dropout",
    "batch_norm",
    "augmentation",
    "label_smoothing",
    "early_stopping",
    "jacobian",
    "monitor",
]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if "model name" in line]
        cpu = models[0] if models else cpu
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, torch threads {torch.get_num_threads()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", choices=NAMES)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[Row] = []
    failures = []
    start = time.time()
    for name in args.only or NAMES:
        t0 = time.time()
        try:
            module = importlib.import_module(f"benchmarks.bench_{name}")
            rows += module.run(quick=args.quick)
            print(f"# {name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        except Exception:
            failures.append(name)
            traceback.print_exc()
    table = format_table(rows)
    print(table)
    took = time.time() - start
    print(f"\n{len(rows)} rows in {took:.0f} s; failed: {failures or 'none'}")
    if args.markdown:
        date = datetime.date.today().isoformat()
        with open(args.markdown, "w") as f:
            f.write(
                "# Benchmarks\n\n"
                "Every technique against the algorithm other libraries use, measured in one "
                "process by `python -m benchmarks` (interleaved medians). `speedup` rows: "
                "ratio = baseline / ours (> 1 is faster). `overhead` and `memory` rows: "
                "ratio = ours / baseline (1.0 is free).\n\n"
                f"- Date: {date}\n- Machine: {machine()}\n"
                f"- Command: `python -m benchmarks{' --quick' if args.quick else ''} "
                f"--threads {args.threads}` ({took:.0f} s)\n\n{table}\n"
            )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
