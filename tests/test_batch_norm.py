from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_reg.batch_norm import (
    BatchNormAfter,
    BatchNormFreezeCallback,
    GhostBatchNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    GhostBatchNormCallback,
    PreciseBatchNormCallback,
    RunningMoments,
    _GhostAwareSyncBatchNorm,
    add_batch_norm,
    apply_ghost_batch_norm,
    ghost_batch_norm,
    recompute_batch_norm_stats,
    remove_batch_norm,
    remove_ghost_batch_norm,
    virtual_batch_sizes,
)
from tests.distributed.scenarios_batch_norm import bn_mlp, ghost_bn_sync_fit, precise_bn_fit
from tests.helpers.models import (
    MLP,
    ClassifierModule,
    SmallCNN,
    list_loader,
    random_classification,
    tiny_trainer,
)

# ------------------------------------------------------------------------------------ ghost BN


def _reference_chunks(x: torch.Tensor, vbs: int) -> list[torch.Tensor]:
    return list(torch.tensor_split(x, math.ceil(x.shape[0] / vbs)))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 40),
    vbs=st.integers(1, 16),
    c=st.integers(1, 3),
    spatial=st.sampled_from([(), (3,), (2, 3)]),
    impl=st.sampled_from(["loop", "vectorized"]),
)
def test_ghost_chunks_have_mean_zero_var_one(n, vbs, c, spatial, impl):
    g = torch.Generator().manual_seed(n * 100 + vbs)
    x = torch.randn(n, c, *spatial, generator=g, dtype=torch.float64) * 3 + 2
    per_row = math.prod(spatial)
    if min(virtual_batch_sizes(n, vbs)) * per_row <= 1:
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            ghost_batch_norm(x, vbs, impl=impl)
        return
    y = ghost_batch_norm(x, vbs, eps=1e-12, impl=impl)
    chunks_y = _reference_chunks(y, vbs)
    assert len(chunks_y) == math.ceil(n / vbs)
    assert max(ch.shape[0] for ch in chunks_y) <= vbs
    dims = [0, *range(2, x.ndim)]
    for cy, cx in zip(chunks_y, _reference_chunks(x, vbs)):
        assert torch.allclose(cy.mean(dims), torch.zeros(c, dtype=cy.dtype), atol=1e-9)
        var = cy.var(dims, correction=0)
        assert torch.allclose(var, torch.ones(c, dtype=var.dtype), atol=1e-6)
        # and it is an affine map of the chunk: y = (x - mean) / std
        ref = (cx - cx.mean(dims, keepdim=True)) / cx.var(dims, correction=0, keepdim=True).sqrt()
        assert torch.allclose(cy, ref, atol=1e-8)


def _sequential_reference(x, vbs, weight, bias, rm, rv, momentum, eps, tracked):
    """Composer's algorithm: BatchNorm on each chunk in turn, momentum / n_chunks."""
    chunks = _reference_chunks(x, vbs)
    n = len(chunks)
    outs = []
    for chunk in chunks:
        if momentum is None:
            tracked += 1
            factor = 1.0 / tracked
        else:
            factor = momentum / n
        outs.append(F.batch_norm(chunk, rm, rv, weight, bias, True, factor, eps))
    return torch.cat(outs), rm, rv


@pytest.mark.parametrize("impl", ["loop", "vectorized"])
@pytest.mark.parametrize("momentum", [0.1, 0.9, None])
@pytest.mark.parametrize(
    "cls,shape",
    [
        (GhostBatchNorm1d, (37, 5)),
        (GhostBatchNorm2d, (19, 3, 4, 4)),
        (GhostBatchNorm3d, (10, 2, 2, 3, 3)),
    ],
)
def test_ghost_module_matches_sequential_reference(cls, shape, momentum, impl):
    torch.manual_seed(0)
    c = shape[1]
    bn = cls(c, momentum=momentum, virtual_batch_size=4, dtype=torch.float64, impl=impl)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    tracked = 0
    for step in range(3):
        x = torch.randn(*shape, dtype=torch.float64) * (step + 1) + step
        ref, rm, rv = _sequential_reference(
            x, 4, bn.weight, bn.bias, rm, rv, momentum, bn.eps, tracked
        )
        tracked += math.ceil(shape[0] / 4)
        y = bn(x)
        assert torch.allclose(y, ref, atol=1e-10)
        assert torch.allclose(bn.running_mean, rm, atol=1e-12)
        assert torch.allclose(bn.running_var, rv, atol=1e-12)
        assert int(bn.num_batches_tracked) == tracked
    # gradients flow to the affine parameters and the input
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    (bn(x) ** 2).sum().backward()
    assert bn.weight.grad is not None and x.grad is not None


def test_ghost_eval_equals_batchnorm_eval_and_state_dict_both_ways():
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(3)
    ghost = GhostBatchNorm2d(3, virtual_batch_size=4)
    for _ in range(3):
        ghost(torch.randn(16, 3, 5, 5) * 2 + 1)
    assert list(ghost.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(ghost.state_dict())  # ghost -> plain, strict
    x = torch.randn(8, 3, 5, 5)
    plain.eval(), ghost.eval()
    assert torch.equal(ghost(x), plain(x))
    fresh = GhostBatchNorm2d(3, virtual_batch_size=4)
    fresh.load_state_dict(plain.state_dict())  # plain -> ghost, strict
    fresh.eval()
    assert torch.equal(fresh(x), plain(x))
    assert isinstance(ghost, nn.BatchNorm2d)


def test_ghost_small_batch_is_plain_batchnorm_and_warns():
    torch.manual_seed(0)
    plain = nn.BatchNorm1d(4)
    ghost = GhostBatchNorm1d(4, virtual_batch_size=8)
    x = torch.randn(6, 4)
    with pytest.warns(UserWarning, match="fewer than virtual_batch_size=8"):
        y = ghost(x)
    assert torch.equal(y, plain(x))
    assert torch.equal(ghost.running_var, plain.running_var)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ghost(x)  # warns once per module
        ghost(torch.randn(8, 4))  # == virtual batch size: no warning


@pytest.mark.parametrize("bad", [0, -3])
def test_bad_virtual_batch_size(bad):
    with pytest.raises(ValueError, match="virtual_batch_size"):
        GhostBatchNorm2d(3, virtual_batch_size=bad)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        apply_ghost_batch_norm(SmallCNN(), bad)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        GhostBatchNormCallback(bad)


@pytest.mark.parametrize("bad", [float("nan"), 2.5, "4"])
def test_non_integer_virtual_batch_size(bad):
    with pytest.raises((TypeError, ValueError), match="virtual_batch_size"):
        GhostBatchNormCallback(bad)


@pytest.mark.parametrize("impl", ["loop", "vectorized"])
def test_ghost_bf16_input(impl):
    bn = GhostBatchNorm1d(4, virtual_batch_size=4, impl=impl)
    x = (torch.randn(16, 4) * 3 + 5).to(torch.bfloat16)
    y = bn(x)
    assert y.dtype == torch.bfloat16
    for chunk in y.float().split(4):
        assert torch.allclose(chunk.mean(0), torch.zeros(4), atol=0.02)


def test_apply_and_remove_ghost_restore_modules():
    torch.manual_seed(0)
    model = SmallCNN()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    params = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())
    changes = apply_ghost_batch_norm(model, 4)
    assert [(c.path, c.old_type, c.new_type) for c in changes] == [
        ("features.1", "BatchNorm2d", "GhostBatchNorm2d"),
        ("features.4", "BatchNorm2d", "GhostBatchNorm2d"),
    ]
    assert [id(p) for p in model.parameters()] == params  # shared, optimizers keep working
    assert list(model.state_dict()) == keys
    with pytest.raises(RuntimeError, match="already wrapped"):
        apply_ghost_batch_norm(model, 4)
    model(torch.randn(12, 1, 6, 6))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    back = remove_ghost_batch_norm(model)
    assert len(back) == 2
    restored = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [type(m) for m in restored] == [nn.BatchNorm2d] * 2
    assert all(r.running_mean is b.running_mean for r, b in zip(restored, bns))  # same buffers
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert [id(p) for p in model.parameters()] == params
    with pytest.raises(RuntimeError, match="no BatchNorm1d/2d/3d"):
        apply_ghost_batch_norm(MLP(), 4)


def test_ghost_callback_trains_and_is_idempotent(precision):
    torch.manual_seed(0)
    x, y = random_classification(32, image=True)
    module = ClassifierModule(SmallCNN())
    cb = GhostBatchNormCallback(4)
    trainer = tiny_trainer(max_steps=3, precision=precision, callbacks=[cb], log_every_n_steps=1)
    trainer.fit(module, list_loader(x, y, batch_size=16), list_loader(x, y, batch_size=16))
    ghosts = [m for m in module.modules() if isinstance(m, GhostBatchNorm)]
    assert len(ghosts) == 2 and all(g.last_num_virtual_batches == 4 for g in ghosts)
    assert trainer.logged_metrics["reg/ghost_bn/num_virtual_batches"].item() == 4
    trainer.validate(module, list_loader(x, y, batch_size=16), verbose=False)
    assert len([m for m in module.modules() if isinstance(m, GhostBatchNorm)]) == 2
    assert not any(isinstance(m, GhostBatchNorm) for m in ghosts[0].children())
    # a new callback with the same size accepts the model; another size refuses it
    tiny_trainer(max_steps=1, callbacks=[GhostBatchNormCallback(4)]).fit(
        module, list_loader(x, y, batch_size=16)
    )
    with pytest.raises(RuntimeError, match="virtual_batch_size"):
        tiny_trainer(max_steps=1, callbacks=[GhostBatchNormCallback(8)]).fit(
            module, list_loader(x, y, batch_size=16)
        )
    cb2 = GhostBatchNormCallback(4)
    cb2.load_state_dict(cb.state_dict())
    assert cb2.state_dict() == {"virtual_batch_size": 4}


def test_ghost_callback_without_batchnorm_raises():
    x, y = random_classification(16)
    trainer = tiny_trainer(max_steps=1, callbacks=[GhostBatchNormCallback(4)])
    with pytest.raises(RuntimeError, match="add_batch_norm"):
        trainer.fit(ClassifierModule(MLP()), list_loader(x, y))


# ------------------------------------------------------------------------------------ add BN


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
    assert add_batch_norm(SmallCNN(), allow_existing=True)


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


# ------------------------------------------------------------------------------------ precise BN


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 20), min_size=1, max_size=5),
    shift=st.floats(-1e4, 1e4),
)
def test_running_moments_exact(sizes, shift):
    g = torch.Generator().manual_seed(len(sizes))
    parts = [torch.randn(s, 3, 2, generator=g, dtype=torch.float64) + shift for s in sizes]
    acc = RunningMoments(3)
    for p in parts:
        acc.update(p)
    data = torch.cat(parts).transpose(0, 1).reshape(3, -1)
    assert float(acc.count) == data.shape[1]
    assert torch.allclose(acc.mean, data.mean(1), rtol=1e-12, atol=1e-9)
    if data.shape[1] > 1:
        assert torch.allclose(acc.var, data.var(1), rtol=1e-8, atol=1e-9)
    # merging per-part moments (as across ranks) gives the same result
    singles = [RunningMoments(3) for _ in parts]
    for s, p in zip(singles, parts):
        s.update(p)
    flat = torch.stack([s.pack() for s in singles])
    merged = RunningMoments.merge(*RunningMoments.unpack(flat))
    assert torch.allclose(merged.mean, acc.mean, rtol=1e-12, atol=1e-9)
    assert torch.allclose(merged.m2, acc.m2, rtol=1e-9, atol=1e-9)


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
    used = recompute_batch_norm_stats(
        model, iter(batches + batches), 4, input_key=0, forward_fn=lambda m, b: m(b)
    )
    assert used == 4
    with torch.no_grad():
        h1, h2 = _manual_two_bn_reference(model, batches)
    assert torch.allclose(model[1].running_mean, h1.mean(0), atol=1e-12)
    assert torch.allclose(model[1].running_var, h1.var(0), atol=1e-12)
    assert torch.allclose(model[4].running_mean, h2.mean(0), atol=1e-12)
    assert torch.allclose(model[4].running_var, h2.var(0), atol=1e-12)
    assert [m.training for m in model.modules()] == flags
    assert [int(model[1].num_batches_tracked), int(model[4].num_batches_tracked)] == tracked
    assert model[1].track_running_stats and model[4].track_running_stats


def test_recompute_keeps_dropout_off_and_handles_ghost():
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
    with pytest.raises(RuntimeError, match="no BatchNorm"):
        recompute_batch_norm_stats(MLP(), batches, 2)
    with pytest.raises(RuntimeError, match="input_key"):
        recompute_batch_norm_stats(model, [{"x": torch.randn(2, 4)}], 2)
    with pytest.raises(ValueError, match="num_batches"):
        PreciseBatchNormCallback(0)


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
    assert "reg/precise_bn/mean_shift" in trainer.callback_metrics
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision != "32-true"):
        h = torch.cat([module.model[0](xb).float() for xb in x.split(8)])
    tol = 1e-5
    assert torch.allclose(module.model[1].running_mean, h.mean(0), atol=tol)
    assert torch.allclose(module.model[1].running_var, h.var(0), rtol=1e-4, atol=tol)
    cb2 = PreciseBatchNormCallback()
    cb2.load_state_dict(cb.state_dict())
    assert cb2.state_dict() == cb.state_dict() == {"last_step": trainer.global_step}


def test_precise_bn_at_train_end_without_validation():
    torch.manual_seed(0)
    x, y = random_classification(32, seed=2)
    module = ClassifierModule(bn_mlp())
    cb = PreciseBatchNormCallback(num_batches=4)
    tiny_trainer(max_steps=3, callbacks=[cb]).fit(module, list_loader(x, y, batch_size=8))
    with torch.no_grad():
        h = module.model[0](x)
    assert torch.allclose(module.model[1].running_mean, h.mean(0), atol=1e-5)


def test_precise_bn_callback_without_bn_raises():
    x, y = random_classification(16)
    with pytest.raises(RuntimeError, match="add_batch_norm"):
        tiny_trainer(max_steps=1, callbacks=[PreciseBatchNormCallback(2)]).fit(
            ClassifierModule(MLP()), list_loader(x, y)
        )


def test_batch_norm_freeze_callback():
    torch.manual_seed(0)
    x, y = random_classification(32, seed=4)
    module = ClassifierModule(bn_mlp())
    seen: list[tuple[int, bool]] = []

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


def test_ghost_aware_layer_sync_converts_only_plain_batchnorm():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        GhostBatchNorm2d(2, virtual_batch_size=2),
        nn.Sequential(nn.BatchNorm1d(2)),
    )
    weight = model[1].weight
    out = _GhostAwareSyncBatchNorm().apply(model)
    assert out is model
    assert type(model[1]) is nn.SyncBatchNorm and model[1].weight is weight
    assert type(model[2]) is GhostBatchNorm2d
    assert type(model[3][0]) is nn.SyncBatchNorm


def test_ghost_callback_installs_ghost_aware_layer_sync():
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm

    class FakeStrategy:
        _layer_sync = TorchSyncBatchNorm()

    class FakeTrainer:
        strategy = FakeStrategy()

    trainer = FakeTrainer()
    GhostBatchNormCallback(4).setup(trainer, ClassifierModule(SmallCNN()), "fit")
    assert type(trainer.strategy._layer_sync) is _GhostAwareSyncBatchNorm


# ------------------------------------------------------------------------------------ DDP


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


@pytest.mark.ddp
def test_ghost_bn_with_sync_batchnorm_ddp(ddp_pool):
    r0, r1 = ddp_pool.run(ghost_bn_sync_fit)
    for r in (r0, r1):
        assert r["seen"] == ["GhostBatchNorm2d"]  # not converted to SyncBatchNorm
        assert r["n_ghost"] == 2 and r["num_virtual_batches"] == [4, 4]  # 16 rows per rank / 4
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
