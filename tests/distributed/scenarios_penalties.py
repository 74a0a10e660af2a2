"""2-rank DDP scenarios for the weight-space regularizers (run inside the DDP pool)."""

from __future__ import annotations

import torch

from lightning_reg.max_norm import MaxNormCallback
from lightning_reg.penalties import ElasticNetCallback, L1Callback, L2Callback
from tests.helpers.ddp import ddp_trainer_kwargs
from tests.helpers.models import (
    MLP,
    ClassifierModule,
    list_loader,
    param_hash,
    random_classification,
    tiny_trainer,
)

CALLBACKS = {
    "none": lambda: [],
    "l2": lambda: [L2Callback(0.05)],
    "l2_decoupled": lambda: [L2Callback(0.05, decoupled=True)],
    "l1_proximal": lambda: [L1Callback(0.05, proximal=True)],
    "elastic_net": lambda: [ElasticNetCallback(1e-2, 1e-2, proximal=True)],
    "max_norm": lambda: [MaxNormCallback(0.5)],
}


def fit_each_callback(rank: int, precision: str, accumulate: int) -> dict[str, tuple[str, float]]:
    """Fit once per callback; return each run's parameter hash and largest unit norm."""
    results = {}
    x, y = random_classification(n=128, seed=3)
    for name, make in CALLBACKS.items():
        torch.manual_seed(0)  # identical init on both ranks (DDP also broadcasts it)
        module = ClassifierModule(MLP(hidden=(16,)), lr=0.5, optimizer="adam")
        trainer = tiny_trainer(
            max_steps=4,
            callbacks=make(),
            precision=precision,
            accumulate_grad_batches=accumulate,
            **ddp_trainer_kwargs(),
        )
        trainer.fit(module, list_loader(x, y, batch_size=8))
        max_unit = max(
            p.detach().flatten(1).norm(dim=1).max().item()
            for p in module.parameters()
            if p.ndim >= 2
        )
        results[name] = (param_hash(module), max_unit)
    return results
