from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.plugins import TorchSyncBatchNorm
from torch import nn

import lightning_reg.ghost_batch_norm as ghost_module
from lightning_reg import (
    GhostBatchNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    GhostBatchNormCallback,
    GhostSyncBatchNorm,
    StochasticDepthCallback,
    apply_ghost_batch_norm,
    remove_ghost_batch_norm,
)
from lightning_reg.ghost_batch_norm import ghost_batch_norm, virtual_batch_sizes
from tests.distributed.scenarios_batch_norm import ghost_bn_sync_fit
from tests.helpers.models import (
    MLP,
    ClassifierModule,
    SmallCNN,
    list_loader,
    random_classification,
    tiny_trainer,
)
from tests.helpers.models_batch_norm import TinyResNet

LAYOUTS = ["loop", "side_by_side"]


@contextlib.contextmanager
def layout(name: str):
    """Run ghost BN on CPU with one call per chunk (CPU default) or side by side (accelerators)."""
    saved = ghost_module._ONE_CALL_PER_CHUNK
    ghost_module._ONE_CALL_PER_CHUNK = {"cpu"} if name == "loop" else set()
    try:
        yield
    finally:
        ghost_module._ONE_CALL_PER_CHUNK = saved


def _reference_chunks(x: torch.Tensor, vbs: int) -> list[torch.Tensor]:
    return list(torch.tensor_split(x, math.ceil(x.shape[0] / vbs)))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 40),
    vbs=st.integers(1, 16),
    c=st.integers(1, 3),
    spatial=st.sampled_from([(), (3,), (2, 3)]),
    how=st.sampled_from(LAYOUTS),
)
def test_ghost_chunks_have_mean_zero_var_one(n, vbs, c, spatial, how):
    g = torch.Generator().manual_seed(n * 100 + vbs)
    x = torch.randn(n, c, *spatial, generator=g, dtype=torch.float64) * 3 + 2
    per_row = math.prod(spatial)
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    with layout(how):
        if min(virtual_batch_sizes(n, vbs)) * per_row <= 1:
            with pytest.raises(ValueError, match="more than 1 value per channel"):
                ghost_batch_norm(x, vbs)
            return
        y = ghost_batch_norm(x, vbs, running_mean=rm, running_var=rv, eps=1e-12)
    chunks_y = _reference_chunks(y, vbs)
    assert len(chunks_y) == math.ceil(n / vbs)
    assert max(ch.shape[0] for ch in chunks_y) <= vbs
    dims = [0, *range(2, x.ndim)]
    for cy, cx in zip(chunks_y, _reference_chunks(x, vbs)):
        assert torch.allclose(cy.mean(dims), torch.zeros(c, dtype=cy.dtype), atol=1e-9)
        ref = (cx - cx.mean(dims, keepdim=True)) / cx.var(dims, correction=0, keepdim=True).sqrt()
        assert torch.allclose(cy, ref, atol=1e-8)


def _sequential_reference(x, vbs, weight, bias, rm, rv, momentum, eps, tracked):
    """Composer's algorithm: BatchNorm on each chunk in turn, momentum / n_chunks."""
    chunks = _reference_chunks(x, vbs)
    outs = []
    for chunk in chunks:
        if momentum is None:
            tracked += 1
            factor = 1.0 / tracked
        else:
            factor = momentum / len(chunks)
        outs.append(F.batch_norm(chunk, rm, rv, weight, bias, True, factor, eps))
    return torch.cat(outs), rm, rv


@pytest.mark.parametrize("how", LAYOUTS)
@pytest.mark.parametrize("momentum", [0.1, 0.9, None])
@pytest.mark.parametrize(
    "cls,shape",
    [
        (GhostBatchNorm1d, (37, 5)),
        (GhostBatchNorm2d, (19, 3, 4, 4)),
        (GhostBatchNorm3d, (10, 2, 2, 3, 3)),
    ],
)
def test_ghost_module_matches_sequential_reference(cls, shape, momentum, how):
    torch.manual_seed(0)
    c = shape[1]
    bn = cls(c, momentum=momentum, virtual_batch_size=4, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    tracked = 0
    with layout(how):
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
        # gradients flow to the affine parameters and the input, as through the reference
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        grads = torch.autograd.grad((bn(x) ** 2).sum(), [x, bn.weight])
    w = bn.weight.detach().clone().requires_grad_()
    ref = _sequential_reference(x, 4, w, bn.bias, None, None, 0.0, bn.eps, 0)[0]
    ref_grads = torch.autograd.grad((ref**2).sum(), [x, w])
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-8)


@pytest.mark.parametrize("how", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_ghost_low_and_double_precision_parameters(dtype, how):
    """Issue 10 #9: the side-by-side layout crashed for bf16/fp16 parameters; it must work for
    every parameter dtype and agree with a float64 computation."""
    torch.manual_seed(0)
    bn = GhostBatchNorm2d(3, virtual_batch_size=4, momentum=0.3, dtype=dtype)
    ref = GhostBatchNorm2d(3, virtual_batch_size=4, momentum=0.3, dtype=torch.float64)
    x = (torch.randn(14, 3, 4, 4) * 2 + 1).to(dtype)
    with layout(how):
        y = bn(x)
        y_ref = ref(x.double())
    assert y.dtype == dtype and bn.running_mean.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 3e-2
    assert torch.allclose(y.double(), y_ref, atol=tol * 5)
    assert torch.allclose(bn.running_mean.double(), ref.running_mean, atol=tol)
    assert torch.allclose(bn.running_var.double(), ref.running_var, rtol=tol, atol=tol)


@pytest.mark.parametrize("how", LAYOUTS)
def test_ghost_bf16_input_with_float32_parameters(how):
    bn = GhostBatchNorm1d(4, virtual_batch_size=4)
    x = (torch.randn(16, 4) * 3 + 5).to(torch.bfloat16)
    with layout(how):
        y = bn(x)
    assert y.dtype == torch.bfloat16
    for chunk in y.float().split(4):
        assert torch.allclose(chunk.mean(0), torch.zeros(4), atol=0.02)


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
    assert isinstance(ghost, nn.BatchNorm2d) and not isinstance(ghost, nn.BatchNorm1d)
    with pytest.raises(ValueError, match="expected 4D input"):
        ghost(torch.randn(8, 3))


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


@pytest.mark.parametrize("bad", [float("nan"), 2.5, "4", True])
def test_non_integer_virtual_batch_size(bad):
    for make in (GhostBatchNormCallback, lambda v: GhostBatchNorm1d(2, virtual_batch_size=v)):
        with pytest.raises(TypeError, match="`virtual_batch_size` must be an integer"):
            make(bad)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"momentum": float("nan")}, r"`momentum` must be a finite number in \[0, 1\]"),
        ({"momentum": 1.5}, r"`momentum` must be a finite number in \[0, 1\], got 1.5"),
        ({"momentum": -0.1}, r"`momentum` must be .* got -0.1"),
        ({"eps": 0.0}, r"`eps` must be a finite number in \(0, inf\), got 0.0"),
        ({"eps": float("nan")}, r"`eps` must be a finite number"),
    ],
)
def test_ghost_validates_eps_and_momentum(kwargs, match):
    """Issue 10 (lesser): NaN momentum used to turn the running statistics into NaN."""
    with pytest.raises(ValueError, match=match):
        GhostBatchNorm2d(3, virtual_batch_size=4, **kwargs)
    bn = GhostBatchNorm2d(3, virtual_batch_size=4, momentum=None)  # None is BatchNorm's average
    x = torch.randn(8, 3, 2, 2) * 2 + 1
    bn(x)
    # the cumulative average of the two virtual batches' statistics, as BatchNorm fed them in turn
    plain = nn.BatchNorm2d(3, momentum=None)
    for chunk in x.split(4):
        plain(chunk)
    chunk_means = torch.stack([chunk.mean((0, 2, 3)) for chunk in x.split(4)])
    assert int(bn.num_batches_tracked) == 2
    assert torch.allclose(bn.running_mean, chunk_means.mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, plain.running_var, atol=1e-6)


def test_ghost_impl_is_deprecated_and_base_class_is_abstract():
    with pytest.warns(DeprecationWarning, match=r"impl=\.\.\.\) is deprecated"):
        bn = GhostBatchNorm1d(4, virtual_batch_size=2, impl="vectorized")
    assert bn(torch.randn(8, 4)).shape == (8, 4)
    with pytest.raises(TypeError, match="GhostBatchNorm1d, GhostBatchNorm2d or GhostBatchNorm3d"):
        GhostBatchNorm(4)


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


def test_apply_ghost_leaves_batchnorm_subclasses_with_their_own_forward():
    from timm.layers import BatchNormAct2d

    model = nn.Sequential(nn.Conv2d(1, 4, 3), BatchNormAct2d(4), nn.BatchNorm2d(4))
    changes = apply_ghost_batch_norm(model, 2)
    assert [c.path for c in changes] == ["2"]  # BatchNormAct2d keeps its activation
    assert type(model[1]) is BatchNormAct2d


@pytest.mark.parametrize(
    "model,match",
    [
        (MLP(), r"no nn.BatchNorm1d/2d/3d .*add_batch_norm"),
        (nn.Sequential(nn.Linear(4, 4), nn.LazyBatchNorm1d()), r"lazy .*Run one forward pass"),
        (
            nn.Sequential(nn.Linear(4, 4), nn.SyncBatchNorm(4)),
            r"SyncBatchNorm .*GhostSyncBatchNorm",
        ),
    ],
    ids=["none", "lazy", "sync"],
)
def test_no_batch_norm_errors_say_what_is_wrong(model, match):
    """Issue 10 (lesser): lazy and SyncBatchNorm models used to get "found no BatchNorm"."""
    with pytest.raises(RuntimeError, match=match):
        apply_ghost_batch_norm(model, 4)
    module = ClassifierModule(nn.Sequential(model, nn.LazyLinear(3)))
    x, y = random_classification(16, in_features=4)
    with pytest.raises(RuntimeError, match=match):
        tiny_trainer(max_steps=1, callbacks=[GhostBatchNormCallback(4)]).fit(
            module, list_loader(x, y)
        )


def test_ghost_callback_trains_and_is_idempotent(precision):
    torch.manual_seed(0)
    x, y = random_classification(32, image=True)
    module = ClassifierModule(SmallCNN())
    cb = GhostBatchNormCallback(4)
    trainer = tiny_trainer(max_steps=3, precision=precision, callbacks=[cb], log_every_n_steps=1)
    trainer.fit(module, list_loader(x, y, batch_size=16), list_loader(x, y, batch_size=16))
    ghosts = [m for m in module.modules() if isinstance(m, GhostBatchNorm)]
    assert len(ghosts) == 2 and all(g.last_num_virtual_batches == 4 for g in ghosts)
    assert all(int(g.num_batches_tracked) == trainer.global_step * 4 for g in ghosts)
    assert trainer.logged_metrics["reg/ghost_bn/num_virtual_batches"].item() == 4
    trainer.validate(module, list_loader(x, y, batch_size=16), verbose=False)
    assert [m for m in module.modules() if isinstance(m, GhostBatchNorm)] == ghosts
    # a new callback with the same size accepts the model; another size refuses it
    tiny_trainer(max_steps=1, callbacks=[GhostBatchNormCallback(4)]).fit(
        module, list_loader(x, y, batch_size=16)
    )
    with pytest.raises(RuntimeError, match=r"virtual_batch_size=\[4\], but .*\(8\)"):
        tiny_trainer(max_steps=1, callbacks=[GhostBatchNormCallback(8)]).fit(
            module, list_loader(x, y, batch_size=16)
        )


@pytest.mark.parametrize("ghost_first", [True, False], ids=["ghost_first", "depth_first"])
def test_ghost_with_stochastic_depth_in_either_order(ghost_first):
    """Issue 10 #7: [GhostBatchNormCallback, StochasticDepthCallback] failed at fit start (the
    ghost callback remembered module paths that the stochastic-depth wrapper changes)."""
    torch.manual_seed(0)
    x, y = random_classification(32, image=True)
    module = ClassifierModule(TinyResNet())
    ghost, depth = GhostBatchNormCallback(8), StochasticDepthCallback(0.5)
    callbacks = [ghost, depth] if ghost_first else [depth, ghost]
    trainer = tiny_trainer(max_epochs=2, callbacks=callbacks, log_every_n_steps=1)
    trainer.fit(module, list_loader(x, y, batch_size=32))
    ghosts = [m for m in module.modules() if isinstance(m, GhostBatchNorm)]
    assert len(ghosts) == 5  # the stem's and the four inside the two residual blocks
    assert trainer.logged_metrics["reg/ghost_bn/num_virtual_batches"].item() == 4
    assert int(ghosts[0].num_batches_tracked) == 2 * 4  # the stem runs at both steps
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_ghost_sync_plugin_converts_only_plain_batchnorm():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        GhostBatchNorm2d(2, virtual_batch_size=2),
        nn.Sequential(nn.BatchNorm1d(2)),
    )
    weight = model[1].weight
    assert GhostSyncBatchNorm().apply(model) is model
    assert type(model[1]) is nn.SyncBatchNorm and model[1].weight is weight
    assert type(model[2]) is GhostBatchNorm2d
    assert type(model[3][0]) is nn.SyncBatchNorm
    GhostSyncBatchNorm().revert(model)
    assert not isinstance(model[1], nn.SyncBatchNorm) and type(model[2]) is GhostBatchNorm2d
    # a TorchSyncBatchNorm subclass: Lightning accepts it alongside sync_batchnorm=True too
    tiny_trainer(sync_batchnorm=True, plugins=[GhostSyncBatchNorm()])


def test_ghost_callback_refuses_layers_synced_by_sync_batchnorm():
    """What Lightning's sync_batchnorm=True does under DDP, after setup and before fit start.
    (On CPU, DDP itself then refuses SyncBatchNorm; on GPUs this check is what users see.)"""
    module = ClassifierModule(SmallCNN())
    cb = GhostBatchNormCallback(4)
    trainer = tiny_trainer(max_steps=1)
    cb.setup(trainer, module, "fit")
    cb.on_fit_start(trainer, module)  # nothing replaced: fine
    TorchSyncBatchNorm().apply(module)
    with pytest.raises(RuntimeError, match=r"sync_batchnorm=True\) turned 2 ghost .*GhostSync"):
        cb.on_fit_start(trainer, module)


@pytest.mark.ddp
def test_ghost_bn_with_sync_plugin_ddp(ddp_pool):
    r0, r1 = ddp_pool.run(ghost_bn_sync_fit)
    for r in (r0, r1):
        assert r["seen"] == ["GhostBatchNorm2d"]  # not converted to SyncBatchNorm
        assert r["n_ghost"] == 2 and r["num_virtual_batches"] == [4, 4]  # 16 rows per rank / 4
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
