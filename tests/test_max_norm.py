"""Max-norm and the constraint family: projection maths and the callback in a real Trainer."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from lightning_reg.max_norm import (
    MaxNormCallback,
    WeightConstraintCallback,
    max_norm_,
    non_neg_,
    unit_norm_,
)
from tests.helpers.models import MLP, ClassifierModule, SmallCNN, list_loader, tiny_trainer

shapes = st.sampled_from([(4, 3), (5, 2, 3, 3), (7,), (3, 8)])


@settings(deadline=None, max_examples=60)
@given(shapes, st.floats(0.05, 5.0), st.integers(0, 2**31 - 1), st.floats(0.1, 10))
def test_max_norm_projects_outside_units_and_keeps_inside_units_bit_for_bit(shape, r, seed, scale):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * scale
    before = w.clone()
    max_norm_([w], r)
    flat_before = before.reshape(shape[0], -1) if len(shape) > 1 else before.reshape(-1, 1)
    flat_after = w.reshape(shape[0], -1) if len(shape) > 1 else w.reshape(-1, 1)
    norms_before = flat_before.norm(dim=1)
    norms_after = flat_after.norm(dim=1)
    assert torch.all(norms_after <= r * (1 + 1e-6))
    inside = norms_before <= r
    assert torch.equal(flat_after[inside], flat_before[inside])  # bit for bit
    # outside units are scaled onto the sphere, direction kept
    outside = ~inside
    torch.testing.assert_close(norms_after[outside], torch.full_like(norms_after[outside], r))
    expected = flat_before[outside] * (r / norms_before[outside]).unsqueeze(1)
    torch.testing.assert_close(flat_after[outside], expected)


def test_max_norm_unit_is_dim0_for_linear_and_conv():
    lin = nn.Linear(10, 4).weight.detach()  # (out=4, in=10): norm over dim 1
    conv = nn.Conv2d(3, 5, 3).weight.detach()  # (5, 3, 3, 3): norm over dims 1..3
    with torch.no_grad():
        lin.mul_(10)
        conv.mul_(10)
    max_norm_([lin, conv], 1.0)
    torch.testing.assert_close(lin.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(conv.flatten(1).norm(dim=1), torch.ones(5))


def test_dim_none_treats_the_whole_tensor_as_one_vector():
    w = torch.full((4, 4), 1.0)  # whole norm 4, each row norm 2
    max_norm_([w], 3.0, dim=None)
    assert w.norm().item() == pytest.approx(3.0)
    w = torch.full((4, 4), 1.0)
    max_norm_([w], 3.0)  # per unit: rows of norm 2 are inside
    assert torch.equal(w, torch.full((4, 4), 1.0))


def test_explicit_dim_matches_keras_axis_semantics():
    w = torch.randn(6, 4) * 5
    ref = w.clone()
    max_norm_([w], 1.0, dim=0)  # norm over dim 0: each column is a unit
    col = ref.norm(dim=0, keepdim=True)
    torch.testing.assert_close(w, ref * torch.clamp(1.0 / col, max=1.0))


def test_nan_and_inf_units_stay_non_finite():
    w = torch.tensor([[float("nan"), 1.0], [float("inf"), 1.0], [30.0, 40.0]])
    max_norm_([w], 1.0)
    assert math.isnan(w[0, 0]) and w[0, 1] == 1.0
    assert math.isinf(w[1, 0]) and w[1, 1] == 1.0
    torch.testing.assert_close(w[2], torch.tensor([0.6, 0.8]))


def test_unit_norm_and_non_neg():
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0], [float("nan"), 1.0]])
    unit_norm_([w])
    torch.testing.assert_close(w[0], torch.tensor([0.6, 0.8]))
    assert torch.equal(w[1], torch.zeros(2)) and math.isnan(w[2, 0])
    v = torch.tensor([-1.0, 2.0, float("nan")])
    non_neg_([v])
    assert v[0] == 0 and v[1] == 2 and math.isnan(v[2])


def test_stats_count_projected_units():
    w = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    stats = max_norm_([w], 1.0, return_stats=True)
    assert stats["units"].item() == 2 and stats["projected"].item() == 1
    assert stats["max_unit_norm"].item() == pytest.approx(5.0)


# ---------------------------------------------------------------- in a real Trainer


class CheckEveryStep(Callback):
    """Records the largest unit norm of every weight after each training batch."""

    def __init__(self):
        self.max_norms: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        norms = [
            p.detach().flatten(1).norm(dim=1).max()
            for n, p in pl_module.named_parameters()
            if p.ndim >= 2
        ]
        self.max_norms.append(torch.stack(norms).max().item())


def _data(n=64, image=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 6, 6, generator=g) if image else torch.randn(n, 8, generator=g) * 5
    return list_loader(x, torch.randint(0, 3, (n,), generator=g), batch_size=8)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("image", [False, True])
def test_every_unit_stays_in_the_ball_after_every_step(precision, image, tmp_path):
    torch.manual_seed(0)
    r = 0.5
    module = ClassifierModule(SmallCNN() if image else MLP(hidden=(32,)), lr=1.0)
    check = CheckEveryStep()
    trainer = tiny_trainer(
        max_steps=8,
        callbacks=[MaxNormCallback(r), check],
        precision=precision,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=2,
    )
    trainer.fit(module, _data(image=image))
    assert len(check.max_norms) == 8
    assert max(check.max_norms) <= r * (1 + 1e-6)
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "reg/max_norm/projected_fraction" in metrics
    assert "reg/max_norm/max_unit_norm" in metrics


def test_projection_happens_once_per_real_step_under_accumulation():
    calls = []
    callback = MaxNormCallback(0.5)
    original = callback.after_step

    def counting(groups):
        calls.append(1)
        return original(groups)

    callback.after_step = counting  # type: ignore[method-assign]
    trainer = tiny_trainer(max_steps=3, callbacks=[callback], accumulate_grad_batches=2)
    trainer.fit(ClassifierModule(MLP(), lr=1.0), _data())
    assert len(calls) == 3


def test_amp_skipped_step_projects_nothing():
    class InfAtBatch(ClassifierModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if batch_idx == 1 else loss

    projected_at = []
    callback = MaxNormCallback(1e-3)
    original = callback.after_step

    def spy(groups):
        projected_at.append(trainer.fit_loop.epoch_loop.batch_idx)
        return original(groups)

    callback.after_step = spy  # type: ignore[method-assign]
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=16.0))
    trainer = tiny_trainer(max_steps=3, callbacks=[callback], plugins=[plugin])
    trainer.fit(InfAtBatch(MLP(), lr=0.1), _data())
    assert 1 not in projected_at and 0 in projected_at and len(projected_at) >= 2


def test_units_inside_the_ball_are_untouched_during_training():
    torch.manual_seed(0)
    module = ClassifierModule(MLP(hidden=(16,)), lr=0.0)  # lr 0: weights never move on their own
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = tiny_trainer(max_steps=3, callbacks=[MaxNormCallback(100.0)])
    trainer.fit(module, _data())
    for n, p in module.named_parameters():
        assert torch.equal(p, before[n]), n


def test_constraint_callback_non_neg_in_training():
    module = ClassifierModule(MLP(), lr=0.5)
    trainer = tiny_trainer(max_steps=4, callbacks=[WeightConstraintCallback("non_neg")])
    trainer.fit(module, _data())
    assert all((p >= 0).all() for p in module.parameters() if p.ndim >= 2)


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: MaxNormCallback(0.0), "max_norm"),
        (lambda: MaxNormCallback(-1.0), "max_norm"),
        (lambda: MaxNormCallback(float("nan")), "max_norm"),
        (lambda: MaxNormCallback(float("inf")), "max_norm"),
        (lambda: MaxNormCallback(1.0, dim="rows"), "dim"),
        (lambda: MaxNormCallback(1.0, params="everything"), "params"),
        (lambda: WeightConstraintCallback("clip"), "constraint"),
        (lambda: max_norm_([torch.ones(2)], 0.0), "max_norm"),
    ],
)
def test_bad_input_raises_value_error(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


# ------------------------------------------------- issue 10: inputs, layouts and precisions


def test_bare_tensor_is_one_tensor_not_an_iterable_of_rows():
    w = torch.tensor([[3.0, 4.0]])
    max_norm_(w, 1.0)
    torch.testing.assert_close(w, torch.tensor([[0.6, 0.8]]))
    u = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    unit_norm_(u)
    torch.testing.assert_close(u, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    v = torch.tensor([[-1.0, 2.0]])
    non_neg_(v)
    assert torch.equal(v, torch.tensor([[0.0, 2.0]]))


def test_module_input_uses_its_weights_and_conv_transpose_units_are_dim_1():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(3, 5, 3), nn.BatchNorm2d(5), nn.Conv2d(5, 4, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10.0)
    bias, bn = model[0].bias.detach().clone(), model[1].weight.detach().clone()
    stats = max_norm_(model, 1.0, return_stats=True)
    # ConvTranspose weight is (in=3, out=5, k, k): its 5 units are along dim 1
    unit_norms = model[0].weight.detach().transpose(0, 1).flatten(1).norm(dim=1)
    torch.testing.assert_close(unit_norms, torch.ones(5))
    torch.testing.assert_close(model[2].weight.detach().flatten(1).norm(dim=1), torch.ones(4))
    assert torch.equal(model[0].bias, bias) and torch.equal(model[1].weight, bn)
    assert stats is not None and stats["units"].item() == 5 + 4


@pytest.mark.parametrize("constraint", ["max_norm", "unit_norm"])
def test_float64_parameters_under_64_true(constraint):
    torch.manual_seed(0)
    module = ClassifierModule(MLP(hidden=(16,)), lr=1.0)
    callback = WeightConstraintCallback(constraint, max_norm=0.5)
    trainer = tiny_trainer(max_steps=3, callbacks=[callback], precision="64-true")
    trainer.fit(module, _data())
    norms = torch.cat([p.detach().norm(dim=1) for p in module.parameters() if p.ndim >= 2])
    assert norms.dtype == torch.float64
    target = torch.full_like(norms, 0.5 if constraint == "max_norm" else 1.0)
    if constraint == "max_norm":
        assert (norms <= target * (1 + 1e-12)).all()
    else:
        torch.testing.assert_close(norms, target)


def test_bfloat16_norms_accumulate_in_float32():
    w = torch.full((2, 4096), 0.01, dtype=torch.bfloat16)  # ‖row‖ = 0.64: inside r = 0.7
    before = w.clone()
    stats = max_norm_(w, 0.7, return_stats=True)
    assert stats is not None and stats["projected"].item() == 0
    assert torch.equal(w, before)
    assert stats["max_unit_norm"].item() == pytest.approx(0.64, rel=1e-2)


def test_function_plan_is_reused_only_for_the_same_live_tensors():
    w = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    max_norm_(w, 1.0)
    torch.testing.assert_close(w, torch.tensor([[0.6, 0.8], [0.3, 0.4]]))
    w.data = torch.tensor([[6.0, 8.0, 0.0]], dtype=torch.float64)  # same object, new shape/dtype
    max_norm_(w, 1.0)
    torch.testing.assert_close(w, torch.tensor([[0.6, 0.8, 0.0]], dtype=torch.float64))
    ref = __import__("weakref").ref(w)
    del w  # the cached plan holds no reference: the tensor is freed
    assert ref() is None
    v = torch.tensor([[0.0, 5.0]])
    max_norm_(v, 2.0)
    torch.testing.assert_close(v, torch.tensor([[0.0, 2.0]]))


def test_tensor_subclasses_take_the_unbuffered_path_with_the_same_result():
    class Sub(torch.Tensor):  # stands in for DTensor shards, which a flat buffer cannot view
        pass

    torch.manual_seed(0)
    plain = torch.randn(4, 3, 2) * 3
    sub = torch.Tensor._make_subclass(Sub, plain.clone())
    stats = max_norm_([plain, torch.randn(5) * 3], 1.0, return_stats=True)
    sub_stats = max_norm_([sub, torch.randn(5) * 3], 1.0, return_stats=True)
    torch.testing.assert_close(torch.Tensor(sub), plain)
    assert stats is not None and sub_stats is not None
    assert float(sub_stats["units"]) == float(stats["units"]) == 4 + 5
