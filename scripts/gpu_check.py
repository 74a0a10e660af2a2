"""GPU check: every technique under 16-mixed and bf16-mixed, and 2-rank DDP on one GPU.

Run from the repository root on a CUDA machine::

    PYTHONPATH=. python scripts/gpu_check.py

It trains the compatibility matrix's small CNN (``tests/helpers/matrix.py``) with each technique
for a few steps under ``16-mixed`` and ``bf16-mixed``, then runs every technique under 2-rank DDP
on the single GPU (``DDPStrategy(parallel_devices=[cuda0, cuda0], process_group_backend="gloo")``)
and checks, as the matrix does, that the run completes with finite weights, logs the technique's
keys and leaves identical replicas. It prints a table and exits non-zero on any failure.
``--cpu`` runs the same logic on the CPU (bf16-mixed only) as a dry run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402

from tests.helpers.matrix import TECHNIQUES, build_run, make_loader, state_hash  # noqa: E402


def _device_kwargs(cpu: bool) -> dict:
    return {"accelerator": "cpu"} if cpu else {"accelerator": "gpu", "devices": 1}


def _single(technique, precision: str, cpu: bool) -> str:
    module, trainer, recorder = build_run(
        technique, max_steps=3, precision=precision, **_device_kwargs(cpu)
    )
    val = make_loader(2, seed=1) if technique.needs_val else None
    trainer.fit(module, make_loader(6), val)
    assert trainer.global_step == 3, trainer.global_step
    assert all(torch.isfinite(p).all() for p in module.parameters()), "non-finite weights"
    missing = [k for k in technique.log_keys if not any(x.startswith(k) for x in recorder.keys)]
    assert not missing, f"keys not logged: {missing}"
    return "ok"


def ddp_all(rank: int, cpu: bool) -> dict[str, str]:
    """Inside the 2-rank pool: every technique under DDP on the one GPU (or CPU)."""
    from lightning.pytorch.strategies import DDPStrategy

    results = {}
    for technique in TECHNIQUES:
        try:
            if cpu:
                kwargs = dict(accelerator="cpu", devices=2, strategy="ddp")
            else:
                cuda0 = torch.device("cuda", 0)
                strategy = DDPStrategy(
                    parallel_devices=[cuda0, cuda0], process_group_backend="gloo"
                )
                kwargs = dict(accelerator="gpu", devices=1, strategy=strategy)
            module, trainer, recorder = build_run(
                technique, max_steps=3, precision="32-true" if cpu else "bf16-mixed", **kwargs
            )
            val = make_loader(2, seed=1) if technique.needs_val else None
            trainer.fit(module, make_loader(6, seed=rank), val)
            missing = [
                k for k in technique.log_keys if not any(x.startswith(k) for x in recorder.keys)
            ]
            results[technique.name] = state_hash(module, buffers=False) + (
                f" missing {missing}" if missing and rank == 0 else ""
            )
        except Exception as err:
            results[technique.name] = f"FAIL {type(err).__name__}: {str(err)[:120]}"
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU")
    parser.add_argument("--skip-ddp", action="store_true")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("No CUDA device: run with --cpu for a dry run.")
        return 2
    start = time.time()
    device = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    print(f"device: {device}; torch {torch.__version__}")
    precisions = ["bf16-mixed"] if args.cpu else ["16-mixed", "bf16-mixed"]
    rows: list[tuple[str, str, str]] = []
    for precision in precisions:
        for technique in TECHNIQUES:
            try:
                status = _single(technique, precision, args.cpu)
            except Exception as err:
                status = f"FAIL {type(err).__name__}: {str(err)[:120]}"
                traceback.print_exc(limit=3)
            rows.append((technique.name, precision, status))
    if not args.skip_ddp:
        from tests.helpers.ddp import DDPPool

        pool = DDPPool()
        try:
            rank0, rank1 = pool.run(ddp_all, args.cpu, timeout=600)
        finally:
            pool.close()
        for technique in TECHNIQUES:
            a, b = rank0[technique.name], rank1[technique.name]
            if a.startswith("FAIL") or b.startswith("FAIL"):
                status = a if a.startswith("FAIL") else b
            elif "missing" in a:
                status = "FAIL " + a.split(" ", 1)[1]
            else:
                status = "ok, replicas identical" if a == b else "FAIL replicas differ"
            rows.append((technique.name, "ddp x2 on one device", status))
    width = max(len(r[0]) for r in rows)
    print(f"\n| {'technique':<{width}} | setting | result |")
    print(f"|{'-' * (width + 2)}|---|---|")
    for name, setting, status in rows:
        print(f"| {name:<{width}} | {setting} | {status} |")
    failures = sum(r[2].startswith("FAIL") for r in rows)
    print(f"\n{len(rows) - failures} passed, {failures} failed in {time.time() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
