"""DDP scenarios for ghost and precise batch norm (run inside the 2-rank pool)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_reg import (
    GhostBatchNorm,
    GhostBatchNormCallback,
    GhostSyncBatchNorm,
    PreciseBatchNormCallback,
)
from tests.helpers.ddp import ddp_trainer_kwargs
from tests.helpers.models import (
    ClassifierModule,
    SmallCNN,
    list_loader,
    random_classification,
    tiny_trainer,
)
from tests.helpers.models_batch_norm import bn_mlp


def precise_bn_fit(rank: int, sync_batchnorm: bool = False, precision: str = "32-true"):
    """Each rank sees its half of 64 rows (DistributedSampler); precise BN over all of it."""
    torch.manual_seed(0)
    x, y = random_classification(64, seed=3)
    x = x * 2.0 + 1.0
    module = ClassifierModule(bn_mlp(), lr=0.05)
    trainer = tiny_trainer(
        max_epochs=1,
        limit_val_batches=1,
        precision=precision,
        sync_batchnorm=sync_batchnorm,
        callbacks=[PreciseBatchNormCallback(num_batches=100)],
        **ddp_trainer_kwargs(),
    )
    trainer.fit(module, list_loader(x, y, batch_size=8), list_loader(x, y, batch_size=8))
    bn = module.model[1]
    fc = module.model[0]
    return {
        "mean": bn.running_mean.clone(),
        "var": bn.running_var.clone(),
        "weight": fc.weight.detach().clone(),
        "bias": fc.bias.detach().clone(),
        "bn_type": type(bn).__name__,
    }


def ghost_bn_sync_fit(rank: int):
    """GhostBatchNormCallback with the GhostSyncBatchNorm plugin: ghost layers stay per rank."""
    torch.manual_seed(0)
    x, y = random_classification(64, image=True)
    model = nn.Sequential(SmallCNN(num_classes=3))
    module = ClassifierModule(model, lr=0.05)
    seen_types: list[str] = []

    class Probe(GhostBatchNormCallback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen_types.extend(
                type(m).__name__ for m in pl_module.modules() if isinstance(m, nn.BatchNorm2d)
            )

    trainer = tiny_trainer(
        max_steps=2, callbacks=[Probe(4)], plugins=[GhostSyncBatchNorm()], **ddp_trainer_kwargs()
    )
    trainer.fit(module, list_loader(x, y, batch_size=16))
    ghosts = [m for m in module.modules() if isinstance(m, GhostBatchNorm)]
    params = [p.detach().clone() for p in module.parameters()]
    return {
        "seen": sorted(set(seen_types)),
        "n_ghost": len(ghosts),
        "num_virtual_batches": [m.last_num_virtual_batches for m in ghosts],
        "params": params,
    }
