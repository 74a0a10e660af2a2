"""Pins every private Lightning/torch name that ``core/compat.py`` wraps."""

import lightning.pytorch as pl
import pytest
import torch

from lightning_reg.core import compat
from tests.helpers.models import ClassifierModule, list_loader, random_classification, tiny_trainer


def test_foreach_aliases_are_the_torch_kernels() -> None:
    xs = [torch.tensor([3.0, -4.0]), torch.tensor([1.0])]
    assert torch.allclose(torch.stack(compat.foreach_norm(xs)), torch.tensor([5.0, 1.0]))
    assert compat.foreach_sign(xs)[0].tolist() == [1.0, -1.0]
    compat.foreach_mul_(xs, 2.0)
    compat.foreach_add_(xs, [torch.ones(2), torch.ones(1)], alpha=-1.0)
    assert xs[0].tolist() == [5.0, -9.0]
    compat.foreach_clamp_min_(xs, 0.0)
    compat.foreach_clamp_max_(xs, 2.0)
    assert xs[0].tolist() == [2.0, 0.0]
    compat.foreach_sub_(xs, compat.foreach_clamp_min(xs, 1.5))
    assert xs[0].tolist() == [0.0, -1.5]


def test_private_base_classes_cover_the_public_layers() -> None:
    from torch import nn

    for layer in (nn.BatchNorm1d(2), nn.BatchNorm2d(2), nn.SyncBatchNorm(2), nn.LazyBatchNorm1d()):
        assert isinstance(layer, compat.BatchNormBase)
    assert isinstance(nn.InstanceNorm2d(2), compat.NormBase)
    assert not isinstance(nn.InstanceNorm2d(2), compat.BatchNormBase)
    assert not isinstance(nn.LayerNorm(2), compat.NormBase)
    for layer in (nn.Dropout(), nn.Dropout2d(), nn.AlphaDropout(), nn.FeatureAlphaDropout()):
        assert isinstance(layer, compat.DropoutBase)


def test_state_dict_metadata_is_keyed_by_module_path() -> None:
    from torch import nn

    metadata = compat.state_dict_metadata(nn.Sequential(nn.Linear(2, 2)).state_dict())
    assert metadata is not None and "0" in metadata and "version" in metadata["0"]


def test_grad_scaler_scale_is_a_tensor_after_first_scale() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    assert compat.grad_scaler_scale(scaler) is None
    scaler.scale(torch.ones(()))
    assert float(compat.grad_scaler_scale(scaler)) == 8.0


class _Probe(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append(
            (
                compat.attached_trainer(pl_module) is trainer,
                compat.should_update_logs(trainer),
                compat.batches_that_stepped(trainer),
                trainer.global_step,
            )
        )


def test_trainer_internals_are_reachable() -> None:
    probe = _Probe()
    model = ClassifierModule()
    assert compat.attached_trainer(model) is None
    x, y = random_classification()
    trainer = tiny_trainer(max_steps=3, log_every_n_steps=2, callbacks=[probe])
    trainer.fit(model, list_loader(x, y))
    assert [s[0] for s in probe.seen] == [True, True, True]
    assert [s[1] for s in probe.seen] == [False, True, False]
    # `_batches_that_stepped` is bumped after on_train_batch_end; global_step before it.
    assert [s[2] for s in probe.seen] == [0, 1, 2]
    assert [s[3] for s in probe.seen] == [1, 2, 3]


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
