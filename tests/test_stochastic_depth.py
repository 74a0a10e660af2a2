from __future__ import annotations

import csv
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lightning_reg.stochastic_depth as sd_mod
from lightning_reg.stochastic_depth import (
    StochasticDepthCallback,
    StochasticDepthWrapper,
    apply_stochastic_depth,
    expected_depth,
    remove_stochastic_depth,
    sample_keep,
    stochastic_depth,
    survival_probabilities,
)
from tests.distributed.scenarios_stochastic_depth import fit_callback, fit_disagreeing_ranks
from tests.helpers.models import (
    MLP,
    ClassifierModule,
    ResidualBlock,
    ResidualMLP,
    list_loader,
    param_hash,
    random_classification,
    tiny_trainer,
)
from tests.helpers.models_surgery import (
    ZOO_BLOCKS,
    BatchNormResidual,
    LinearResidual,
    zoo_model,
)


def _wrappers(model: nn.Module) -> list[StochasticDepthWrapper]:
    return [m for m in model.modules() if isinstance(m, StochasticDepthWrapper)]


def _seed_wrappers(model: nn.Module, seed: int) -> torch.Generator:
    g = torch.Generator().manual_seed(seed)
    for w in _wrappers(model):
        w.generator = g
    return g


# ----------------------------------------------------------------------------- schedule maths


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200), st.floats(0.01, 1.0))
def test_linear_schedule_matches_huang_formula(num_blocks, p_last):
    probs = survival_probabilities(num_blocks, p_last, "linear")
    ref = [1 - (k / num_blocks) * (1 - p_last) for k in range(1, num_blocks + 1)]
    assert probs == pytest.approx(ref, abs=1e-12)
    assert probs[-1] == pytest.approx(p_last, abs=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(probs))
    assert all(p_last - 1e-12 <= p <= 1.0 for p in probs)
    assert survival_probabilities(num_blocks, p_last, "uniform") == [p_last] * num_blocks


def test_expected_fraction_of_benchmark_net():
    # 24 blocks, p_L = 0.5: mean p = 1 - 0.5 * 25 / 48.
    assert sum(survival_probabilities(24, 0.5)) / 24 == pytest.approx(1 - 0.5 * 25 / 48)


# ----------------------------------------------------------------------------- pure function


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 9),
    p=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_row_mode_equals_masked_full_compute(batch, p, seed):
    torch.manual_seed(seed % 1000)
    block = ResidualBlock(5)
    x = torch.randn(batch, 5, requires_grad=True)
    keep = sample_keep(p, batch, generator=torch.Generator().manual_seed(seed))
    out = stochastic_depth(block, x, keep, p)
    # Reference: compute the block on every row, mask and rescale.
    x_ref = x.detach().clone().requires_grad_(True)
    block_ref = ResidualBlock(5)
    block_ref.load_state_dict(block.state_dict())
    mask = keep.to(x.dtype)[:, None]
    ref = x_ref + mask * (block_ref(x_ref) - x_ref) / p
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    w = torch.randn(batch, 5)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    for a, b in zip(block.parameters(), block_ref.parameters()):
        assert a.grad is not None  # in the graph even when every row is dropped (DDP)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("keep", [True, False])
def test_batch_mode_values_and_zero_grads(keep):
    torch.manual_seed(0)
    block = ResidualBlock(4)
    x = torch.randn(3, 4, requires_grad=True)
    out = stochastic_depth(block, x, torch.tensor(keep), 0.8)
    if keep:
        torch.testing.assert_close(out, x + (block(x) - x) / 0.8)
    else:
        assert torch.equal(out, x)
    out.relu_()  # an in-place op right after a dropped block must be legal
    out.sum().backward()
    for p in block.parameters():
        assert p.grad is not None
        if not keep:
            assert torch.count_nonzero(p.grad) == 0


# ----------------------------------------------------------------------------- eval exactness


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_eval_output_unchanged_on_torchvision_resnets(arch):
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = getattr(tvm, arch)(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    changes = apply_stochastic_depth(model, 0.5)
    blocks = [m for m in model.modules() if type(m).__name__ in ("BasicBlock", "Bottleneck")]
    # Blocks with a downsample are not shape-preserving: never wrapped, but counted in L.
    assert len(changes) == sum(getattr(b, "downsample", None) is None for b in blocks)
    assert len(changes) == (5 if arch == "resnet18" else 12)
    total = 8 if arch == "resnet18" else 16
    first = model.layer1[0] if arch == "resnet18" else model.layer1[1]
    l1 = 1 if arch == "resnet18" else 2
    assert first.survival_prob == pytest.approx(1 - l1 / total * 0.5)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_eval_output_unchanged_on_transformer_encoder_and_decoder():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True), 3
    ).eval()
    x = torch.randn(2, 5, 16)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[0, 3:] = True
    with torch.no_grad():
        ref, ref_pad = enc(x), enc(x, src_key_padding_mask=pad)
    assert len(apply_stochastic_depth(enc, 0.5)) == 3
    with torch.no_grad():
        assert torch.equal(enc(x), ref)
        assert torch.equal(enc(x, src_key_padding_mask=pad), ref_pad)

    dec = nn.TransformerDecoder(
        nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=False), 2
    ).eval()
    tgt, memory = torch.randn(4, 3, 16), torch.randn(6, 3, 16)
    with torch.no_grad():
        ref = dec(tgt, memory)
    apply_stochastic_depth(dec, 0.5, mode="row")
    assert _wrappers(dec)[0].batch_dim == 1  # batch_first=False
    with torch.no_grad():
        assert torch.equal(dec(tgt, memory), ref)
    dec.train()
    _seed_wrappers(dec, 0)
    out = dec(tgt, memory)  # row mode slices `memory` by sample along with tgt
    assert out.shape == tgt.shape
    out.sum().backward()


def test_timm_block_by_import_path():
    vit_mod = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(0)
    model = vit_mod.VisionTransformer(
        img_size=8, patch_size=4, embed_dim=16, depth=3, num_heads=2, num_classes=3
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    changes = apply_stochastic_depth(
        model, 0.5, block_types=["timm.models.vision_transformer.Block"], mode="row"
    )
    assert [c.path for c in changes] == ["blocks.0", "blocks.1", "blocks.2"]
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    model.train()
    _seed_wrappers(model, 0)
    model(x).sum().backward()


# ----------------------------------------------------------------------------- unbiasedness


@pytest.mark.parametrize("mode", ["batch", "row"])
def test_training_output_is_unbiased(mode):
    """Mean of the training output over N passes equals the eval output.

    Tolerance: 5 standard errors per element (sample std / sqrt(N)) plus 1e-5; with 5 x 3 x 2
    checked elements a false failure has probability < 1e-4 (and the seed is fixed). The
    decisions are independent across blocks (and rows), and both models below are linear in
    each decision, so the expectation is exact: ResidualMLP with one (nonlinear) block, and a
    stack of three linear residual blocks.
    """
    n = 2000
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    for model, types in (
        (ResidualMLP(depth=1), (ResidualBlock,)),
        (nn.Sequential(*[LinearResidual(8) for _ in range(3)]), (LinearResidual,)),
    ):
        apply_stochastic_depth(model, 0.5, block_types=types, mode=mode)
        with torch.no_grad():
            target = model.eval()(x)
            model.train()
            _seed_wrappers(model, 1)
            if mode == "batch":
                samples = torch.stack([model(x) for _ in range(n)])
            else:  # rows are independent: n copies of x in one batch are n samples
                samples = model(x.repeat(n, 1)).view(n, *target.shape)
        mean, sem = samples.mean(0), samples.std(0) / math.sqrt(n)
        assert (sem > 0).all()
        assert ((mean - target).abs() <= 5 * sem + 1e-5).all()

        if isinstance(model, nn.Sequential):
            # Power: without the inverted scaling (mask only) the same check fails.
            g = torch.Generator().manual_seed(1)
            biased = torch.zeros_like(target)
            reps = n if mode == "batch" else 1
            with torch.no_grad():
                for _ in range(reps):
                    h = x if mode == "batch" else x.repeat(n, 1)
                    for w in _wrappers(model):
                        batch = None if mode == "batch" else h.shape[0]
                        keep = sample_keep(w.survival_prob, batch, generator=g)
                        h = stochastic_depth(w.block, h, keep, 1.0)
                    biased += h.view(-1, *target.shape).sum(0) / n
            assert ((biased - target).abs() > 5 * sem + 1e-5).any()


# ----------------------------------------------------------------------------- compute skipped


def test_dropped_blocks_are_not_computed_batch_mode():
    torch.manual_seed(0)
    model = ResidualMLP(width=8, depth=5)
    apply_stochastic_depth(model, 0.3, block_types=(ResidualBlock,))
    wrappers = _wrappers(model)
    fwd = [0] * len(wrappers)
    bwd = [0] * len(wrappers)
    for i, w in enumerate(wrappers):
        w.block.register_forward_pre_hook(lambda m, a, i=i: fwd.__setitem__(i, fwd[i] + 1))
        w.block.register_full_backward_hook(lambda m, gi, go, i=i: bwd.__setitem__(i, bwd[i] + 1))
    with torch.no_grad():
        model.eval()(torch.randn(4, 8))  # verifies the shapes, like Lightning's sanity check
    model.train()
    fwd[:] = [0] * len(wrappers)
    _seed_wrappers(model, 7)
    passes = 40
    for _ in range(passes):
        model(torch.randn(4, 8)).sum().backward()
    # Independent replay of the decisions: one draw per wrapper per pass, in depth order.
    g = torch.Generator().manual_seed(7)
    expected = [0] * len(wrappers)
    for _ in range(passes):
        for i, w in enumerate(wrappers):
            expected[i] += int(bool(torch.rand((), generator=g) < w.survival_prob))
    assert fwd == expected
    assert bwd == expected
    assert min(expected) < passes  # some blocks really were dropped
    assert sum(w.dropped for w in wrappers) == len(wrappers) * passes - sum(expected)


def test_row_mode_runs_block_on_kept_rows_only():
    torch.manual_seed(0)
    model = ResidualMLP(width=8, depth=3)
    apply_stochastic_depth(model, 0.4, block_types=(ResidualBlock,), mode="row")
    wrappers = _wrappers(model)
    seen: list[list[int]] = [[] for _ in wrappers]
    for i, w in enumerate(wrappers):
        w.block.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].shape[0]))
    with torch.no_grad():
        model.eval()(torch.randn(6, 8))
    model.train()
    seen = [[] for _ in wrappers]
    _seed_wrappers(model, 3)
    for _ in range(30):
        model(torch.randn(6, 8)).sum().backward()
    g = torch.Generator().manual_seed(3)
    expected: list[list[int]] = [[] for _ in wrappers]
    for _ in range(30):
        for i, w in enumerate(wrappers):
            k = int((torch.rand(6, generator=g) < w.survival_prob).sum())
            if k:
                expected[i].append(k)
    assert seen == expected
    assert any(0 < k < 6 for ks in seen for k in ks)


# ----------------------------------------------------------------------------- surgery misuse


def test_shape_changing_block_raises_at_first_forward_even_if_dropped():
    block = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    wrapped = StochasticDepthWrapper(block, 0.01)  # the first draw is almost surely a drop
    wrapped.generator = torch.Generator().manual_seed(0)
    with pytest.raises(RuntimeError, match=r"shape-preserving.*\(3, 4\) to \(3, 8\)"):
        wrapped(torch.randn(3, 4))
    # The check ran in eval mode without gradients: the BatchNorm statistics are untouched.
    assert int(block[1].num_batches_tracked) == 0
    with pytest.raises(RuntimeError, match="shape-preserving"):
        StochasticDepthWrapper(nn.Linear(4, 8), 0.5).eval()(torch.randn(3, 4))


def test_nothing_to_wrap_lists_module_types():
    with pytest.raises(RuntimeError, match=r"no shape-preserving block.*Linear, MLP, ReLU"):
        apply_stochastic_depth(MLP(), 0.5)


def test_wrapping_twice_is_refused():
    model = ResidualMLP()
    apply_stochastic_depth(model, 0.5, block_types=(ResidualBlock,))
    with pytest.raises(RuntimeError, match="already wrapped"):
        apply_stochastic_depth(model, 0.5, block_types=(ResidualBlock,))
    with pytest.raises(RuntimeError, match="already wrapped"):
        apply_stochastic_depth(model, 0.5, block_types=(StochasticDepthWrapper,))


def test_remove_restores_exact_module_tree_and_state_dict_keys():
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = tvm.resnet18(weights=None)
    before = [(n, id(m), type(m)) for n, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    changes = apply_stochastic_depth(model, 0.5)
    assert list(model.state_dict()) == list(state)  # no extra ``block.`` level
    # Checkpoints load both ways: plain -> wrapped and wrapped -> plain.
    model.load_state_dict(state)
    plain = tvm.resnet18(weights=None)
    plain.load_state_dict(model.state_dict())
    assert param_hash(plain) == param_hash(model)
    assert model.layer1[0].conv1 is model.layer1[0].block.conv1  # attribute pass-through
    undone = remove_stochastic_depth(model)
    assert sorted(c.path for c in undone) == sorted(c.path for c in changes)
    assert [(n, id(m), type(m)) for n, m in model.named_modules()] == before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_bad_arguments_raise_value_error():
    block = ResidualBlock(4)
    for bad in (0.0, -0.1, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"survival_prob.*\(0, 1\]"):
            StochasticDepthWrapper(block, bad)
        with pytest.raises(ValueError, match=r"survival_prob_last.*\(0, 1\]"):
            apply_stochastic_depth(ResidualMLP(), bad, block_types=(ResidualBlock,))
        with pytest.raises(ValueError, match=r"survival_prob_last.*\(0, 1\]"):
            StochasticDepthCallback(bad)
    with pytest.raises(ValueError, match="`mode` must be one of 'batch', 'row'; got 'rows'"):
        StochasticDepthWrapper(block, 0.5, mode="rows")
    with pytest.raises(ValueError, match="`mode`"):
        StochasticDepthCallback(0.5, mode="sample")
    with pytest.raises(ValueError, match="`schedule` must be one of 'linear', 'uniform'"):
        apply_stochastic_depth(ResidualMLP(), 0.5, schedule="cosine")
    with pytest.raises(ValueError, match="`schedule`"):
        StochasticDepthCallback(0.5, schedule="exp")
    with pytest.raises(ValueError, match=r"cannot import 'no\.such\.Block'"):
        StochasticDepthCallback(0.5, block_types=["no.such.Block"])
    with pytest.raises(ValueError, match=r"nn\.Module subclasses"):
        StochasticDepthCallback(0.5, block_types=["math.pi"])


def test_row_mode_slices_batch_shaped_extra_args_by_position_and_keyword():
    class Extra(nn.Module):
        def forward(self, x, y, *, pair, scale):
            return x + y * pair[0] + pair[1] * scale

    x, y, a, b = torch.randn(6, 3), torch.randn(6, 3), torch.randn(6, 1), torch.randn(1, 3)
    keep = torch.tensor([True, False, True, True, False, True])
    out = stochastic_depth(Extra(), x, keep, 0.5, y, pair=(a, b), scale=2.0)
    ref = x + keep[:, None] * (Extra()(x, y, pair=(a, b), scale=2.0) - x) / 0.5
    torch.testing.assert_close(out, ref)


# ----------------------------------------------------------------------------- Lightning


def _fit_module(depth: int = 4) -> ClassifierModule:
    torch.manual_seed(0)
    return ClassifierModule(ResidualMLP(depth=depth), optimizer="sgd_momentum")


def test_callback_in_trainer_logs_and_never_wraps_twice(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger

    messages: list[str] = []
    monkeypatch.setattr(sd_mod, "rank_zero_info", messages.append)
    module = _fit_module()
    cb = StochasticDepthCallback(0.5, block_types=["tests.helpers.models.ResidualBlock"])
    fractions: dict[int, float] = {}

    class Record(sd_mod.pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            ws = cb.wrappers
            fractions[trainer.global_step - 1] = sum(w.dropped for w in ws) / sum(
                w.drawn for w in ws
            )

    x, y = random_classification(64)
    trainer = tiny_trainer(
        max_steps=8,
        log_every_n_steps=2,
        callbacks=[cb, Record()],
        logger=CSVLogger(tmp_path, name="sd"),
    )
    trainer.fit(module, list_loader(x, y, batch_size=8))
    wrappers = cb.wrappers
    assert len(wrappers) == 4
    trainer.validate(module, list_loader(x, y), verbose=False)
    assert [id(w) for w in _wrappers(module)] == [id(w) for w in wrappers]
    assert len(messages) == 1 and "4 module(s) changed" in messages[0]

    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    logged = {int(r["step"]): r for r in rows if r.get("reg/stochastic_depth/dropped_fraction", "")}
    assert sorted(logged) == [1, 3, 5, 7]  # logging steps only
    for step, r in logged.items():
        assert float(r["reg/stochastic_depth/blocks"]) == 4.0
        assert float(r["reg/stochastic_depth/expected_depth"]) == pytest.approx(
            sum(survival_probabilities(4, 0.5))
        )
        assert float(r["reg/stochastic_depth/dropped_fraction"]) == pytest.approx(fractions[step])
    assert any(fractions.values())
    assert expected_depth(module) == pytest.approx(4 - (0.125 + 0.25 + 0.375 + 0.5))


def test_callback_refuses_model_wrapped_by_someone_else():
    module = _fit_module()
    apply_stochastic_depth(module, 0.5, block_types=(ResidualBlock,))
    x, y = random_classification(16)
    cb = StochasticDepthCallback(block_types=(ResidualBlock,))
    trainer = tiny_trainer(max_steps=1, callbacks=[cb])
    with pytest.raises(RuntimeError, match="already wrapped"):
        trainer.fit(module, list_loader(x, y))


def test_seed_controls_the_drop_stream():
    x, y = random_classification(64)
    hashes = []
    for seed in (1, 1, 2):
        module = _fit_module()
        cb = StochasticDepthCallback(0.3, block_types=(ResidualBlock,), seed=seed)
        tiny_trainer(max_steps=6, callbacks=[cb]).fit(module, list_loader(x, y, batch_size=8))
        hashes.append(param_hash(module))
    assert hashes[0] == hashes[1] != hashes[2]


@pytest.mark.parametrize("mode", ["batch", "row"])
def test_resume_continues_the_same_stream(tmp_path, mode):
    x, y = random_classification(32)

    def run(max_epochs, ckpt=None, torch_seed=0):
        torch.manual_seed(torch_seed)  # the callback's default seed is torch.initial_seed()
        module = ClassifierModule(ResidualMLP(depth=4), optimizer="sgd_momentum")
        torch.manual_seed(torch_seed)
        cb = StochasticDepthCallback(0.3, block_types=(ResidualBlock,), mode=mode)
        trainer = tiny_trainer(max_epochs=max_epochs, callbacks=[cb])
        trainer.fit(module, list_loader(x, y, batch_size=8), ckpt_path=ckpt)
        return trainer, module, cb

    _, straight, cb_straight = run(2)
    trainer, _, cb_half = run(1)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    assert cb_half.state_dict() == {"seed": 0, "counter": 4}
    _, resumed, cb_resumed = run(2, ckpt=tmp_path / "half.ckpt", torch_seed=123)
    assert cb_resumed.seed == cb_straight.seed == 0
    assert cb_resumed.rng.counter == cb_straight.rng.counter == 8
    assert param_hash(resumed) == param_hash(straight)


@pytest.mark.parametrize("mode", ["batch", "row"])
def test_bf16_mixed_trains(mode, bf16):
    module = _fit_module()
    cb = StochasticDepthCallback(0.5, block_types=(ResidualBlock,), mode=mode)
    x, y = random_classification(64)
    trainer = tiny_trainer(max_steps=6, precision=bf16, callbacks=[cb])
    trainer.fit(module, list_loader(x, y, batch_size=8))
    assert trainer.global_step == 6
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert sum(w.drawn for w in cb.wrappers) > 0


# ----------------------------------------------------------------------------- DDP


@pytest.mark.ddp
def test_ddp_batch_mode_shared_decisions_identical_replicas(ddp_pool):
    r0, r1 = ddp_pool.run(fit_callback, "batch", timeout=180)
    assert r0["steps"] == r1["steps"] == 8
    assert r0["seed"] == r1["seed"]
    assert r0["trace"] == r1["trace"]  # all ranks drop the same blocks
    assert any(any(row) for row in r0["trace"])  # blocks really were skipped
    assert r0["hash"] == r1["hash"]


@pytest.mark.ddp
def test_ddp_row_mode_and_disagreeing_ranks_do_not_hang(ddp_pool):
    r0, r1 = ddp_pool.run(fit_callback, "row", 8, 0.1, timeout=180)
    assert r0["steps"] == r1["steps"] == 8
    assert r0["trace"] != r1["trace"]  # per-rank row draws
    assert any(n == 8 for row in r0["trace"] + r1["trace"] for n in row)  # all rows dropped
    assert r0["hash"] == r1["hash"]
    # Ranks skipping *different* whole blocks: still no hang, replicas stay identical.
    r0, r1 = ddp_pool.run(fit_disagreeing_ranks, timeout=180)
    assert r0["steps"] == r1["steps"] == 8
    assert r0["trace"] != r1["trace"]
    assert r0["hash"] == r1["hash"]


# ----------------------------------------------------------------------------- model zoo


@pytest.mark.parametrize("name", sorted(ZOO_BLOCKS))
def test_zoo_default_blocks_eval_exact_state_dict_both_ways_and_training(name):
    model, run = zoo_model(name, dropout=0.0)
    model.eval()
    plain_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = run(model)
    changes = apply_stochastic_depth(model, 0.5)
    assert [c.path for c in changes] == ZOO_BLOCKS[name]
    with torch.no_grad():
        assert torch.equal(run(model), ref)
    assert list(model.state_dict()) == list(plain_state)
    model.load_state_dict(plain_state)
    plain, _ = zoo_model(name, dropout=0.0)
    plain.load_state_dict(model.state_dict())
    assert param_hash(plain) == param_hash(model)
    for mode in ("batch", "row"):
        for w in _wrappers(model):
            w.mode = mode
        model.train()
        _seed_wrappers(model, 0)
        for _ in range(2):
            model.zero_grad()
            out = run(model)
            assert out.shape == ref.shape and torch.isfinite(out).all()
            out.float().square().mean().backward()
            assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        assert sum(w.dropped for w in _wrappers(model)) > 0


def test_timm_resnet_downsample_blocks_are_skipped_by_inspection():
    """Issue 10 #13: naming timm's block type used to wrap the downsampling blocks too."""
    model, run = zoo_model("timm_resnet18")
    changes = apply_stochastic_depth(model, 0.5, block_types=["timm.models.resnet.BasicBlock"])
    assert [c.path for c in changes] == ZOO_BLOCKS["timm_resnet18"]
    assert model.layer4[1].depth_position == (8, 8)  # the 3 downsampling blocks count in L
    model.train()
    _seed_wrappers(model, 0)
    assert run(model).shape == (4, 10)


def _capture_layer_call(model: nn.Module, run, layer: nn.Module) -> tuple[tuple, dict]:
    calls = []
    handle = layer.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True
    )
    with torch.no_grad():
        run(model)
    handle.remove()
    return calls[0]


@pytest.mark.parametrize("name", ["hf_bert", "hf_gpt2", "hf_llama", "torch_encoder"])
def test_row_mode_on_real_layers_equals_masked_full_compute(name):
    """Masks, position ids and rotary embeddings (by position or keyword) are sliced to the
    kept rows: the result equals computing every row and masking (rows are independent)."""
    model, run = zoo_model(name, dropout=0.0)
    (layer,) = [m for n, m in model.named_modules() if n == ZOO_BLOCKS[name][0]]
    args, kwargs = _capture_layer_call(model.eval(), run, layer)
    x, extra = args[0], args[1:]
    assert any(isinstance(v, torch.Tensor) and v.shape[0] == 4 for v in (*extra, *kwargs.values()))
    keep = torch.tensor([True, False, True, False])
    with torch.no_grad():
        out = stochastic_depth(layer, x, keep, 0.5, *extra, **kwargs)
        full = layer(x, *extra, **kwargs)
    full = full[0] if isinstance(full, tuple) else full
    out = out[0] if isinstance(out, tuple) else out
    mask = keep.view(4, *[1] * (x.dim() - 1))
    torch.testing.assert_close(out, x + mask * (full - x) / 0.5, rtol=1e-5, atol=1e-5)


def test_row_mode_seq_first_torch_layer_slices_padding_mask_not_shared_mask():
    """torch's default layout (batch_first=False, batch dim 1) with sequence length == batch:
    the batch-first ``src_key_padding_mask`` is sliced along dim 0 and the shared ``(S, S)``
    ``src_mask`` is not sliced, so the result equals computing every row and masking."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0).eval()
    x = torch.randn(4, 4, 8)  # (S, B, E) with S == B
    pad = torch.zeros(4, 4, dtype=torch.bool)
    pad[0, 3:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    wrapper = StochasticDepthWrapper(layer, 0.5, mode="row")
    assert wrapper.batch_dim == 1
    keep = torch.tensor([True, False, True, True])
    kwargs = {"src_mask": causal, "src_key_padding_mask": pad}
    with torch.no_grad():
        out = stochastic_depth(layer, x, keep, 0.5, batch_dim=1, **kwargs)
        full = layer(x, **kwargs)
    torch.testing.assert_close(out, x + keep[:, None] * (full - x) / 0.5, rtol=1e-5, atol=1e-5)


def test_tuple_output_hidden_state_scaled_rest_passed_through():
    class TupleBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return x + self.fc(x), "attn"

    wrapper = StochasticDepthWrapper(TupleBlock(), 0.5, mode="batch")
    x = torch.randn(2, 3)
    out, extra = stochastic_depth(wrapper.block, x, True, 0.5)
    torch.testing.assert_close(out, x + (wrapper.block(x)[0] - x) / 0.5)
    assert extra == "attn"
    wrapper.generator = torch.Generator().manual_seed(0)
    results = [wrapper(x) for _ in range(20)]
    assert {r[1] for r in results} == {"attn", None}  # dropped: the rest is None
    assert all(torch.equal(r[0], x) for r in results if r[1] is None)


def test_row_mode_one_kept_row_with_batchnorm1d():
    """Issue 10 #14: a draw that keeps exactly one row crashed BatchNorm1d ("Expected more than
    1 value per channel"). The whole batch is computed and masked instead."""
    torch.manual_seed(0)
    block, ref_block = BatchNormResidual(4), BatchNormResidual(4)
    ref_block.load_state_dict(block.state_dict())
    x = torch.randn(5, 4, requires_grad=True)
    keep = torch.tensor([False, False, True, False, False])
    out = stochastic_depth(block, x, keep, 0.25)
    ref = x + keep[:, None] * (ref_block(x) - x) / 0.25
    torch.testing.assert_close(out, ref)
    assert torch.equal(out[~keep], x[~keep])
    torch.testing.assert_close(block.bn.running_mean, ref_block.bn.running_mean)
    out.sum().backward()
    # Through the wrapper: a draw that keeps exactly one of 4 rows, then training continues.
    wrapper = StochasticDepthWrapper(BatchNormResidual(4), 0.3, mode="row")
    seed = next(
        s
        for s in range(100)
        if int(sample_keep(0.3, 4, generator=torch.Generator().manual_seed(s)).sum()) == 1
    )
    wrapper.generator = torch.Generator().manual_seed(seed)
    wrapper(torch.randn(4, 4)).sum().backward()
    assert wrapper.dropped == 3


def test_default_block_types_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="is_residual_block"):
        assert nn.TransformerEncoderLayer in sd_mod.default_block_types()


def test_wrapping_keeps_the_blocks_own_training_flags():
    """A BatchNorm frozen in eval inside a training block stays frozen when the block is wrapped
    (``train(block.training)`` used to reset the whole subtree)."""
    block = BatchNormResidual(4)
    block.bn.eval()
    wrapper = StochasticDepthWrapper(block, 0.5)
    assert wrapper.training and block.training and not block.bn.training
    assert not StochasticDepthWrapper(BatchNormResidual(4).eval(), 0.5).training
