from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_reg import GhostBatchNorm1d, PreciseBatchNormCallback
from lightning_reg.precise_batch_norm import merge_moments, recompute_batch_norm_stats
from tests.distributed.scenarios_batch_norm import precise_bn_fit
from tests.helpers.models import (
    MLP,
    ClassifierModule,
    list_loader,
    random_classification,
    tiny_trainer,
)
from tests.helpers.models_batch_norm import WithAuxiliaryHead, bn_mlp


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 20), min_size=1, max_size=5).filter(lambda s: sum(s) > 1),
    shift=st.floats(-1e4, 1e4),
)
def test_merge_moments_exact(sizes, shift):
    g = torch.Generator().manual_seed(len(sizes))
    parts = [torch.randn(s, 3, generator=g, dtype=torch.float64) + shift for s in sizes]
    counts = torch.tensor([float(len(p)) for p in parts], dtype=torch.float64)
    means = torch.stack([p.mean(0) if len(p) else torch.zeros(3, dtype=p.dtype) for p in parts])
    m2s = torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else torch.zeros(3) for p in parts])
    n, mean, m2 = merge_moments(counts, means, m2s.double())
    data = torch.cat(parts)
    assert float(n) == len(data)
    assert torch.allclose(mean, data.mean(0), rtol=1e-12, atol=1e-9)
    assert torch.allclose(m2 / (n - 1), data.var(0), rtol=1e-8, atol=1e-9)


def _manual_two_bn_reference(model, batches):
    """Independent forward of Linear-BN-ReLU-Linear-BN with batch statistics per batch."""
    fc1, bn1, _, fc2, _ = model
    h1s, h2s = [], []
    for x in batches:
        h1 = fc1(x)
        h1s.append(h1)
        mean, var = h1.mean(0), h1.var(0, correction=0)
        z = (h1 - mean) / torch.sqrt(var + bn1.eps) * bn1.weight + bn1.bias
        h2s.append(fc2(torch.relu(z)))
    return torch.cat(h1s), torch.cat(h2s)


def test_recompute_matches_population_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 4), nn.BatchNorm1d(4)
    ).double()
    model.eval()
    model[1].train()  # an odd mix of flags, restored exactly
    flags = [m.training for m in model.modules()]
    tracked = [int(model[1].num_batches_tracked), int(model[4].num_batches_tracked)]
    batches = [torch.randn(9, 5, dtype=torch.float64) * 3 + 1 for _ in range(4)]
    pulled = []

    def source():
        for b in batches + batches:
            pulled.append(b)
            yield b

    used = recompute_batch_norm_stats(model, source(), 4, forward_fn=lambda m, b: m(b))
    assert used == 4 and len(pulled) == 4  # no batch is loaded beyond num_batches
    with torch.no_grad():
        h1, h2 = _manual_two_bn_reference(model, batches)
    assert torch.allclose(model[1].running_mean, h1.mean(0), atol=1e-12)
    assert torch.allclose(model[1].running_var, h1.var(0), atol=1e-12)
    assert torch.allclose(model[4].running_mean, h2.mean(0), atol=1e-12)
    assert torch.allclose(model[4].running_var, h2.var(0), atol=1e-12)
    assert [m.training for m in model.modules()] == flags
    assert [int(model[1].num_batches_tracked), int(model[4].num_batches_tracked)] == tracked
    assert model[1].track_running_stats and model[1].momentum == 0.1


def test_recompute_merges_the_other_processes_moments_exactly():
    """``reduce_fn`` gets this process's packed moments and returns every process's, ``(R, L)``
    or flat ``(R·L,)``: the running statistics become those of the union of the data."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).double()
    mine = [torch.randn(6, 4, dtype=torch.float64) + 2 for _ in range(2)]
    theirs = [torch.randn(10, 4, dtype=torch.float64) * 3 for _ in range(3)]
    other: list[torch.Tensor] = []
    recompute_batch_norm_stats(model, theirs, 3, reduce_fn=lambda t: other.append(t) or t)
    with torch.no_grad():
        h = model[0](torch.cat(mine + theirs))
    for reduce_fn in (
        lambda t: torch.stack([t, other[0]]),  # what DDP's all_gather returns
        lambda t: torch.cat([other[0], t]),  # flat, another rank order
    ):
        assert recompute_batch_norm_stats(model, mine, 5, reduce_fn=reduce_fn) == 2
        assert torch.allclose(model[1].running_mean, h.mean(0), atol=1e-12)
        assert torch.allclose(model[1].running_var, h.var(0), atol=1e-12)


def test_recompute_keeps_dropout_off_and_handles_ghost_and_errors():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Dropout(0.9), nn.Linear(4, 3), GhostBatchNorm1d(3, virtual_batch_size=2)
    )
    batches = [[torch.randn(8, 4)] for _ in range(3)]
    recompute_batch_norm_stats(model, batches, 10)
    with torch.no_grad():
        h = model[1](torch.cat([b[0] for b in batches]))
    assert torch.allclose(model[2].running_mean, h.mean(0), atol=1e-6)
    assert torch.allclose(model[2].running_var, h.var(0), atol=1e-5)
    assert model[2].track_running_stats
    with pytest.raises(RuntimeError, match="no BatchNorm layer with running statistics"):
        recompute_batch_norm_stats(MLP(), batches, 2)
    with pytest.raises(RuntimeError, match="input_key=0"):
        recompute_batch_norm_stats(model, [{"x": torch.randn(2, 4)}], 2)
    with pytest.raises(RuntimeError, match="no batch"):
        recompute_batch_norm_stats(model, [], 2)
    with pytest.raises(ValueError, match="num_batches"):
        PreciseBatchNormCallback(0)
    with pytest.raises(TypeError, match="input_key"):
        PreciseBatchNormCallback(2, input_key=1.5)


def test_recompute_skips_a_layer_forward_never_reaches_with_one_warning():
    """Issue 10 #10: a BatchNorm that forward does not reach (an auxiliary head) crashed with
    "stack expects a non-empty TensorList"."""
    torch.manual_seed(0)
    model = WithAuxiliaryHead()
    aux_before = model.aux[1].running_mean.clone()
    batches = [torch.randn(8, 8) for _ in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recompute_batch_norm_stats(model, batches, 3)
    assert [str(w.message) for w in caught if "Precise BN" in str(w.message)] == [
        "Precise BN: no batch reached the BatchNorm layer(s) ['aux.1'] in forward (an "
        "auxiliary head or a teacher model?); their running statistics are left unchanged."
    ]
    assert torch.equal(model.aux[1].running_mean, aux_before)
    with torch.no_grad():
        h = model.body[0](torch.cat(batches))
    assert torch.allclose(model.body[1].running_mean, h.mean(0), atol=1e-6)


def test_precise_bn_callback_in_trainer(precision):
    torch.manual_seed(0)
    x, y = random_classification(48, seed=1)
    x = x * 3 - 2
    module = ClassifierModule(bn_mlp(), lr=0.05)
    cb = PreciseBatchNormCallback(num_batches=50)
    trainer = tiny_trainer(max_epochs=1, precision=precision, callbacks=[cb], limit_val_batches=1)
    with pytest.warns(UserWarning, match="only 6 batches"):
        trainer.fit(module, list_loader(x, y, batch_size=8), list_loader(x, y, batch_size=8))
    assert cb.last_num_batches == 6 and cb.last_step == trainer.global_step
    assert trainer.callback_metrics["reg/precise_bn/num_batches"].item() == 6
    assert trainer.callback_metrics["reg/precise_bn/mean_shift"].item() > 0
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision != "32-true"):
        h = torch.cat([module.model[0](xb).float() for xb in x.split(8)])
    tol = 1e-5
    assert torch.allclose(module.model[1].running_mean, h.mean(0), atol=tol)
    assert torch.allclose(module.model[1].running_var, h.var(0), rtol=1e-4, atol=tol)
    cb2 = PreciseBatchNormCallback()
    cb2.load_state_dict(cb.state_dict())
    assert cb2.state_dict() == cb.state_dict() == {"last_step": trainer.global_step}


@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
def test_precise_bn_true_precisions(precision):
    """Issue 10 #8: the callback's batches skipped the precision plugin's convert_input, so a
    bf16/fp64 model got float32 input and crashed."""
    torch.manual_seed(0)
    x, y = random_classification(32, seed=5)
    module = ClassifierModule(WithAuxiliaryHead(), lr=0.05)
    cb = PreciseBatchNormCallback(num_batches=4)
    trainer = tiny_trainer(max_steps=2, precision=precision, callbacks=[cb])
    with pytest.warns(UserWarning, match=r"\['model.aux.1'\]"):
        trainer.fit(module, list_loader(x, y, batch_size=8))
    bn = module.model.body[1]
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float64
    assert bn.running_mean.dtype == dtype and cb.last_num_batches == 4
    with torch.no_grad():
        h = module.model.body[0](x.to(dtype)).double()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-12
    assert torch.allclose(bn.running_mean.double(), h.mean(0), rtol=tol, atol=tol)
    assert torch.allclose(bn.running_var.double(), h.var(0), rtol=tol, atol=tol)


def test_precise_bn_at_train_end_with_lazy_batch_norm():
    torch.manual_seed(0)
    x, y = random_classification(32, seed=2)
    module = ClassifierModule(nn.Sequential(nn.Linear(8, 6), nn.LazyBatchNorm1d(), nn.Linear(6, 3)))
    cb = PreciseBatchNormCallback(num_batches=4)
    tiny_trainer(max_steps=3, callbacks=[cb]).fit(module, list_loader(x, y, batch_size=8))
    assert type(module.model[1]) is nn.BatchNorm1d  # initialised by the first step
    with torch.no_grad():
        h = module.model[0](x)
    assert torch.allclose(module.model[1].running_mean, h.mean(0), atol=1e-5)
    assert torch.allclose(module.model[1].running_var, h.var(0), atol=1e-5)


def test_precise_bn_callback_without_bn_raises():
    x, y = random_classification(16)
    with pytest.raises(RuntimeError, match=r"no BatchNorm .*add_batch_norm"):
        tiny_trainer(max_steps=1, callbacks=[PreciseBatchNormCallback(2)]).fit(
            ClassifierModule(MLP()), list_loader(x, y)
        )


def _population_reference(out: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = x @ out["weight"].T + out["bias"]
    return h.mean(0), h.var(0)


@pytest.mark.ddp
def test_precise_bn_ddp_union_statistics(ddp_pool):
    # (SyncBatchNorm refuses CPU modules under DDP, so sync_batchnorm=True needs >= 2 GPUs.)
    results = ddp_pool.run(precise_bn_fit)
    r0, r1 = results
    assert torch.equal(r0["weight"], r1["weight"])
    assert torch.equal(r0["mean"], r1["mean"]) and torch.equal(r0["var"], r1["var"])
    x, _ = random_classification(64, seed=3)
    mean, var = _population_reference(r0, x * 2.0 + 1.0)
    assert torch.allclose(r0["mean"], mean, atol=1e-5)
    assert torch.allclose(r0["var"], var, rtol=1e-4, atol=1e-5)
    # what each rank alone saw is not the union: the test can tell them apart
    half_mean = (x[::2] * 2.0 + 1.0) @ r0["weight"].T + r0["bias"]
    assert not torch.allclose(r0["mean"], half_mean.mean(0), atol=1e-3)


@pytest.mark.ddp
def test_precise_bn_ddp_bf16(ddp_pool):
    r0, r1 = ddp_pool.run(precise_bn_fit, False, "bf16-mixed")
    assert torch.equal(r0["mean"], r1["mean"]) and torch.equal(r0["var"], r1["var"])
