"""MixUp / CutMix: maths against independent checks, then the callbacks in a real Trainer."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import scipy.stats as st
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as hs
from timm.data.mixup import mixup_target

from lightning_reg.core.targets import to_soft_targets
from lightning_reg.label_smoothing import LabelSmoothingCallback, smooth_labels
from lightning_reg.mixing import (
    CutMixCallback,
    MixUpCallback,
    MixUpCutMixCallback,
    cutmix,
    cutmix_boxes,
    mixup,
    sample_beta,
)
from tests.distributed.scenarios_augmentation import fit_draws
from tests.helpers.models import SmallCNN, list_loader, tiny_trainer
from tests.helpers.models_rewriters import ParamRecorder, RecordingModule, image_data

FAST = settings(max_examples=25, deadline=None)


def recover_convex_pairs(x, x_mix, y, y_mix, atol=1e-5):
    """For each i, find (j, λ) with x̃_i = λ·x_i + (1−λ)·x_j using only the data; check ỹ."""
    flat, mixed = x.flatten(1).double(), x_mix.flatten(1).double()
    lams = []
    for i in range(len(x)):
        diff = flat[i] - flat  # x_i - x_j for every j
        target = mixed[i] - flat  # x̃_i - x_j
        denom = (diff * diff).sum(1)
        lam = torch.where(denom > 0, (target * diff).sum(1) / denom.clamp_min(1e-300), 1.0)
        resid = (target - lam[:, None] * diff).norm(dim=1)
        j = int(resid.argmin())
        assert resid[j] < atol, f"sample {i} is not a convex pair of batch samples"
        lam_j = float(lam[j]) if j != i else 1.0
        assert -1e-6 <= lam_j <= 1 + 1e-6
        expected_y = lam_j * y[i].double() + (1 - lam_j) * y[j].double()
        torch.testing.assert_close(y_mix[i].double(), expected_y, atol=1e-5, rtol=0)
        lams.append(lam_j)
    return lams


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------


@FAST
@given(
    b=hs.integers(2, 8),
    d=hs.integers(2, 6),
    lam=hs.floats(0.0, 1.0),
    per_sample=hs.booleans(),
    seed=hs.integers(0, 2**16),
)
def test_mixup_is_convex_pair_with_same_lambda_for_targets(b, d, lam, per_sample, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g)
    y = torch.softmax(torch.randn(b, 5, generator=g), dim=1)
    perm = torch.randperm(b, generator=g)
    lam_t = torch.rand(b, generator=g) if per_sample else torch.tensor([lam])
    x_mix, y_mix = mixup(x, y, lam_t, perm)
    recover_convex_pairs(x, x_mix, y, y_mix)
    torch.testing.assert_close(y_mix.sum(1), torch.ones(b))


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_per_sample_lambda_passes_ks_test_and_is_reproducible(alpha):
    x, y = torch.randn(2000, 1), torch.zeros(2000, dtype=torch.long)
    lams = []
    for seed in (0, 0, 1):
        cb = MixUpCallback(alpha, num_classes=2, mode="sample", seed=seed)
        cb.mix_batch(x, y)
        lams.append(cb.last_params["lam"])
    assert st.kstest(lams[0].double().numpy(), st.beta(alpha, alpha).cdf).pvalue > 1e-3
    assert torch.equal(lams[0], lams[1]) and not torch.equal(lams[0], lams[2])


def test_sample_beta_is_a_deprecated_reproducible_alias():
    g = torch.Generator().manual_seed(3)
    with pytest.warns(DeprecationWarning, match=r"torch\.distributions\.Beta"):
        lam = sample_beta(0.5, 2.0, (3000,), generator=g, dtype=torch.float64)
        again = sample_beta(0.5, 2.0, (3000,), generator=torch.Generator().manual_seed(3))
    assert st.kstest(lam.numpy(), st.beta(0.5, 2.0).cdf).pvalue > 1e-3
    torch.testing.assert_close(lam.float(), again)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="`alpha` must be"):
        sample_beta(0.0, 1.0, (3,))


@FAST
@given(
    b=hs.integers(2, 6),
    k=hs.integers(2, 7),
    lam=hs.floats(0.0, 1.0),
    smoothing=hs.floats(0.0, 1.0),
    seed=hs.integers(0, 999),
)
def test_smoothed_mixed_targets_match_timm_mixup_target(b, k, lam, smoothing, seed):
    """Independent reference: timm's ``mixup_target`` (smooth, then mix with the flipped batch)."""
    y = torch.randint(0, k, (b,), generator=torch.Generator().manual_seed(seed))
    soft = to_soft_targets(y, k, smoothing=smoothing).double()
    _, ours = mixup(torch.zeros(b, 1), soft, lam, torch.arange(b).flip(0))
    ref = mixup_target(y, k, lam=lam, smoothing=smoothing).double()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


@FAST
@given(
    h=hs.integers(2, 12),
    w=hs.integers(2, 12),
    lam=hs.floats(0.0, 1.0),
    seed=hs.integers(0, 2**16),
    per_sample=hs.booleans(),
)
def test_cutmix_target_weight_equals_pasted_pixel_fraction(h, w, lam, seed, per_sample):
    b, k = 6, 6
    g = torch.Generator().manual_seed(seed)
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 2, h, w).clone()
    y = F.one_hot(torch.arange(b), k).float()
    perm = torch.randperm(b, generator=g)
    lam_t = torch.rand(b, generator=g) if per_sample else torch.tensor([lam])
    boxes = cutmix_boxes(lam_t, h, w, generator=g)
    x_mix, y_mix, lam_exact = cutmix(x, y, boxes, perm)
    for i in range(b):
        j = int(perm[i])
        pasted = (x_mix[i] == j).float().mean().item() if j != i else 0.0
        own = (x_mix[i] == i).float().mean().item()
        assert own + pasted == pytest.approx(1.0)
        if j != i:
            assert y_mix[i, j].item() == pytest.approx(pasted, abs=1e-6)
            assert y_mix[i, i].item() == pytest.approx(1 - pasted, abs=1e-6)
        li = lam_exact[i if per_sample else 0].item()
        if j != i:
            assert li == pytest.approx(1 - pasted, abs=1e-6)
        # the unclipped box has area fraction ~(1 - λ); clipping only shrinks it
        assert 1 - li <= (1 - lam_t[i if per_sample else 0].item()) + 1e-6


@pytest.mark.parametrize("size, lam", [(10, 0.5), (9, 0.3), (15, 0.6), (32, 0.75)])
def test_cutmix_box_has_the_documented_size_for_odd_cuts(size, lam):
    """Issue 10 #15: an unclipped box is exactly ⌊H·√(1−λ)⌋ wide (was 2·⌊cut/2⌋ for odd cuts)."""
    cut = math.floor(size * math.sqrt(1 - lam))
    boxes = cutmix_boxes(torch.full((2000,), lam), size, size, generator=torch.Generator())
    y0, y1, x0, x1 = boxes.unbind(1)
    inside_y = (y0 > 0) & (y1 < size)
    inside_x = (x0 > 0) & (x1 < size)
    assert inside_y.any() and inside_x.any()
    assert torch.equal((y1 - y0)[inside_y], torch.full_like(y0[inside_y], cut))
    assert torch.equal((x1 - x0)[inside_x], torch.full_like(x0[inside_x], cut))
    assert bool(((y1 - y0) <= cut).all() and ((x1 - x0) <= cut).all())
    # λ is the exact pasted area, also for the odd side
    x = torch.arange(2, dtype=torch.float32).view(2, 1, 1, 1).expand(2, 1, size, size)
    box = torch.tensor([[1, 1 + cut, 1, 1 + cut]])
    x_mix, _, lam_exact = cutmix(x, torch.eye(2), box, torch.tensor([1, 0]))
    assert int((x_mix[0] == 1).sum()) == cut * cut
    assert lam_exact.item() == pytest.approx(1 - cut * cut / size**2)


def test_cutmix_box_is_clipped_at_border():
    lam = torch.full((500,), 0.3)
    boxes = cutmix_boxes(lam, 10, 10, generator=torch.Generator().manual_seed(0))
    y0, y1, x0, x1 = boxes.unbind(1)
    assert bool((y0 >= 0).all() and (y1 <= 10).all() and (x0 >= 0).all() and (x1 <= 10).all())
    area = (y1 - y0) * (x1 - x0)
    assert area.max() == 64  # floor(10·√0.7) = 8: the unclipped box is 8×8
    assert (area < area.max()).any(), "some boxes must be clipped at the border"


# ---------------------------------------------------------------------------------------------
# Callbacks (no Trainer): params, per-sample randomness, reproducibility, state
# ---------------------------------------------------------------------------------------------


def test_callback_lambda_stream_passes_ks_test():
    cb = MixUpCallback(0.4, num_classes=3, seed=11)
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 2, 0])
    lams = []
    for _ in range(400):
        cb.mix_batch(x, y)
        lams.append(float(cb.last_params["lam"]))
    assert st.kstest(lams, st.beta(0.4, 0.4).cdf).pvalue > 1e-3


def test_sample_mode_draws_different_lambda_per_sample_and_is_reproducible():
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    a = MixUpCallback(1.0, num_classes=3, mode="sample", seed=5)
    xa, ya = a.mix_batch(x, y)
    assert a.last_params["lam"].unique().numel() > 1
    recover_convex_pairs(x, xa, F.one_hot(y, 3).float(), ya)
    b = MixUpCallback(1.0, num_classes=3, mode="sample", seed=5)
    xb, yb = b.mix_batch(x, y)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = MixUpCallback(1.0, num_classes=3, mode="sample", seed=6)
    assert not torch.equal(c.mix_batch(x, y)[0], xa)


def test_generator_state_round_trips():
    y = torch.randint(0, 3, (8,))
    a = CutMixCallback(1.0, num_classes=3, seed=1, mode="sample")
    x4 = torch.randn(8, 1, 6, 6)
    for _ in range(3):
        a.mix_batch(x4, y)
    state = a.state_dict()
    b = CutMixCallback(1.0, num_classes=3, seed=99, mode="sample")
    b.load_state_dict(state)
    assert torch.equal(a.mix_batch(x4, y)[0], b.mix_batch(x4, y)[0])


def test_soft_targets_are_mixed_directly_and_work_with_cross_entropy():
    cb = MixUpCallback(0.5, num_classes=4, seed=0)
    x = torch.randn(6, 3)
    soft = torch.softmax(torch.randn(6, 4), 1)
    x_mix, y_mix = cb.mix_batch(x, soft)
    recover_convex_pairs(x, x_mix, soft, y_mix)
    logits = torch.randn(6, 4)
    expected = -(y_mix * torch.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(F.cross_entropy(logits, y_mix), expected)
    with pytest.raises(RuntimeError, match="num_classes=4"):
        cb.mix_batch(x, torch.softmax(torch.randn(6, 5), 1))


def test_p_zero_keeps_inputs_and_gives_one_hot_targets():
    x, y = torch.randn(6, 3, 4, 4), torch.randint(0, 3, (6,))
    for cb in (
        MixUpCallback(1.0, num_classes=3, p=0.0),
        CutMixCallback(1.0, num_classes=3, p=0.0),
        MixUpCallback(1.0, num_classes=3, p=0.0, mode="sample"),
        MixUpCutMixCallback(num_classes=3, p=0.0, mode="sample"),
    ):
        x_mix, y_mix = cb.mix_batch(x, y)
        assert torch.equal(x_mix, x)
        assert torch.equal(y_mix, F.one_hot(y, 3).float())
    smoothed = MixUpCallback(num_classes=3, p=0.0, label_smoothing=0.3).mix_batch(x, y)[1]
    torch.testing.assert_close(smoothed, smooth_labels(y, 0.3, 3), rtol=0, atol=0)


@pytest.mark.parametrize("switch_prob", [0.0, 1.0])
@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_switch_picks_mixup_or_cutmix(switch_prob, mode):
    b, k = 8, 8
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 1, 8, 8).clone()
    x = x + torch.rand(b, 1, 8, 8) * 0.01  # distinct pixels for the convex-pair check
    y = torch.arange(b)
    cb = MixUpCutMixCallback(
        mixup_alpha=1.0, cutmix_alpha=1.0, num_classes=k, switch_prob=switch_prob, mode=mode, seed=2
    )
    x_mix, y_mix = cb.mix_batch(x, y)
    onehot = F.one_hot(y, k).float()
    if switch_prob == 0.0:
        recover_convex_pairs(x, x_mix, onehot, y_mix)
    else:
        perm = cb.last_params["perm"]
        for i in range(b):
            from_j = torch.isclose(x_mix[i], x[int(perm[i])]).float().mean()
            if int(perm[i]) != i:
                assert y_mix[i, int(perm[i])] == pytest.approx(from_j.item(), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0.0, -0.5, math.nan, math.inf])
def test_alpha_out_of_range(bad):
    with pytest.raises(ValueError, match=r"`alpha` must be a finite number in \(0"):
        MixUpCallback(bad, num_classes=3)
    with pytest.raises(ValueError, match=r"`alpha` must be a finite number in \(0"):
        CutMixCallback(bad, num_classes=3)
    if bad != 0.0:  # 0 disables one method of the combined callback
        with pytest.raises(ValueError, match=r"`mixup_alpha` must be"):
            MixUpCutMixCallback(mixup_alpha=bad, num_classes=3)
        with pytest.raises(ValueError, match=r"`cutmix_alpha` must be"):
            MixUpCutMixCallback(cutmix_alpha=bad, num_classes=3)
    with pytest.raises(ValueError, match="`mixup_alpha` or `cutmix_alpha` must be > 0"):
        MixUpCutMixCallback(mixup_alpha=0.0, cutmix_alpha=0, num_classes=3)
    with pytest.raises(ValueError, match=r"`label_smoothing` must be .*\[0, 1\]"):
        MixUpCallback(num_classes=3, label_smoothing=1.5)


def test_numpy_scalars_are_accepted():
    """Issue 10: numpy scalars (e.g. from a sweep config) are valid hyperparameters."""
    cb = MixUpCallback(np.float32(0.1), num_classes=np.int64(3), label_smoothing=np.float32(0.1))
    assert cb.mixup_alpha == pytest.approx(0.1) and isinstance(cb.mixup_alpha, float)
    assert cb.num_classes == 3 and isinstance(cb.num_classes, int)
    both = MixUpCutMixCallback(
        mixup_alpha=np.float64(0.2), cutmix_alpha=np.float32(1.0), num_classes=3, p=np.float32(0.5)
    )
    assert (both.mixup_alpha, both.cutmix_alpha, both.p) == pytest.approx((0.2, 1.0, 0.5))
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    assert both.mix_batch(x, y)[1].shape == (4, 3)


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan])
def test_p_and_switch_prob_out_of_range(bad):
    # (core.validation words NaN as "must be a finite number"; ranges as "must be in [0, 1]")
    with pytest.raises(ValueError, match=rf"`p` must be .*{bad}"):
        MixUpCallback(num_classes=3, p=bad)
    with pytest.raises(ValueError, match=rf"`switch_prob` must be .*{bad}"):
        MixUpCutMixCallback(num_classes=3, switch_prob=bad)


def test_other_construction_errors():
    with pytest.raises(ValueError, match="`num_classes` must be"):
        MixUpCallback(num_classes=0)
    with pytest.raises(ValueError, match="`mode` must be"):
        CutMixCallback(num_classes=3, mode="pixel")
    with pytest.raises(ValueError, match="`until_epoch` must be"):
        MixUpCallback(num_classes=3, until_epoch=-1)


def test_runtime_errors_are_clear():
    cb = MixUpCallback(num_classes=3)
    with pytest.raises(RuntimeError, match=r"Class labels must be in \[0, 2\].*got labels in"):
        cb.mix_batch(torch.randn(4, 2), torch.tensor([0, 1, 3, 0]))
    with pytest.raises(RuntimeError, match="floating-point"):
        cb.mix_batch(torch.randint(0, 255, (4, 2)), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(RuntimeError, match="spatial"):
        CutMixCallback(num_classes=3).mix_batch(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]))


# ---------------------------------------------------------------------------------------------
# Real Trainer
# ---------------------------------------------------------------------------------------------


def _fit(callbacks, *, epochs=1, precision="32-true", batches=None, val=True, ckpt_path=None):
    x, y = image_data(16)
    module = RecordingModule(SmallCNN(in_channels=3, num_classes=4))
    trainer = tiny_trainer(
        max_epochs=epochs, precision=precision, callbacks=callbacks, log_every_n_steps=1
    )
    loader = batches if batches is not None else list_loader(x, y, batch_size=8)
    val_loader = list_loader(x, y, batch_size=8) if val else None
    trainer.fit(module, loader, val_loader, ckpt_path=ckpt_path)
    return module, trainer, (x, y)


def test_trainer_mixup_rewrites_training_batches_only(precision):
    pl.seed_everything(0, verbose=False)
    cb = MixUpCallback(0.4, num_classes=4, until_epoch=1)
    module, trainer, (x, y) = _fit([cb], epochs=2, precision=precision)
    assert len(module.train_batches) == 4
    for step, (xb, yb) in enumerate(module.train_batches[:2]):
        sl = slice(8 * step, 8 * step + 8)
        assert yb.dtype == torch.float32 and yb.shape == (8, 4)
        recover_convex_pairs(x[sl], xb, F.one_hot(y[sl], 4).float(), yb, atol=1e-4)
    for step, (xb, yb) in enumerate(module.train_batches[2:]):  # until_epoch=1: untouched
        sl = slice(8 * step, 8 * step + 8)
        assert torch.equal(xb, x[sl]) and torch.equal(yb, y[sl])
    for step, (xb, yb) in enumerate(module.val_batches):
        sl = slice(8 * (step % 2), 8 * (step % 2) + 8)
        assert torch.equal(xb, x[sl]) and torch.equal(yb, y[sl])
    assert "reg/mixup/lambda" in trainer.callback_metrics
    assert torch.isfinite(trainer.callback_metrics["train_loss"])


def test_trainer_cutmix_is_reproducible_under_seed_everything():
    runs = []
    for _ in range(2):
        pl.seed_everything(3, verbose=False)
        cb = CutMixCallback(1.0, num_classes=4, mode="sample")
        module, _, _ = _fit([cb], val=False)
        runs.append(module.train_batches)
    for (xa, ya), (xb, yb) in zip(*runs):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_trainer_errors_tuple_batch_and_bad_label():
    from torch.utils.data import DataLoader, default_collate

    from tests.helpers.models import ListDataset

    x, y = image_data(8)
    tuples = DataLoader(
        ListDataset(x, y), batch_size=8, collate_fn=lambda b: tuple(default_collate(b))
    )
    with pytest.raises(RuntimeError, match="tuple"):
        _fit([MixUpCallback(num_classes=4)], batches=tuples, val=False)
    with pytest.raises(RuntimeError, match="num_classes"):
        _fit(
            [MixUpCallback(num_classes=4)],
            batches=list_loader(x, torch.full((8,), 4), batch_size=8),
            val=False,
        )


def test_num_classes_other_than_the_model_output_gets_a_clear_error():
    """Issue 10: num_classes=5 on a 4-logit model; torch alone says "0D or 1D target expected"."""
    with pytest.raises(RuntimeError) as info:
        _fit([MixUpCallback(num_classes=5)], val=False)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "MixUpCallback" in notes and "num_classes=5" in notes
    assert "number of logits your model outputs" in notes


def test_label_smoothing_argument_smooths_then_mixes_in_trainer():
    pl.seed_everything(2, verbose=False)
    mixer = CutMixCallback(1.0, num_classes=4, mode="sample", label_smoothing=0.3, until_epoch=1)
    rec = ParamRecorder(mixer)
    module, _, (x, y) = _fit([mixer, rec], val=False, epochs=2)
    for step, ((_, yb), params) in enumerate(zip(module.train_batches[:2], rec.params)):
        sl = slice(8 * step, 8 * step + 8)
        smooth = smooth_labels(y[sl], 0.3, 4)
        lam = params["lam"].view(-1, 1)
        torch.testing.assert_close(yb, lam * smooth + (1 - lam) * smooth[params["perm"]])
        assert not torch.equal(yb, smooth)
    for step, (xb, yb) in enumerate(module.train_batches[2:]):  # after until_epoch: smoothed only
        sl = slice(8 * step, 8 * step + 8)
        assert torch.equal(xb, x[sl])
        torch.testing.assert_close(yb, smooth_labels(y[sl], 0.3, 4), rtol=0, atol=0)


def test_stacking_label_smoothing_callback_says_use_the_argument():
    for order in (0, 1):
        cbs = [MixUpCallback(num_classes=4), LabelSmoothingCallback(0.1)]
        with pytest.raises(RuntimeError, match=r"pass `label_smoothing=0.1` to MixUpCallback"):
            _fit(cbs[::-1] if order else cbs, val=False)


def test_resume_continues_the_same_draws(tmp_path):
    """An interrupted run resumed from a checkpoint draws what the uninterrupted run drew."""
    pl.seed_everything(1, verbose=False)
    full = MixUpCallback(0.5, num_classes=4, mode="sample")
    rec_full = ParamRecorder(full)
    _fit([full, rec_full], epochs=2, val=False)

    pl.seed_everything(1, verbose=False)
    first = MixUpCallback(0.5, num_classes=4, mode="sample")
    _, trainer, _ = _fit([first], epochs=1, val=False)
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)

    pl.seed_everything(12345, verbose=False)  # a different seed: the stream must come from ckpt
    second = MixUpCallback(0.5, num_classes=4, mode="sample")
    rec_second = ParamRecorder(second)
    _fit([second, rec_second], epochs=2, val=False, ckpt_path=str(ckpt))
    assert len(rec_second.params) == 2
    for got, want in zip(rec_second.params, rec_full.params[2:]):
        assert torch.equal(got["lam"], want["lam"]) and torch.equal(got["perm"], want["perm"])


@pytest.mark.ddp
def test_ddp_ranks_draw_differently_and_reproducibly(ddp_pool):
    out = ddp_pool.run(fit_draws)
    again = ddp_pool.run(fit_draws)
    r0, r1 = out
    assert (r0["rank"], r1["rank"]) == (0, 1)
    for step in range(2):
        assert not torch.equal(r0["mix"][step]["lam"], r1["mix"][step]["lam"])
        assert not torch.equal(
            r0["aug"][step]["transform"]["noise"], r1["aug"][step]["transform"]["noise"]
        )
    for a, b in zip(out, again):
        for step in range(2):
            assert torch.equal(a["mix"][step]["lam"], b["mix"][step]["lam"])
            assert torch.equal(a["aug"][step]["selected"], b["aug"][step]["selected"])


@pytest.mark.ddp
def test_ddp_bf16(ddp_pool):
    out = ddp_pool.run(fit_draws, "bf16-mixed")
    assert [o["target_dtype"] for o in out] == ["torch.float32", "torch.float32"]
