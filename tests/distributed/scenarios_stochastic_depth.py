"""2-rank DDP scenarios for stochastic depth (run inside the ``ddp_pool``)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from lightning_reg.stochastic_depth import (
    StochasticDepthCallback,
    StochasticDepthWrapper,
    apply_stochastic_depth,
)
from tests.helpers.ddp import ddp_trainer_kwargs
from tests.helpers.models import (
    ClassifierModule,
    ResidualBlock,
    ResidualMLP,
    list_loader,
    param_hash,
    random_classification,
    tiny_trainer,
)


class _Trace(pl.Callback):
    """Records, per training batch, how many decisions each wrapper dropped."""

    def __init__(self) -> None:
        self.rows: list[list[int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        wrappers = [m for m in pl_module.modules() if isinstance(m, StochasticDepthWrapper)]
        self.rows.append([w.dropped for w in wrappers])


def _data(rank: int) -> Any:
    # Different data per rank, as a DistributedSampler would give.
    x, y = random_classification(64, seed=rank)
    return list_loader(x, y, batch_size=8)


def fit_callback(
    rank: int, mode: str = "batch", max_steps: int = 8, p_last: float = 0.3
) -> dict[str, Any]:
    """StochasticDepthCallback under plain strategy="ddp" (find_unused_parameters=False)."""
    torch.manual_seed(0)
    module = ClassifierModule(ResidualMLP(depth=4), optimizer="sgd_momentum")
    cb = StochasticDepthCallback(p_last, block_types=(ResidualBlock,), mode=mode)
    trace = _Trace()
    trainer = tiny_trainer(
        max_steps=max_steps, max_epochs=-1, callbacks=[cb, trace], **ddp_trainer_kwargs()
    )
    trainer.fit(module, _data(rank))
    return {
        "steps": trainer.global_step,
        "hash": param_hash(module),
        "trace": trace.rows,
        "seed": cb.seed,
    }


def fit_disagreeing_ranks(rank: int, max_steps: int = 8) -> dict[str, Any]:
    """Batch mode with *per-rank* decisions (standalone surgery, rank-seeded generators): ranks
    skip different blocks. The zero-gradient touch must keep DDP from hanging or diverging."""
    torch.manual_seed(0)
    model = ResidualMLP(depth=4)
    apply_stochastic_depth(model, 0.3, block_types=(ResidualBlock,))
    generator = torch.Generator().manual_seed(1234 + rank)
    for m in model.modules():
        if isinstance(m, StochasticDepthWrapper):
            m.generator = generator
    module = ClassifierModule(model, optimizer="sgd_momentum")
    trace = _Trace()
    trainer = tiny_trainer(
        max_steps=max_steps, max_epochs=-1, callbacks=[trace], **ddp_trainer_kwargs()
    )
    trainer.fit(module, _data(rank))
    return {"steps": trainer.global_step, "hash": param_hash(module), "trace": trace.rows}
