"""L1 / L2 / elastic net: functions against autograd, callbacks against torch.optim."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from lightning_reg.core.params import ParamSelection
from lightning_reg.penalties import (
    ElasticNetCallback,
    L1Callback,
    L2Callback,
    WeightPenaltyCallback,
    add_penalty_grad_,
    elastic_net_penalty,
    l1_penalty,
    l2_penalty,
    soft_threshold_,
)
from tests.helpers.models import (
    MLP,
    ClassifierModule,
    list_loader,
    random_classification,
    tiny_trainer,
)

finite = st.floats(-10, 10, allow_nan=False, width=32)
tensor_lists = st.lists(
    st.lists(finite, min_size=1, max_size=12).map(lambda v: torch.tensor(v)), min_size=1, max_size=4
)
strengths = st.floats(0, 5, allow_nan=False)


# ---------------------------------------------------------------- pure functions


@given(tensor_lists, strengths, strengths)
def test_penalty_values_match_reference_formula(tensors, l1, l2):
    expected_l1 = l1 * sum(t.abs().sum() for t in tensors)
    expected_l2 = l2 / 2 * sum((t.double() ** 2).sum() for t in tensors)
    torch.testing.assert_close(
        l1_penalty(tensors, l1).double(), expected_l1.double(), rtol=1e-5, atol=1e-4
    )
    torch.testing.assert_close(l2_penalty(tensors, l2).double(), expected_l2, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        elastic_net_penalty(tensors, l1, l2).double(),
        (expected_l1 + expected_l2).double(),
        rtol=1e-5,
        atol=1e-4,
    )


@given(tensor_lists, strengths, strengths)
def test_penalty_gradient_equals_autograd_of_the_penalty(tensors, l1, l2):
    params = [t.clone().requires_grad_(True) for t in tensors]
    # autograd reference: gradient of l1*sum|w| + l2/2*sum w^2 (torch's sign(0) = 0 subgradient)
    ref = [p.detach().clone().requires_grad_(True) for p in params]
    loss = sum(l1 * r.abs().sum() + l2 / 2 * (r**2).sum() for r in ref)
    loss.backward()
    for p in params:
        p.grad = torch.zeros_like(p)
    add_penalty_grad_(params, l1=l1, l2=l2)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-5)


@given(tensor_lists, st.floats(0, 3, allow_nan=False))
def test_soft_threshold_matches_formula_and_gives_exact_zeros(tensors, t):
    expected = [torch.sign(x) * torch.clamp(x.abs() - t, min=0) for x in tensors]
    got = [x.clone() for x in tensors]
    soft_threshold_(got, t)
    for g, e, x in zip(got, expected, tensors):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-6)
        assert torch.all(g[x.abs() <= t] == 0)


def test_soft_threshold_keeps_nan_visible():
    w = torch.tensor([float("nan"), 0.05, 2.0, float("inf")])
    soft_threshold_([w], 0.1)
    assert math.isnan(w[0]) and w[1] == 0 and w[2] == pytest.approx(1.9) and math.isinf(w[3])


def test_functions_accept_a_module_and_use_weights_only():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    expected = 0.5 * (model[0].weight ** 2).sum()
    torch.testing.assert_close(l2_penalty(model, 1.0), expected)


# ---------------------------------------------------------------- callbacks in a real Trainer


def _fit(module, callbacks=(), steps=20, accumulate=1, batch_size=8, **kw):
    x, y = random_classification(n=batch_size * steps * accumulate, seed=1)
    trainer = tiny_trainer(
        max_steps=steps,
        callbacks=list(callbacks),
        accumulate_grad_batches=accumulate,
        **kw,
    )
    trainer.fit(module, list_loader(x, y, batch_size=batch_size))
    return module


def _pair(**kw):
    torch.manual_seed(0)
    model = MLP(hidden=(16, 16))
    return ClassifierModule(copy.deepcopy(model), **kw), model


def _assert_same_params(a: nn.Module, b: nn.Module, atol=1e-6):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=atol, msg=name)


@pytest.mark.parametrize("accumulate", [1, 4])
def test_coupled_l2_equals_sgd_weight_decay(accumulate):
    lam = 0.05
    ours, model = _pair(lr=0.1, optimizer="sgd_momentum")
    ref = ClassifierModule(copy.deepcopy(model), lr=0.1, optimizer="sgd_momentum", weight_decay=lam)
    _fit(ours, [L2Callback(lam, params="all")], accumulate=accumulate)
    _fit(ref, accumulate=accumulate)
    _assert_same_params(ours, ref)
    # and it did something: differs from the unregularized run
    plain = _fit(ClassifierModule(copy.deepcopy(model), lr=0.1, optimizer="sgd_momentum"))
    assert not torch.allclose(ours.model[0].weight, plain.model[0].weight, atol=1e-4)


@pytest.mark.parametrize("accumulate", [1, 4])
def test_decoupled_l2_with_adam_equals_adamw(accumulate):
    lam = 0.1
    ours, model = _pair(lr=0.01, optimizer="adam")
    ref = ClassifierModule(copy.deepcopy(model), lr=0.01, optimizer="adamw", weight_decay=lam)
    _fit(ours, [L2Callback(lam, decoupled=True, params="all")], accumulate=accumulate)
    _fit(ref, accumulate=accumulate)
    _assert_same_params(ours, ref)


@pytest.mark.parametrize("accumulate", [1, 4])
@pytest.mark.parametrize("kind", ["l1", "elastic_net", "l2_weights"])
def test_coupled_penalties_equal_the_term_added_to_the_loss(kind, accumulate):
    l1, l2 = 1e-2, 5e-2
    if kind == "l1":
        callback, term = L1Callback(l1), lambda m: l1_penalty(m, l1)
    elif kind == "elastic_net":
        callback, term = ElasticNetCallback(l1, l2), lambda m: elastic_net_penalty(m, l1, l2)
    else:
        callback, term = L2Callback(l2), lambda m: l2_penalty(m, l2)
    ours, model = _pair(lr=0.1, optimizer="sgd_momentum")
    ref = ClassifierModule(copy.deepcopy(model), lr=0.1, optimizer="sgd_momentum", extra_loss=term)
    _fit(ours, [callback], accumulate=accumulate)
    _fit(ref, accumulate=accumulate)
    _assert_same_params(ours, ref)


def test_penalty_applies_before_gradient_clipping():
    """With clipping, the penalty gradient is clipped together with the loss gradient."""
    lam = 0.5
    ours, model = _pair(lr=0.1)
    ref = ClassifierModule(copy.deepcopy(model), lr=0.1, extra_loss=lambda m: l2_penalty(m, lam))
    clip = dict(gradient_clip_val=0.05, gradient_clip_algorithm="norm")
    _fit(ours, [L2Callback(lam)], steps=5, **clip)
    _fit(ref, steps=5, **clip)
    _assert_same_params(ours, ref)


def test_default_selection_skips_biases_and_norm_layers():
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    module = ClassifierModule(model, lr=0.0)  # lr 0: only decoupled decay could move weights
    before = copy.deepcopy(model)
    module.lr = 0.1
    module.optimizer_name = "adam"
    _fit(module, [L2Callback(0.5, decoupled=True)], steps=1)
    assert not torch.equal(model[0].weight, before[0].weight)
    names = [s.name for s in ParamSelection("weights").select(model)]
    assert names == ["0.weight", "3.weight"]


def test_decoupled_decay_uses_each_groups_lr():
    class TwoGroups(ClassifierModule):
        def configure_optimizers(self):
            first, last = self.model[0], self.model[-1]
            return torch.optim.SGD(
                [
                    {"params": first.parameters(), "lr": 0.0},
                    {"params": last.parameters(), "lr": 0.1},
                ]
            )

    torch.manual_seed(0)
    module = TwoGroups(MLP(hidden=(16,)))
    first = module.model[0].weight.detach().clone()
    _fit(module, [L2Callback(0.5, decoupled=True)], steps=3)
    assert torch.equal(module.model[0].weight, first)  # lr 0 group: no decay at all


def test_proximal_l1_gives_exact_zeros_and_logs_zero_fraction(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    module = ClassifierModule(MLP(hidden=(32,)), lr=0.1)
    logger = CSVLogger(tmp_path)
    _fit(module, [L1Callback(0.1, proximal=True)], steps=20, logger=logger, log_every_n_steps=5)
    w = module.model[0].weight
    assert (w == 0).float().mean() > 0.3
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "reg/l1/zero_fraction" in metrics and "reg/l1/penalty" in metrics


def test_proximal_l1_on_breast_cancer_is_sparse_and_accurate():
    """Real data: >= 50% exact zeros, validation accuracy within 2 points of unregularized."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    tr, va = perm[:400], perm[400:]

    def train(callbacks):
        torch.manual_seed(0)
        model = MLP(in_features=30, hidden=(64,), num_classes=2)  # over-complete
        module = ClassifierModule(model, lr=0.05, optimizer="sgd_momentum")
        trainer = tiny_trainer(max_epochs=30, callbacks=callbacks)
        trainer.fit(module, list_loader(x[tr], y[tr], batch_size=50))
        with torch.no_grad():
            acc = (module(x[va]).argmax(1) == y[va]).float().mean().item()
        weights = ParamSelection("weights").parameters(model)
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        return acc, zeros

    base_acc, base_zeros = train([])
    l1_acc, l1_zeros = train([L1Callback(0.02, proximal=True)])
    assert base_zeros == 0
    assert l1_zeros >= 0.5, l1_zeros
    assert l1_acc >= base_acc - 0.02, (l1_acc, base_acc)


def test_steps_skipped_by_amp_neither_decay_nor_threshold():
    """Force an inf gradient under 16-mixed with a GradScaler: the step is skipped entirely."""

    class InfAtStep(ClassifierModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if batch_idx == 2 else loss

    snapshots = {}

    from lightning.pytorch.callbacks import Callback

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots[batch_idx] = [p.detach().clone() for p in pl_module.parameters()]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 2:
                after = [p.detach() for p in pl_module.parameters()]
                snapshots["changed"] = any(
                    not torch.equal(a, b) for a, b in zip(after, snapshots[2])
                )

    torch.manual_seed(0)
    module = InfAtStep(MLP(hidden=(16,)), lr=0.1, optimizer="adam")
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=16.0))
    callbacks = [
        L2Callback(0.5, decoupled=True),
        L1Callback(0.5, proximal=True),
        Record(),
    ]
    _fit(module, callbacks, steps=4, plugins=[plugin])
    assert snapshots["changed"] is False
    assert not torch.equal(snapshots[3][0], snapshots[0][0])  # other steps did move


# ---------------------------------------------------------------- resume, validation


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    def callbacks():
        return [
            L2Callback(0.05, decoupled=True),
            L1Callback(1e-3, proximal=True),
            ElasticNetCallback(1e-3, 1e-2),
        ]

    x, y = random_classification(n=8 * 6, seed=1)
    loader = lambda: list_loader(x, y, batch_size=8)  # noqa: E731
    full, model = _pair(lr=0.01, optimizer="adam")
    tiny_trainer(max_epochs=2, callbacks=callbacks()).fit(full, loader())

    first = ClassifierModule(copy.deepcopy(model), lr=0.01, optimizer="adam")
    trainer = tiny_trainer(max_epochs=1, callbacks=callbacks())
    trainer.fit(first, loader())
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)

    resumed = ClassifierModule(copy.deepcopy(model), lr=0.01, optimizer="adam")
    trainer = tiny_trainer(max_epochs=2, callbacks=callbacks())
    trainer.fit(resumed, loader(), ckpt_path=ckpt)
    assert trainer.global_step == 12
    _assert_same_params(resumed, full)


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: L2Callback(-1.0), "strength"),
        (lambda: L2Callback(float("nan")), "strength"),
        (lambda: L2Callback(float("inf")), "strength"),
        (lambda: L1Callback(-0.1), "strength"),
        (lambda: ElasticNetCallback(float("nan"), 0.1), "l1"),
        (lambda: ElasticNetCallback(0.1, -2.0), "l2"),
        (lambda: L2Callback(0.1, params="biases"), "params"),
        (lambda: WeightPenaltyCallback(l1=0.0, proximal=True), "proximal"),
        (lambda: WeightPenaltyCallback(l2=0.0, decoupled=True), "decoupled"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_wrong_types_raise_type_error():
    with pytest.raises(TypeError, match="strength"):
        L2Callback("0.1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="params"):
        L2Callback(0.1, params=3)  # type: ignore[arg-type]


def test_selection_that_matches_nothing_fails_at_fit_start():
    module = ClassifierModule(MLP())
    with pytest.raises(RuntimeError, match="matched no parameter"):
        _fit(module, [L2Callback(0.1, params=ParamSelection(include=("nothing.*",)))], steps=1)


def test_nan_loss_is_not_masked():
    class NaNLoss(ClassifierModule):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * float("nan")

    module = NaNLoss(MLP(), lr=0.1)
    _fit(module, [L2Callback(0.1), L1Callback(0.1, proximal=True)], steps=1)
    assert torch.isnan(module.model[0].weight).all()


def test_half_precision_sums_accumulate_in_float32_and_float64_stays_float64():
    ones = torch.ones(300, 300, dtype=torch.float16)
    assert l1_penalty([ones]).item() == 90000.0  # an fp16 sum overflows to inf
    assert l2_penalty([ones.bfloat16()], 2.0).item() == 90000.0
    mixed = [torch.ones(3, dtype=torch.float64), torch.ones(2, dtype=torch.bfloat16)]
    got = elastic_net_penalty(mixed, 1.0, 2.0)
    assert got.dtype == torch.float64 and got.item() == pytest.approx(10.0, rel=1e-6)
    assert l2_penalty(torch.full((2,), 0.1, dtype=torch.float64)).dtype == torch.float64
