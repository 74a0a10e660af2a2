"""Scripted-metric modules and weight capture for the early-stopping tests."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import lightning.pytorch as pl
import torch

from tests.helpers.models import ClassifierModule


class ScriptedModule(ClassifierModule):
    """Trains for real, but its validation logs ``stream[epoch]`` as ``key``.

    Ranks other than zero log ``other_rank_stream`` instead when given (no ``sync_dist``), to
    make ranks disagree on purpose. ``train_stream`` (optional) is logged as ``train_err`` at
    training-epoch end.
    """

    def __init__(
        self,
        stream: Sequence[float],
        key: str = "val_loss",
        train_stream: Sequence[float] | None = None,
        other_rank_stream: Sequence[float] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.stream = list(stream)
        self.key = key
        self.train_stream = None if train_stream is None else list(train_stream)
        self.other_rank_stream = None if other_rank_stream is None else list(other_rank_stream)

    def validation_step(self, batch, batch_idx):
        stream = self.stream
        if self.global_rank > 0 and self.other_rank_stream is not None:
            stream = self.other_rank_stream
        self.log(self.key, torch.tensor(stream[self.current_epoch], dtype=torch.float32))

    def on_train_epoch_end(self):
        if self.train_stream is not None:
            self.log("train_err", torch.tensor(self.train_stream[self.current_epoch]))


class CaptureWeights(pl.Callback):
    """Records a copy of the state dict after each validation (the weights that were checked)."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, dict[str, torch.Tensor]] = {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            state = pl_module.state_dict()
            self.by_epoch[trainer.current_epoch] = {k: v.detach().clone() for k, v in state.items()}


def state_hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()
