"""Batched augmentation: transforms against independent references, the callback in a Trainer."""

from __future__ import annotations

import math

import kornia.augmentation as K
import kornia.geometry.transform as KG
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as hs

from lightning_reg.augmentation import (
    ColorJitter,
    Compose,
    DataAugmentationCallback,
    FrequencyMasking,
    GaussianNoise,
    RandomAffineCrop,
    RandomErasing,
    RandomHorizontalFlip,
    RandomResizedCrop,
    RandomRotation,
    TimeMasking,
    TokenMasking,
    sample_crop_boxes,
)
from tests.helpers.models import SmallCNN, list_loader, tiny_trainer
from tests.helpers.models_rewriters import RecordingModule, image_data

FAST = settings(max_examples=20, deadline=None)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Fused affine path against exact references
# ---------------------------------------------------------------------------------------------


def _params(box, flip=False, angle=0.0, b=3):
    return {
        "box": torch.tensor([box] * b, dtype=torch.float32),
        "flip": torch.full((b,), flip),
        "angle": torch.full((b,), angle),
    }


@FAST
@given(
    h=hs.integers(4, 12),
    w=hs.integers(4, 12),
    data=hs.data(),
    flip=hs.booleans(),
)
def test_affine_crop_with_box_size_output_is_the_exact_crop(h, w, data, flip):
    bh, bw = data.draw(hs.integers(1, h)), data.draw(hs.integers(1, w))
    y0, x0 = data.draw(hs.integers(0, h - bh)), data.draw(hs.integers(0, w - bw))
    x = torch.rand(3, 2, h, w, generator=gen())
    out = RandomAffineCrop((bh, bw)).apply(x, _params([x0, y0, bw, bh], flip=flip))
    ref = x[..., y0 : y0 + bh, x0 : x0 + bw]
    torch.testing.assert_close(out, ref.flip(-1) if flip else ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("angle", [-40.0, 15.0, 90.0])
def test_affine_rotation_matches_kornia_rotate(angle):
    x = torch.rand(3, 3, 10, 10, generator=gen(1))
    ours = RandomAffineCrop(10).apply(x, _params([0, 0, 10, 10], angle=angle))
    ref = KG.rotate(x, torch.full((3,), angle), align_corners=False)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@FAST
@given(
    h=hs.integers(3, 40),
    w=hs.integers(3, 40),
    s0=hs.floats(0.05, 1.0),
    seed=hs.integers(0, 999),
)
def test_crop_boxes_follow_torchvision_rule(h, w, s0, seed):
    scale, ratio = (s0, 1.0), (3 / 4, 4 / 3)
    boxes, _ = sample_crop_boxes((64, h, w), scale, ratio, gen(seed), None)
    x0, y0, bw, bh = boxes.unbind(1)
    assert torch.equal(boxes, boxes.round())
    assert bool((bw >= 1).all() and (bh >= 1).all())
    assert bool((x0 >= 0).all() and (x0 + bw <= w).all() and (y0 >= 0).all())
    assert bool((y0 + bh <= h).all())
    # area fraction within the scale range up to the rounding of w and h (or the fallback)
    frac = bw * bh / (h * w)
    rounding = (bw + bh + 1) / (h * w)
    fallback = (bw == min(w, round(h * 4 / 3))) | (bh == min(h, round(w * 4 / 3)))
    ok = ((frac >= s0 - rounding - 1e-6) & (frac <= 1 + 1e-6)) | fallback
    assert bool(ok.all())


@pytest.mark.parametrize("h, w", [(10, 10), (9, 16), (16, 9), (7, 30)])
@pytest.mark.parametrize("ratio", [(2.0, 3.0), (0.2, 0.4), (3 / 4, 4 / 3)])
def test_crop_boxes_fallback_is_torchvisions_central_crop(h, w, ratio):
    """When no candidate fits (scale 1 at a foreign aspect ratio), the central crop is used."""
    import torchvision.transforms as T

    if ratio[0] <= w / h <= ratio[1]:
        pytest.skip("the full image fits this ratio, so a candidate fits")
    i, j, bh, bw = T.RandomResizedCrop.get_params(torch.zeros(1, h, w), (1.0, 1.0), ratio)
    boxes, found = sample_crop_boxes((8, 1, h, w), (1.0, 1.0), ratio, gen(), None)
    assert not found.any()
    assert torch.equal(boxes, torch.tensor([[j, i, bw, bh]] * 8, dtype=torch.float32))


def test_random_resized_crop_kornia_full_box_is_identity():
    x = torch.rand(2, 3, 8, 8, generator=gen())
    out = RandomResizedCrop(8).apply(x, {"box": torch.tensor([[0, 0, 8, 8]] * 2).float()})
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    assert RandomResizedCrop((4, 6))(x, gen()).shape == (2, 3, 4, 6)


# ---------------------------------------------------------------------------------------------
# Other transforms
# ---------------------------------------------------------------------------------------------


def test_flip_and_rotation_are_per_sample():
    x = torch.rand(64, 1, 5, 5, generator=gen())
    flip = RandomHorizontalFlip(0.5)
    params = flip.sample_params(x.shape, generator=gen(2))
    assert 0 < int(params["flip"].sum()) < 64
    out = flip.apply(x, params)
    for i in range(64):
        ref = x[i].flip(-1) if params["flip"][i] else x[i]
        assert torch.equal(out[i], ref)
    rot = RandomRotation(30.0, p=0.5)
    rp = rot.sample_params(x.shape, generator=gen(3))
    assert rp["angle"].unique().numel() == 64 and bool((rp["angle"].abs() <= 30).all())
    out = rot.apply(x, rp)
    assert torch.equal(out[~rp["apply"]], x[~rp["apply"]])
    ref = KG.rotate(x[rp["apply"]], rp["angle"][rp["apply"]])
    torch.testing.assert_close(out[rp["apply"]], ref)


@pytest.mark.parametrize(
    "kw, ref",
    [
        ({"brightness": 0.5}, lambda img, p: TF.adjust_brightness(img, p["brightness"])),
        ({"contrast": 0.5}, lambda img, p: TF.adjust_contrast(img, p["contrast"])),
        ({"saturation": 0.5}, lambda img, p: TF.adjust_saturation(img, p["saturation"])),
        ({"hue": 0.2}, lambda img, p: TF.adjust_hue(img, p["hue"])),
    ],
)
def test_color_jitter_matches_torchvision_per_sample(kw, ref):
    x = torch.rand(6, 3, 5, 5, generator=gen())
    jitter = ColorJitter(**kw)
    params = jitter.sample_params(x.shape, generator=gen(4))
    out = jitter.apply(x, params)
    name = next(iter(kw))
    assert params[name].unique().numel() == 6  # a different factor per sample
    for i in range(6):
        expected = ref(x[i], {name: float(params[name][i])})
        torch.testing.assert_close(out[i], expected, atol=2e-3, rtol=0)


def test_random_erasing_box_and_rest():
    x = torch.rand(32, 3, 16, 16, generator=gen()) + 1.0
    er = RandomErasing(p=0.5, scale=(0.05, 0.2), value=0.0)
    params = er.sample_params(x.shape, generator=gen(5))
    out = er.apply(x, params)
    for i in range(32):
        x0, y0, w, h = (int(v) for v in params["box"][i])
        erased = out[i] == 0
        if params["apply"][i]:
            assert erased[:, y0 : y0 + h, x0 : x0 + w].all()
            assert int(erased.sum()) == 3 * w * h
            assert 0.05 - 0.02 <= w * h / 256 <= 0.2 + 0.02 + (w + h) / 256
        else:
            assert torch.equal(out[i], x[i])
    assert 0 < int(params["apply"].sum()) < 32


def test_gaussian_noise_per_sample_std():
    x = torch.zeros(8, 4000)
    noise = GaussianNoise((0.1, 1.0), mean=0.5, p=0.75)
    params = noise.sample_params(x.shape, generator=gen(6))
    out = noise.apply(x, params)
    for i in range(8):
        std = float(params["std"][i])
        if std == 0:
            assert torch.equal(out[i], x[i])
        else:
            assert out[i].std().item() == pytest.approx(std, rel=0.1)
            assert out[i].mean().item() == pytest.approx(0.5, abs=4 * std / math.sqrt(4000))
    assert params["std"].unique().numel() > 2
    with pytest.raises(TypeError, match="floating-point"):
        noise(torch.zeros(2, 3, dtype=torch.long))


def test_token_masking():
    tokens = torch.randint(3, 1000, (16, 256), generator=gen())
    tokens[:, 0] = 0  # [CLS]-like protected token
    tm = TokenMasking(
        0.3,
        mask_token_id=1,
        mask_fraction=0.8,
        random_fraction=0.1,
        vocab_size=1000,
        protected_ids=[0],
    )
    out = tm(tokens, gen(7))
    assert out.dtype == tokens.dtype and torch.equal(out[:, 0], tokens[:, 0])
    masked = (out == 1).float().mean().item()
    assert masked == pytest.approx(0.3 * 0.8, abs=0.02)
    changed = (out != tokens).float().mean().item()
    assert changed == pytest.approx(0.3 * 0.9, abs=0.03)  # random tokens rarely equal the old
    rows_differ = [(out[i] == 1).nonzero().flatten().tolist() for i in range(2)]
    assert rows_differ[0] != rows_differ[1]
    with pytest.raises(TypeError, match="integer token ids"):
        tm(torch.rand(2, 5))
    with pytest.raises(ValueError, match="vocab_size"):
        TokenMasking(0.1, mask_token_id=1, mask_fraction=0.8, random_fraction=0.1)
    with pytest.raises(ValueError, match="mask_fraction"):
        TokenMasking(0.1, mask_token_id=1, mask_fraction=0.8, random_fraction=0.5, vocab_size=9)


@pytest.mark.parametrize("cls, axis", [(TimeMasking, -1), (FrequencyMasking, -2)])
def test_spec_augment_masks_bands_along_its_axis(cls, axis):
    x = torch.rand(16, 1, 20, 30, generator=gen()) + 1.0
    t = cls(7, num_masks=1, value=0.0)
    params = t.sample_params(x.shape, generator=gen(8))
    out = t.apply(x, params)
    other = -2 if axis == -1 else -1
    for i in range(16):
        zeros = out[i, 0] == 0
        band = zeros.all(dim=other)  # positions along `axis` that are fully zero
        start, width = int(params["start"][i, 0]), int(params["width"][i, 0])
        expected = torch.zeros(x.shape[axis], dtype=torch.bool)
        expected[start : start + width] = True
        assert torch.equal(band, expected)
        assert int(zeros.sum()) == width * x.shape[other]
        assert width <= 7
    assert params["start"].unique().numel() > 1


def test_compose_sample_then_apply_equals_forward_and_is_reproducible():
    x = torch.rand(4, 3, 12, 12, generator=gen())
    pipe = Compose([RandomAffineCrop(8, degrees=10.0), ColorJitter(0.2, 0.2), GaussianNoise(0.1)])
    params = pipe.sample_params(x.shape, generator=gen(9))
    a = pipe.apply(x, params)
    b = pipe(x, gen(9))
    assert torch.equal(a, b) and a.shape == (4, 3, 8, 8)
    assert not torch.equal(pipe(x, gen(10)), b)


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: RandomHorizontalFlip(p=1.5), r"`p` must be .*\[0, 1\], got 1.5"),
        (lambda: RandomRotation(10.0, p=math.nan), r"`p` must be .*got nan"),
        (lambda: GaussianNoise(-1.0), r"`std` must be .*\[0, inf\), got -1.0"),
        (lambda: GaussianNoise((0.2, 0.1)), r"`std` must satisfy low <= high"),
        (lambda: GaussianNoise(0.1, p=-0.1), r"`p` must be .*got -0.1"),
        (lambda: RandomAffineCrop(8, scale=(0.0, 1.0)), r"`scale\[0\]` must be .*\(0, 1\]"),
        (lambda: RandomAffineCrop(8, hflip=2.0), r"`hflip` must be .*got 2.0"),
        (lambda: RandomResizedCrop(0), r"`size\[0\]` must be in \[1"),
        (lambda: RandomResizedCrop((8, 8, 8)), r"`size` must be an int or a \(height, width\)"),
        (lambda: ColorJitter(hue=0.7), r"`hue\[0\]` must be .*\[-0.5, 0.5\]"),
        (lambda: ColorJitter(brightness=(2.0, 1.0)), r"`brightness` must satisfy low <= high"),
        (lambda: TimeMasking(-1), r"`max_width` must be"),
        (lambda: RandomErasing(scale=(0.5, 0.1)), r"`scale` must satisfy low <= high"),
        (
            lambda: RandomRotation((1.0, 2.0, 3.0)),
            r"`degrees` must be a number or a \(low, high\) pair",
        ),
    ],
)
def test_transform_validation(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_numpy_scalars_are_accepted():
    """Issue 10: ``np.float32``/``np.int64`` hyperparameters (np.float32 is no Python float)."""
    x = torch.rand(2, 3, 8, 8, generator=gen())
    pairs = [  # (numpy hyperparameters, the same as Python numbers)
        (RandomRotation(np.float32(10.0), p=np.float32(0.5)), RandomRotation(10.0, p=0.5)),
        (GaussianNoise(np.float32(0.5), mean=np.float32(0.25)), GaussianNoise(0.5, mean=0.25)),
        (RandomResizedCrop(np.int64(6)), RandomResizedCrop(6)),
        (
            RandomAffineCrop(np.int64(6), hflip=np.float32(0.5), degrees=np.float32(5.0)),
            RandomAffineCrop(6, hflip=0.5, degrees=5.0),
        ),
        (ColorJitter(np.float32(0.25), hue=np.float32(0.125)), ColorJitter(0.25, hue=0.125)),
        (TimeMasking(np.int64(2), p=np.float32(0.5)), TimeMasking(2, p=0.5)),
    ]
    assert pairs[0][0].degrees == pytest.approx((-10.0, 10.0))
    assert pairs[2][0].size == (6, 6) and type(pairs[2][0].size[0]) is int
    for numpy_version, python_version in pairs:
        out = numpy_version(x, gen())
        assert out.shape[:2] == (2, 3) and not torch.equal(out, x)
        torch.testing.assert_close(out, python_version(x, gen()), rtol=0, atol=1e-6)
    assert DataAugmentationCallback(GaussianNoise(), p=np.float32(0.5)).p == 0.5


def test_compose_accepts_plain_callables_in_the_callback():
    """Issue 10 #11: ``Compose([..., fn])`` in the callback raised; other callables are allowed."""

    def double(img):
        return img * 2

    pipe = Compose([RandomHorizontalFlip(1.0), double, GaussianNoise(0.1)])
    x = torch.rand(4, 3, 6, 6, generator=gen())
    out = DataAugmentationCallback(pipe, seed=0).augment(x)
    again = DataAugmentationCallback(pipe, seed=0)
    assert torch.equal(out, again.augment(x))
    params = again.last_params["transform"]
    assert set(params) == {"0", "2"}  # the plain function has no parameters
    torch.testing.assert_close(pipe.apply(x, params), out, rtol=0, atol=0)
    noise = params["2"]["noise"] * params["2"]["std"].view(-1, 1, 1, 1)
    torch.testing.assert_close(out, x.flip(-1) * 2 + noise)
    kornia_step = Compose([K.RandomHorizontalFlip(p=1.0), GaussianNoise(0.0)])
    torch.testing.assert_close(DataAugmentationCallback(kornia_step).augment(x), x.flip(-1))
    with pytest.raises(RuntimeError, match=r"Use Compose\.draw_and_apply"):
        pipe.sample_params(x.shape)


@pytest.mark.parametrize(
    "transform",
    [
        RandomHorizontalFlip(0.5),
        RandomResizedCrop(5),
        RandomRotation(30.0, p=0.5),
        RandomErasing(1.0),
        RandomAffineCrop(5, degrees=20.0),
    ],
    ids=lambda t: type(t).__name__,
)
def test_image_transforms_accept_b_h_w_input(transform):
    """Issue 10: the documented ``(B, H, W)`` input works and equals the ``(B, 1, H, W)`` one."""
    x = torch.rand(6, 9, 9, generator=gen())
    params = transform.sample_params(x.shape, generator=gen(1))
    out = transform.apply(x, params)
    ref = transform.apply(x.unsqueeze(1), params).squeeze(1)
    assert out.shape == ref.shape and out.shape[0] == 6 and out.ndim == 3
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Callback
# ---------------------------------------------------------------------------------------------


def _fit(callbacks, *, precision="32-true", loader=None, val=True, epochs=1):
    x, y = image_data(16)
    module = RecordingModule(SmallCNN(in_channels=3, num_classes=4))
    trainer = tiny_trainer(
        max_epochs=epochs, precision=precision, callbacks=callbacks, log_every_n_steps=1
    )
    trainer.fit(
        module,
        loader or list_loader(x, y, batch_size=8),
        list_loader(x, y, batch_size=8) if val else None,
    )
    return module, trainer, (x, y)


def test_callback_augments_training_inputs_only(precision):
    pl.seed_everything(0, verbose=False)
    cb = DataAugmentationCallback(Compose([RandomHorizontalFlip(1.0), GaussianNoise(0.0)]), p=0.5)
    module, trainer, (x, y) = _fit([cb], precision=precision)
    for step, (xb, yb) in enumerate(module.train_batches):
        sl = slice(8 * step, 8 * step + 8)
        assert torch.equal(yb, y[sl])
        flipped = torch.tensor([xb[i].equal(x[sl][i].flip(-1)) for i in range(8)])
        same = torch.tensor([xb[i].equal(x[sl][i]) for i in range(8)])
        assert bool((flipped | same).all())
    last = cb.last_params["selected"]
    assert torch.equal(flipped, last)
    for step, (xb, _) in enumerate(module.val_batches):
        assert torch.equal(xb, x[8 * step : 8 * step + 8])
    logged = trainer.callback_metrics["reg/augmentation/applied_fraction"]  # the last step's
    assert logged.item() == pytest.approx(last.float().mean().item())


def test_callback_with_kornia_is_reproducible_and_keeps_global_rng():
    aug = K.AugmentationSequential(
        K.RandomHorizontalFlip(p=0.5), K.RandomResizedCrop((8, 8), scale=(0.5, 1.0))
    )
    runs = []
    for _ in range(2):
        pl.seed_everything(4, verbose=False)
        module, _, _ = _fit([DataAugmentationCallback(aug, p=0.75)], val=False)
        runs.append(module.train_batches)
    for (xa, _), (xb, _) in zip(*runs):
        assert torch.equal(xa, xb)
    x = torch.rand(8, 3, 8, 8)
    cb = DataAugmentationCallback(aug)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    cb.augment(x)
    assert torch.equal(torch.rand(3), expected), "the callback must not consume the global RNG"


def test_callback_samples_differ_and_state_round_trips():
    x = torch.zeros(8, 3, 6, 6)
    a = DataAugmentationCallback(RandomAffineCrop(6, degrees=20.0), seed=3)
    a.augment(x)
    p = a.last_params["transform"]
    assert p["angle"].unique().numel() == 8 and p["box"].unique(dim=0).shape[0] > 1
    state = a.state_dict()
    b = DataAugmentationCallback(RandomAffineCrop(6, degrees=20.0), seed=77)
    b.load_state_dict(state)
    y = torch.rand(8, 3, 6, 6)
    assert torch.equal(a.augment(y), b.augment(y))


def test_callback_errors():
    with pytest.raises(ValueError, match="`p` must be"):
        DataAugmentationCallback(GaussianNoise(), p=1.2)
    with pytest.raises(ValueError, match="`p` must be"):
        DataAugmentationCallback(GaussianNoise(), p=math.nan)
    with pytest.raises(TypeError, match="callable"):
        DataAugmentationCallback("flip")  # type: ignore[arg-type]
    cb = DataAugmentationCallback(RandomAffineCrop(4), p=0.5)
    with pytest.raises(RuntimeError, match="keep the input shape"):
        cb.augment(torch.rand(2, 3, 8, 8))
    with pytest.raises(RuntimeError, match="not a tensor"):
        DataAugmentationCallback(lambda x: (x, x)).augment(torch.rand(2, 3))

    from torch.utils.data import DataLoader, default_collate

    from tests.helpers.models import ListDataset

    x, y = image_data(8)
    tuples = DataLoader(
        ListDataset(x, y), batch_size=8, collate_fn=lambda b: tuple(default_collate(b))
    )
    with pytest.raises(RuntimeError, match="tuple"):
        _fit([DataAugmentationCallback(GaussianNoise())], loader=tuples, val=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_draws_on_device_reproducibly_and_keep_global_rng():
    from lightning_reg.label_smoothing import smooth_labels
    from lightning_reg.mixing import CutMixCallback, MixUpCallback, MixUpCutMixCallback

    dev = torch.device("cuda")
    x = torch.rand(16, 3, 12, 12, device=dev)
    y = torch.randint(0, 5, (16,), device=dev)
    kornia_aug = K.AugmentationSequential(K.RandomHorizontalFlip(), K.RandomAffine(15.0)).to(dev)
    transforms = [
        Compose([RandomAffineCrop(8, degrees=10.0), ColorJitter(0.3, 0.3, 0.3, 0.1)]),
        Compose([RandomHorizontalFlip(), RandomResizedCrop(8), RandomRotation(10.0)]),
        Compose([RandomErasing(1.0), GaussianNoise((0.0, 0.1)), TimeMasking(3)]),
        kornia_aug,
    ]
    for transform in transforms:
        outs = []
        for _ in range(2):
            cb = DataAugmentationCallback(transform, seed=1)
            torch.cuda.manual_seed(0)
            expected = torch.rand(3, device=dev)
            torch.cuda.manual_seed(0)
            outs.append(cb.augment(x))
            assert torch.equal(torch.rand(3, device=dev), expected)
        assert outs[0].device.type == "cuda" and torch.equal(outs[0], outs[1])
    tokens = torch.randint(2, 50, (4, 32), device=dev)
    tm = TokenMasking(0.5, mask_token_id=1, mask_fraction=0.5, random_fraction=0.5, vocab_size=50)
    assert tm(tokens, torch.Generator(device=dev).manual_seed(0)).device.type == "cuda"
    for cls in (MixUpCallback, CutMixCallback, MixUpCutMixCallback):
        for mode in ("batch", "sample"):
            a = cls(num_classes=5, mode=mode, seed=2).mix_batch(x, y)
            b = cls(num_classes=5, mode=mode, seed=2).mix_batch(x, y)
            assert a[0].device.type == "cuda" and torch.equal(a[0], b[0])
            torch.testing.assert_close(a[1].sum(1), torch.ones(16, device=dev))
    torch.testing.assert_close(
        smooth_labels(y, 0.1, 5), smooth_labels(y.cpu(), 0.1, 5).to(dev), rtol=0, atol=0
    )
    # Labels >= num_classes: a clear error on the first step on the device too (not a
    # device-side assert from F.one_hot).
    from lightning_reg.label_smoothing import LabelSmoothingCallback

    bad = torch.full((16,), 7, device=dev)
    with pytest.raises(RuntimeError, match=r"Class labels must be in \[0, 4\] for num_classes=5"):
        MixUpCallback(num_classes=5).mix_batch(x, bad)
    with pytest.raises(RuntimeError, match=r"Class labels must be in \[0, 4\] for num_classes=5"):
        LabelSmoothingCallback(num_classes=5).smooth(bad)
