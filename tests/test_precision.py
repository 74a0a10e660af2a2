"""Every technique under every Lightning precision (issue 10).

``32-true``, ``bf16-mixed``, ``bf16-true`` and ``64-true`` run on the CPU; ``16-mixed`` and
``16-true`` need CUDA (Lightning refuses ``16-mixed`` on the CPU and many CPU kernels have no
float16 version), so they run here only where a GPU is present, and in ``scripts/gpu_check.py``.

Each run trains the compatibility matrix's small CNN (``tests/helpers/matrix.py``) for 3 steps
and checks: the steps ran; the weights are finite and in the precision's dtype; the technique's
``reg/*`` keys were logged and every logged ``reg/*`` value is finite; and the technique's own
invariant where it is cheap (the max-norm bound holds; soft targets are distributions and
label-smoothed ones are ``(1−α)·onehot + α/K``; logged penalties, sparsity and norms equal a
float64 recomputation from the final weights; the dropout rate is set; BatchNorm statistics
stay finite in the parameters' dtype).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_reg import GhostBatchNorm, ParamSelection
from tests.helpers.matrix import NUM_CLASSES, TECHNIQUES, build_run, make_loader
from tests.helpers.zoo import MemoryLogger

pytestmark = pytest.mark.slow  # still runs by default (addopts deselects nothing)

_NO_CUDA = "float16 needs CUDA: Lightning refuses 16-mixed on the CPU and CPU kernels lack float16"
PRECISIONS = [
    "32-true",
    "bf16-mixed",
    "bf16-true",
    "64-true",
    pytest.param(
        "16-mixed", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=_NO_CUDA)
    ),
    pytest.param(
        "16-true", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=_NO_CUDA)
    ),
]

PARAM_DTYPE = {
    "32-true": torch.float32,
    "bf16-mixed": torch.float32,
    "16-mixed": torch.float32,
    "bf16-true": torch.bfloat16,
    "16-true": torch.float16,
    "64-true": torch.float64,
}

#: relative tolerance of a value rounded to the parameters' dtype
RTOL = {torch.float32: 1e-5, torch.float64: 1e-9, torch.bfloat16: 1e-2, torch.float16: 2e-3}

PENALTY = {  # key -> (l1, l2) of the matrix's technique
    "l2": ("reg/l2/penalty", 0.0, 1e-2),
    "l2_decoupled": ("reg/l2/penalty", 0.0, 1e-2),
    "l1_proximal": ("reg/l1/penalty", 1e-2, 0.0),
    "elastic_net": ("reg/elastic_net/penalty", 1e-3, 1e-2),
}


class Capture(Callback):
    """Runs after the technique's callbacks: keeps the targets and the module's layers as
    ``training_step`` sees them."""

    def __init__(self) -> None:
        self.targets: list[torch.Tensor] = []
        self.ghost = 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.targets.append(batch[1].detach().clone())
        self.ghost = max(
            self.ghost, sum(isinstance(m, GhostBatchNorm) for m in pl_module.modules())
        )


def _selected(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().double() for p in ParamSelection("weights").parameters(module)]


def _accelerator(precision: str) -> dict[str, Any]:
    return {"accelerator": "gpu", "devices": 1} if precision.startswith("16") else {}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("technique", TECHNIQUES, ids=[t.name for t in TECHNIQUES])
def test_technique_under_precision(technique, precision):
    logger, capture = MemoryLogger(), Capture()
    module, trainer, recorder = build_run(
        technique,
        max_steps=3,
        precision=precision,
        logger=logger,
        callbacks=[capture],
        **_accelerator(precision),
    )
    val = make_loader(2, seed=1) if technique.needs_val else None
    trainer.fit(module, make_loader(6), val)
    name = technique.name

    # the run, the weights, the logs
    assert trainer.global_step == 3, f"{name}/{precision}: stopped at {trainer.global_step}"
    dtype = PARAM_DTYPE[precision]
    for pname, p in module.named_parameters():
        assert p.dtype == dtype, f"{name}/{precision}: {pname} is {p.dtype}, expected {dtype}"
        assert torch.isfinite(p).all(), f"{name}/{precision}: {pname} is not finite"
    keys = recorder.keys | logger.keys
    missing = [k for k in technique.log_keys if not any(s.startswith(k) for s in keys)]
    assert not missing, f"{name}/{precision}: {missing} not logged; saw {sorted(keys)}"
    for _, metrics in logger.history:
        for key, value in metrics.items():
            if key.startswith("reg/"):
                assert torch.isfinite(torch.tensor(value)), f"{name}/{precision}: {key}={value}"

    # the technique's own invariant
    rtol = RTOL[dtype]
    if name in PENALTY:
        key, l1, l2 = PENALTY[name]
        w = _selected(module)
        expected = l1 * sum(t.abs().sum() for t in w) + l2 / 2 * sum((t**2).sum() for t in w)
        assert logger.last(key) == pytest.approx(expected.item(), rel=max(rtol, 1e-5))
        if name == "l1_proximal":
            zeros = sum((t == 0).sum() for t in w) / sum(t.numel() for t in w)
            assert logger.last("reg/l1/zero_fraction") == pytest.approx(zeros.item(), abs=1e-6)
    elif name == "max_norm":
        for t in _selected(module):
            units = t.flatten(1).norm(dim=1)
            assert units.max() <= 0.5 * (1 + 2 * rtol), f"{precision}: unit norm {units.max()}"
    elif name == "dropout_schedule":
        assert logger.last("reg/dropout/p") == pytest.approx(0.2)
        assert module.model.dropout.p == pytest.approx(0.2)
    elif name in ("mixup", "cutmix", "label_smoothing"):
        assert len(capture.targets) == 3
        for y in capture.targets:
            assert y.shape == (8, NUM_CLASSES), f"{name}/{precision}: targets {tuple(y.shape)}"
            y = y.double()
            assert (y >= 0).all()
            torch.testing.assert_close(y.sum(1), torch.ones(8, dtype=y.dtype), rtol=0, atol=1e-2)
            if name == "label_smoothing":  # (1 − α)·onehot + α/K with α = 0.1
                low, high = 0.1 / NUM_CLASSES, 0.9 + 0.1 / NUM_CLASSES
                assert ((y - low).abs() < 1e-2).sum(1).eq(NUM_CLASSES - 1).all()
                assert ((y.max(1).values - high).abs() < 1e-2).all()
    elif name in ("ghost_batch_norm", "precise_batch_norm"):
        if name == "ghost_batch_norm":
            assert capture.ghost > 0, f"{precision}: no GhostBatchNorm during training"
        norms = [m for m in module.modules() if getattr(m, "running_var", None) is not None]
        assert norms
        for bn in norms:
            assert bn.running_var.dtype == dtype and torch.isfinite(bn.running_var).all()
            assert (bn.running_var > 0).all()
    elif name == "jacobian":
        assert logger.last("reg/jacobian/frobenius_sq") > 0
    elif name == "monitor":
        w = _selected(module)
        total = sum((t**2).sum() for t in w).sqrt().item()
        zeros = (sum((t == 0).sum() for t in w) / sum(t.numel() for t in w)).item()
        assert logger.last("reg/monitor/norm/total") == pytest.approx(total, rel=max(rtol, 1e-5))
        assert logger.last("reg/monitor/sparsity") == pytest.approx(zeros, abs=1e-6)
