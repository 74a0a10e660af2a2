"""GPU check: every technique under every precision, zoo models, and 2-rank DDP on one GPU.

Run from the repository root on a CUDA machine::

    PYTHONPATH=. python scripts/gpu_check.py

It trains the compatibility matrix's small CNN (``tests/helpers/matrix.py``) with each technique
for a few steps under ``16-mixed``, ``bf16-mixed``, ``16-true``, ``bf16-true`` and ``64-true``;
then three zoo models (``tests/helpers/zoo.py``: torchvision ``resnet18``, timm ViT, Hugging Face
BERT) with the penalties, max-norm, stochastic depth and the monitor together, under the same
precisions; then every technique under 2-rank DDP on the single GPU
(``DDPStrategy(parallel_devices=[cuda0, cuda0], process_group_backend="gloo")``). Each run must
complete with finite weights in the precision's dtype and log the technique's keys (all of them
finite); DDP replicas must be identical. It prints a table and exits non-zero on any failure.
``--cpu`` runs the same logic on the CPU as a dry run (the CPU precisions ``bf16-mixed``,
``bf16-true`` and ``64-true``; ``--precisions`` picks others, ``--skip-zoo``/``--skip-ddp`` skip
parts).
"""

from __future__ import annotations

import argparse
import math
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
from tests.helpers.zoo import ZOO_BY_NAME, MemoryLogger, ZooModule  # noqa: E402

GPU_PRECISIONS = ["16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true"]
CPU_PRECISIONS = ["bf16-mixed", "bf16-true", "64-true"]
PARAM_DTYPE = {
    "16-mixed": torch.float32,
    "bf16-mixed": torch.float32,
    "32-true": torch.float32,
    "16-true": torch.float16,
    "bf16-true": torch.bfloat16,
    "64-true": torch.float64,
}
ZOO_MODELS = ["tv_resnet18", "timm_vit_tiny", "hf_bert"]


def _device_kwargs(cpu: bool) -> dict:
    return {"accelerator": "cpu"} if cpu else {"accelerator": "gpu", "devices": 1}


def _check(module, trainer, logger, keys, wanted: tuple[str, ...], precision: str, steps: int):
    assert trainer.global_step == steps, f"stopped at step {trainer.global_step}"
    dtype = PARAM_DTYPE[precision]
    for name, p in module.named_parameters():
        assert p.dtype == dtype, f"{name} is {p.dtype}, expected {dtype}"
        assert torch.isfinite(p).all(), f"{name} is not finite"
    missing = [k for k in wanted if not any(x.startswith(k) for x in keys)]
    assert not missing, f"keys not logged: {missing}"
    for _, metrics in logger.history:
        bad = {k: v for k, v in metrics.items() if k.startswith("reg/") and not math.isfinite(v)}
        assert not bad, f"non-finite logged values: {bad}"


def _single(technique, precision: str, cpu: bool) -> str:
    logger = MemoryLogger()
    module, trainer, recorder = build_run(
        technique, max_steps=3, precision=precision, logger=logger, **_device_kwargs(cpu)
    )
    val = make_loader(2, seed=1) if technique.needs_val else None
    trainer.fit(module, make_loader(6), val)
    _check(module, trainer, logger, recorder.keys | logger.keys, technique.log_keys, precision, 3)
    return "ok"


def _zoo(name: str, precision: str, cpu: bool) -> str:
    """A zoo model with the parameter techniques and stochastic depth, in one short run."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_reg import (
        L2Callback,
        MaxNormCallback,
        RegularizationMonitorCallback,
        StochasticDepthCallback,
    )

    zm = ZOO_BY_NAME[name]
    torch.manual_seed(0)
    module = ZooModule(zm.build())
    logger = MemoryLogger()
    callbacks = [
        L2Callback(1e-2),
        MaxNormCallback(3.0),
        StochasticDepthCallback(0.5, seed=0),
        RegularizationMonitorCallback(
            every_n_steps=1, num_classes=10, target_key="labels" if zm.kind == "text" else 1
        ),
    ]
    trainer = pl.Trainer(
        max_steps=3,
        precision=precision,
        logger=logger,
        log_every_n_steps=1,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        **_device_kwargs(cpu),
    )
    loader = DataLoader([zm.batch(8, seed=i) for i in range(3)], batch_size=None)
    trainer.fit(module, loader, DataLoader([zm.batch(8, seed=9)], batch_size=None))
    keys = logger.keys | set(trainer.callback_metrics)
    wanted = ("reg/l2/", "reg/max_norm/", "reg/stochastic_depth/", "reg/monitor/")
    _check(module, trainer, logger, keys, wanted, precision, 3)
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
    parser.add_argument("--skip-zoo", action="store_true")
    parser.add_argument("--precisions", nargs="+", help="default: all the device supports")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("No CUDA device: run with --cpu for a dry run.")
        return 2
    start = time.time()
    device = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    print(f"device: {device}; torch {torch.__version__}")
    precisions = args.precisions or (CPU_PRECISIONS if args.cpu else GPU_PRECISIONS)
    rows: list[tuple[str, str, str]] = []
    for precision in precisions:
        for technique in TECHNIQUES:
            try:
                status = _single(technique, precision, args.cpu)
            except Exception as err:
                status = f"FAIL {type(err).__name__}: {str(err)[:120]}"
                traceback.print_exc(limit=3)
            rows.append((technique.name, precision, status))
    for name in [] if args.skip_zoo else ZOO_MODELS:
        for precision in precisions:
            try:
                status = _zoo(name, precision, args.cpu)
            except Exception as err:
                status = f"FAIL {type(err).__name__}: {str(err)[:120]}"
                traceback.print_exc(limit=3)
            rows.append((f"zoo:{name}", precision, status))
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
