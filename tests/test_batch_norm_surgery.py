from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_reg import (
    BatchNormFreezeCallback,
    add_batch_norm,
    batch_norm_surgery,
    ghost_batch_norm,
    precise_batch_norm,
)
from lightning_reg.batch_norm_surgery import BatchNormAfter, remove_batch_norm
from tests.helpers.models import (
    MLP,
    ClassifierModule,
    SmallCNN,
    list_loader,
    random_classification,
    tiny_trainer,
)
from tests.helpers.models_batch_norm import bn_mlp


def test_add_batch_norm_keys_and_both_ways():
    torch.manual_seed(0)
    original = MLP(8, (16, 16), 3)
    model = MLP(8, (16, 16), 3)
    model.load_state_dict(original.state_dict())
    changes = add_batch_norm(model)
    assert [c.path for c in changes] == ["0", "2"]  # the head (4) is skipped
    sd = model.state_dict()
    for k in original.state_dict():
        assert k in sd
    extra = sorted(set(sd) - set(original.state_dict()))
    assert extra == sorted(
        f"{i}.bn.{n}"
        for i in (0, 2)
        for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    )
    missing, unexpected = model.load_state_dict(original.state_dict(), strict=False)
    # torch fills a missing num_batches_tracked itself (old-checkpoint compatibility)
    assert sorted(missing) == [k for k in extra if "num_batches" not in k] and not unexpected
    original.load_state_dict({k: v for k, v in sd.items() if k not in extra})
    model.train()
    h = model[0](torch.randn(64, 8) * 5 + 3)
    assert torch.allclose(h.mean(0), torch.zeros(16), atol=1e-5)
    with pytest.raises(RuntimeError, match="already has BatchNorm inserted"):
        add_batch_norm(model)
    remove_batch_norm(model)
    assert [type(m) for m in model] == [type(m) for m in original]
    with pytest.raises(RuntimeError, match="already has BatchNorm layers"):
        add_batch_norm(SmallCNN())
    changes = add_batch_norm(SmallCNN(), allow_existing=True)  # the head (last Linear) is skipped
    assert [c.path for c in changes] == ["features.0", "features.3"]


def test_batch_norm_after_linear_on_sequences_and_conv():
    layer = BatchNormAfter(nn.Linear(4, 6))
    out = layer(torch.randn(3, 5, 4) * 4)
    assert out.shape == (3, 5, 6)
    assert torch.allclose(out.reshape(-1, 6).mean(0), torch.zeros(6), atol=1e-5)
    conv = BatchNormAfter(nn.Conv2d(2, 3, 3))
    assert isinstance(conv.bn, nn.BatchNorm2d)
    with pytest.raises(TypeError, match="BatchNormAfter supports"):
        BatchNormAfter(nn.ReLU())
    with pytest.raises(TypeError, match="after"):
        add_batch_norm(MLP(), after=(nn.ReLU,))


def test_batch_norm_freeze_callback():
    torch.manual_seed(0)
    x, y = random_classification(32, seed=4)
    module = ClassifierModule(bn_mlp())
    seen: list[tuple[int, torch.Tensor]] = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append((trainer.current_epoch, pl_module.model[1].running_mean.clone()))

    trainer = tiny_trainer(
        max_epochs=3, callbacks=[BatchNormFreezeCallback(1), Probe()], log_every_n_steps=1
    )
    trainer.fit(module, list_loader(x, y, batch_size=8), list_loader(x, y, batch_size=8))
    epoch0 = [m for e, m in seen if e == 0]
    later = [m for e, m in seen if e >= 1]
    assert not torch.equal(epoch0[0], epoch0[-1])  # epoch 0 still updates
    assert all(torch.equal(m, epoch0[-1]) for m in later)  # frozen afterwards
    assert trainer.logged_metrics["reg/batch_norm/frozen"].item() == 1.0
    with pytest.raises(ValueError, match="epoch"):
        BatchNormFreezeCallback(-1)


def test_old_module_path_is_a_deprecated_alias():
    import lightning_reg.batch_norm as old
    from lightning_reg import GhostBatchNormCallback

    with pytest.warns(DeprecationWarning, match="lightning_reg.ghost_batch_norm"):
        assert old.GhostBatchNormCallback is GhostBatchNormCallback
    with pytest.warns(DeprecationWarning, match="lightning_reg.batch_norm_surgery"):
        assert old.add_batch_norm is add_batch_norm
    for module in (ghost_batch_norm, precise_batch_norm, batch_norm_surgery):
        for name in module.__all__:  # every public name of the old module still resolves
            with pytest.warns(DeprecationWarning, match=rf"batch_norm\.{name} is deprecated"):
                assert getattr(old, name) is getattr(module, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="_GhostAwareSyncBatchNorm"):
            old._GhostAwareSyncBatchNorm  # noqa: B018
