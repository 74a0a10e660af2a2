from __future__ import annotations

import torch

from tests.helpers.ddp import ddp_trainer_kwargs
from tests.helpers.models import (
    ClassifierModule,
    list_loader,
    param_hash,
    random_classification,
    tiny_trainer,
)


def fit_plain(rank: int, max_steps: int = 3):
    torch.manual_seed(0)
    x, y = random_classification(64)
    module = ClassifierModule()
    trainer = tiny_trainer(max_steps=max_steps, **ddp_trainer_kwargs())
    trainer.fit(module, list_loader(x, y))
    return trainer.world_size, trainer.global_rank, param_hash(module)
