"""Label smoothing: the function against independent references, the callback in a Trainer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as hs

from lightning_reg.core.schedules import LinearSchedule
from lightning_reg.label_smoothing import LabelSmoothingCallback, smooth_labels
from tests.helpers.models import SmallCNN, list_loader, tiny_trainer
from tests.helpers.models_rewriters import RecordingModule, image_data

FAST = settings(max_examples=30, deadline=None)


@FAST
@given(
    labels=hs.lists(hs.integers(0, 9), min_size=1, max_size=12),
    extra=hs.integers(0, 5),
    alpha=hs.floats(0.0, 1.0),
)
def test_smooth_labels_matches_formula(labels, extra, alpha):
    k = max(labels) + 1 + extra
    y = torch.tensor(labels)
    expected = (1 - alpha) * np.eye(k)[labels] + alpha / k  # independent: numpy one-hot
    got = smooth_labels(y, alpha, k)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.sum(1), torch.ones(len(labels)))


@FAST
@given(
    b=hs.integers(1, 6), k=hs.integers(1, 7), alpha=hs.floats(0.0, 1.0), seed=hs.integers(0, 999)
)
def test_cross_entropy_equals_torch_label_smoothing(b, k, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, k, (b,), generator=g)
    ours = F.cross_entropy(logits, smooth_labels(y, alpha, k).double())
    ref = F.cross_entropy(logits, y, label_smoothing=alpha)
    torch.testing.assert_close(ours, ref)


@FAST
@given(b=hs.integers(1, 5), k=hs.integers(2, 6), alpha=hs.floats(0.0, 1.0), seed=hs.integers(0, 99))
def test_soft_targets_and_extra_dims(b, k, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    soft = torch.softmax(torch.randn(b, k, generator=g), 1)
    torch.testing.assert_close(smooth_labels(soft, alpha, k), (1 - alpha) * soft + alpha / k)
    seq = torch.randint(0, k, (b, 3), generator=g)  # (B, L) labels -> (B, K, L) as F expects
    logits = torch.randn(b, k, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        F.cross_entropy(logits, smooth_labels(seq, alpha, k).double()),
        F.cross_entropy(logits, seq, label_smoothing=alpha),
    )


@pytest.mark.parametrize("bad", [-0.1, 1.01, math.nan, math.inf])
def test_alpha_out_of_range(bad):
    with pytest.raises(ValueError, match="`alpha` must be"):
        smooth_labels(torch.tensor([0]), bad, 2)
    with pytest.raises(ValueError, match="`alpha` must be"):
        LabelSmoothingCallback(bad)


def test_label_errors():
    with pytest.raises(ValueError, match=r"Class labels must be in \[0, 2\].*\[0, 3\]"):
        smooth_labels(torch.tensor([0, 3]), 0.1, 3)
    with pytest.raises(ValueError, match=r"Class labels must be in"):
        smooth_labels(torch.tensor([-1, 0]), 0.1, 3)
    with pytest.raises(ValueError, match="num_classes=3"):
        smooth_labels(torch.rand(2, 4), 0.1, 3)
    with pytest.raises(ValueError, match="num_classes"):
        LabelSmoothingCallback(num_classes=0)


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


def _fit(callbacks, *, model=None, epochs=1, precision="32-true", loader=None, val=True):
    x, y = image_data(16)
    module = RecordingModule(model or SmallCNN(in_channels=3, num_classes=4))
    trainer = tiny_trainer(
        max_epochs=epochs, precision=precision, callbacks=callbacks, log_every_n_steps=1
    )
    trainer.fit(
        module,
        loader or list_loader(x, y, batch_size=8),
        list_loader(x, y, batch_size=8) if val else None,
    )
    return module, trainer, (x, y)


def test_callback_changes_training_targets_only(precision):
    cb = LabelSmoothingCallback(0.2)  # num_classes inferred from the model output (K=4)
    module, trainer, (x, y) = _fit([cb], precision=precision)
    for step, (xb, yb) in enumerate(module.train_batches):
        sl = slice(8 * step, 8 * step + 8)
        assert torch.equal(xb, x[sl])
        assert yb.dtype == torch.float32
        expected = 0.8 * F.one_hot(y[sl], 4).float() + 0.2 / 4
        torch.testing.assert_close(yb, expected)
    for step, (_, yb) in enumerate(module.val_batches):
        sl = slice(8 * step, 8 * step + 8)
        assert torch.equal(yb, y[sl]) and yb.dtype == torch.int64
    assert trainer.callback_metrics["reg/label_smoothing/alpha"].item() == pytest.approx(0.2)
    assert cb.num_classes == 4 and cb.state_dict() == {"num_classes": 4}  # inferred K is saved


def test_inferred_num_classes_round_trips_through_state():
    restored = LabelSmoothingCallback(0.1)
    restored.load_state_dict({"num_classes": 4})
    assert restored.num_classes == 4
    torch.testing.assert_close(
        restored.smooth(torch.tensor([3])), smooth_labels(torch.tensor([3]), 0.1, 4)
    )
    given = LabelSmoothingCallback(0.1, num_classes=5)
    given.load_state_dict({"num_classes": 4})  # an explicit num_classes wins
    assert given.num_classes == 5
    with pytest.raises(RuntimeError, match="no num_classes yet"):
        LabelSmoothingCallback(0.1).smooth(torch.tensor([0]))


def test_num_classes_inference_leaves_model_state_alone():
    x, y = image_data(8)
    module = RecordingModule(SmallCNN(in_channels=3, num_classes=4))
    module.model.features[1].eval()  # a user-frozen BN must stay in eval mode
    before = {k: v.clone() for k, v in module.state_dict().items()}
    cb = LabelSmoothingCallback(0.1)
    trainer = tiny_trainer()
    k = cb._infer_num_classes(trainer, module, [x, y], y)
    assert k == 4
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert module.training and module.model.features[4].training
    assert not module.model.features[1].training


def test_num_classes_inference_failure_says_what_to_do():
    class DictModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3, 4)

        def forward(self, x):
            return {"logits": self.head(x.mean(dim=(2, 3)))}

    with pytest.raises(RuntimeError, match=r"AttributeError.*Pass `num_classes=`"):
        _fit([LabelSmoothingCallback(0.1)], model=DictModel(), val=False)


def test_schedule_and_bad_schedule():
    cb = LabelSmoothingCallback(num_classes=4, schedule=LinearSchedule(0.0, 0.2, 2, unit="step"))
    module, _, (_, y) = _fit([cb], epochs=2, val=False)
    alphas = [0.0, 0.1, 0.2, 0.2]
    for step, (_, yb) in enumerate(module.train_batches):
        sl = slice(8 * (step % 2), 8 * (step % 2) + 8)
        a = alphas[step]
        torch.testing.assert_close(yb, (1 - a) * F.one_hot(y[sl], 4).float() + a / 4)
    bad = LabelSmoothingCallback(num_classes=4, schedule=LinearSchedule(0.5, 1.5, 1, unit="step"))
    with pytest.raises(RuntimeError, match=r"alpha must be in \[0, 1\]"):
        _fit([bad], epochs=1, val=False)


def test_tuple_batch_and_bad_label_in_trainer():
    from torch.utils.data import DataLoader, default_collate

    from tests.helpers.models import ListDataset

    x, y = image_data(8)
    tuples = DataLoader(
        ListDataset(x, y), batch_size=8, collate_fn=lambda b: tuple(default_collate(b))
    )
    with pytest.raises(RuntimeError, match="tuple"):
        _fit([LabelSmoothingCallback(num_classes=4)], loader=tuples, val=False)
    with pytest.raises(RuntimeError, match=r"Class labels must be in \[0, 2\]"):
        _fit([LabelSmoothingCallback(num_classes=3)], val=False)


def test_numpy_scalars_are_accepted():
    cb = LabelSmoothingCallback(np.float32(0.25), num_classes=np.int64(4))
    assert cb.alpha == pytest.approx(0.25) and isinstance(cb.alpha, float)
    torch.testing.assert_close(
        cb.smooth(torch.tensor([1])), smooth_labels(torch.tensor([1]), 0.25, 4)
    )


def test_labels_are_range_checked_once_even_off_the_cpu(monkeypatch):
    """The first batch's labels are checked on any device (one host read); later steps are not."""
    import lightning_reg.label_smoothing as ls

    calls = []
    monkeypatch.setattr(ls, "check_labels", lambda y, k: calls.append(k))
    cb = LabelSmoothingCallback(0.1, num_classes=3)
    for _ in range(3):
        cb.smooth(torch.tensor([0, 2]))
    assert calls == [3]
