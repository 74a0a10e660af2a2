"""The 2-rank DDP scenario for ``EarlyStoppingCallback`` (models live in tests/helpers)."""

from __future__ import annotations

import torch

from lightning_reg.early_stopping import EarlyStoppingCallback
from tests.helpers.ddp import ddp_trainer_kwargs
from tests.helpers.models import list_loader, random_classification, tiny_trainer
from tests.helpers.models_early_stopping import CaptureWeights, ScriptedModule, state_hash


def fit_ddp_scripted(rank: int, stream: list[float], patience: int, max_epochs: int):
    """Both ranks log *different* values; the callback must follow rank zero on both."""
    torch.manual_seed(0)
    x, y = random_classification(64, seed=1)
    module = ScriptedModule(stream, other_rank_stream=stream[::-1], lr=0.2)
    es = EarlyStoppingCallback("val_loss", patience=patience)
    capture = CaptureWeights()
    trainer = tiny_trainer(
        max_epochs=max_epochs, callbacks=[es, capture], limit_val_batches=1, **ddp_trainer_kwargs()
    )
    trainer.fit(module, list_loader(x, y, 16), list_loader(x[:16], y[:16], 16))
    return {
        "stopped_epoch": es.stopped_epoch,
        "current_epoch": trainer.current_epoch,
        "best_epoch": es.best_epoch,
        "final": state_hash(module.state_dict()),
        "best_snapshot": state_hash(capture.by_epoch[es.best_epoch]),
        "last_snapshot": state_hash(capture.by_epoch[max(capture.by_epoch)]),
        "saves": es.best_weights.saves,
    }
