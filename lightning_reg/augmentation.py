"""Batched, on-device data augmentation and the callback that applies it to training batches.

The maths: ``x̃ = T_θ(x)`` on the training batch only, with random parameters ``θ`` drawn **per
sample**, on the batch's device, from a ``torch.Generator``. Every built-in transform separates
drawing its parameters (:meth:`BatchTransform.sample_params`) from applying them
(:meth:`BatchTransform.apply`), so tests and users can fix the parameters.

Pure torch first (no Lightning needed):

* images (floats ``(B, C, H, W)``, also ``(B, H, W)`` and ``(B, ..., H, W)``; :class:`ColorJitter`
  needs RGB ``(B, 3, H, W)``): :class:`RandomHorizontalFlip`, :class:`RandomResizedCrop`,
  :class:`RandomRotation`, :class:`ColorJitter`, :class:`RandomErasing` (the image ops call
  kornia's functional API), and :class:`RandomAffineCrop`, the fast fused path: flip, random
  resized crop and rotation composed into ONE affine matrix per sample and a single resampling;
* any modality: :class:`GaussianNoise`;
* integer token sequences (NLP): :class:`TokenMasking`;
* spectrograms ``(B, ..., F, T)`` (SpecAugment): :class:`TimeMasking`, :class:`FrequencyMasking`;
* :class:`Compose` chains transforms and hands the generator on.

Then the Lightning class, :class:`DataAugmentationCallback`, which rewrites the training batch in
``on_train_batch_start`` and never touches validation, test or predict batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from lightning_reg.core.batch import BatchKey, BatchSlot
from lightning_reg.core.logging import is_logging_step, log_scalars
from lightning_reg.core.random import CallbackRNG, seeded_global_rng
from lightning_reg.core.validation import check_choice, check_int, check_probability, check_range

__all__ = [
    "BatchTransform",
    "ColorJitter",
    "Compose",
    "DataAugmentationCallback",
    "FrequencyMasking",
    "GaussianNoise",
    "RandomAffineCrop",
    "RandomErasing",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "RandomRotation",
    "TimeMasking",
    "TokenMasking",
]

Params = dict[str, Any]
Shape = tuple[int, ...]
Pair = tuple[float, float]  # a (low, high) range
TensorFn = Callable[[torch.Tensor], torch.Tensor]
Dev = torch.device | str | None  # the device to draw on (None: torch's default device)
Gen = torch.Generator | None  # None: the global torch RNG


# --------------------------------------------------------------------------------------------
# Helpers and random draws
# --------------------------------------------------------------------------------------------


def _rand(shape: Shape, gen: Gen, device: Dev, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """``U[low, high)`` of ``shape`` on ``device`` from ``gen`` (the global RNG if ``None``)."""
    u = torch.rand(shape, generator=gen, device=device)
    return u if low == 0.0 and high == 1.0 else u * (high - low) + low  # no kernel for U[0, 1)


def _range(name: str, value: Any, lo: float = -math.inf, hi: float = math.inf, **kw: Any) -> Pair:
    """``value`` as ``(a, b)`` with ``lo <= a <= b <= hi`` (``kw``: ``check_range``'s options).

    A number ``v >= 0`` means ``(centre - v, centre + v)`` with ``kw["centre"]``, else ``(v, v)``.
    """
    centre = kw.pop("centre", None)
    if not isinstance(value, Sequence):
        v = check_range(name, value, 0.0)
        value = (v, v) if centre is None else (centre - v, centre + v)
    if len(value) != 2:
        raise ValueError(f"`{name}` must be a number or a (low, high) pair, got {value!r}")
    a, b = (check_range(f"{name}[{i}]", v, lo, hi, **kw) for i, v in enumerate(value))
    if a > b:
        raise ValueError(f"`{name}` must satisfy low <= high, got {tuple(value)!r}")
    return (a, b)


def _hw(shape: Shape, who: object, what: str = "images (B, C, H, W) or (B, H, W)") -> Pair:
    """The last two sizes of ``shape``, which must have at least 3 dims."""
    if len(shape) < 3:
        raise ValueError(f"{type(who).__name__} expects {what}, got shape {tuple(shape)}")
    return int(shape[-2]), int(shape[-1])


def _check_float(x: torch.Tensor, who: object) -> None:
    if not x.is_floating_point():
        hint = "convert images with `x.float() / 255` first"
        raise TypeError(f"{type(who).__name__} expects floating-point input, got {x.dtype}; {hint}")


def _per_sample(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a ``(B,)`` tensor so that it broadcasts over the other dims of ``x``."""
    return mask.view(-1, *([1] * (x.ndim - 1)))


def _bchw(x: torch.Tensor, who: object) -> torch.Tensor:
    """Float images ``x`` as ``(B, C, H, W)``, so that ``(B, H, W)`` and ``(B, ..., H, W)`` work."""
    _hw(x.shape, who)
    _check_float(x, who)
    return x.reshape(x.shape[0], -1, *x.shape[-2:])


def _band(size: int, start: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """``(*start.shape, size)``: whether position ``i`` lies in ``[start, start + width)``."""
    pos = torch.arange(size, device=start.device, dtype=start.dtype)
    return (pos >= start[..., None]) & (pos < (start + width)[..., None])


def sample_crop_boxes(
    shape: Shape, scale: Pair, ratio: Pair, generator: Gen, device: Dev, strict: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample random boxes in images of ``shape`` ``(B, ..., H, W)`` (torchvision's rule).

    For each sample, 10 candidates with area fraction ``~U(scale)`` and log aspect ratio
    ``log(w / h) ~U(log ratio)`` are drawn at once; the first one that fits (strictly inside the
    image if ``strict``, as ``torchvision.transforms.RandomErasing`` wants) is placed uniformly.
    Where none fits, the box is the central crop clamped to ``ratio``, exactly as
    ``torchvision.transforms.RandomResizedCrop`` falls back.

    Args:
        shape: the batch shape; only ``B``, ``H`` and ``W`` are read.
        scale: ``(low, high)`` range of the box area as a fraction of ``H · W``.
        ratio: ``(low, high)`` range of the aspect ratio ``w / h``.
        generator: the generator to draw from (``None``: the global torch RNG).
        device: the device to draw on (``None``: torch's default device).
        strict: whether a box must fit strictly inside the image (``w < W`` and ``h < H``).

    Returns:
        ``(boxes, found)``: a float tensor ``(B, 4)`` of integer-valued ``(x0, y0, w, h)`` in
        pixels, and a bool ``(B,)`` that says where a candidate fitted (else the fallback).

    Example:
        >>> boxes, found = sample_crop_boxes((4, 3, 32, 32), (0.5, 1.0), (3 / 4, 4 / 3), None, None)
        >>> boxes.shape, bool(found.all())
        (torch.Size([4, 4]), True)
    """
    n, height, width = (shape[0], 10), shape[-2], shape[-1]
    area = _rand(n, generator, device, *scale) * (height * width)
    aspect = torch.exp(_rand(n, generator, device, math.log(ratio[0]), math.log(ratio[1])))
    w, h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    fits = (w < width) & (h < height) if strict else (w <= width) & (h <= height)
    valid = fits & (w > 0) & (h > 0)
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    u = _rand((shape[0], 2), generator, device)
    x0, y0 = torch.floor(u[:, 0] * (width - w + 1)), torch.floor(u[:, 1] * (height - h + 1))
    fw, fh = min(width, round(height * ratio[1])), min(height, round(width / ratio[0]))
    central, found = ((width - fw) // 2, (height - fh) // 2, fw, fh), valid.any(dim=1)
    box = [torch.where(found, b, c) for b, c in zip((x0, y0, w, h), central)]  # no host copy
    return torch.stack(box, dim=1), found


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


class BatchTransform(nn.Module):
    """Base class: a batched transform with per-sample random parameters.

    Subclasses implement :meth:`sample_params` (draws only, from ``generator`` on ``device``)
    and :meth:`apply` (deterministic given the parameters). ``forward(x, generator)`` does both.

    Args:
        p: for subclasses that transform each sample with a probability: that probability, in
            [0, 1], validated and stored as ``self.p``. ``None`` (default): no ``p``.

    Raises:
        ValueError: if ``p`` is outside [0, 1] or NaN.

    Example:
        >>> noise = GaussianNoise(0.1)  # a BatchTransform
        >>> x = torch.zeros(4, 3)
        >>> noise(x, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([4, 3])
    """

    def __init__(self, p: float | None = None) -> None:
        super().__init__()
        if p is not None:
            self.p = check_probability("p", p)

    def output_shape(self, shape: Shape) -> Shape:
        """The shape of the output for an input of ``shape`` (default: unchanged)."""
        return tuple(shape)

    def sample_params(self, shape: Shape, *, device: Dev = None, generator: Gen = None) -> Params:
        """Draw the random parameters for a batch of ``shape`` on ``device``."""
        raise NotImplementedError  # pragma: no cover - abstract

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        """Apply the transform to ``x`` with fixed ``params``."""
        raise NotImplementedError  # pragma: no cover - abstract

    def draw_and_apply(self, x: torch.Tensor, generator: Gen = None) -> tuple[torch.Tensor, Params]:
        """Draw parameters for ``x`` from ``generator``, apply them; return both."""
        params = self.sample_params(tuple(x.shape), device=x.device, generator=generator)
        return self.apply(x, params), params

    def forward(self, x: torch.Tensor, generator: Gen = None) -> torch.Tensor:
        return self.draw_and_apply(x, generator)[0]

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))


class Compose(BatchTransform):
    """Apply ``transforms`` in order, handing the generator to each :class:`BatchTransform`.

    Other callables (kornia augmentations, any ``fn(x) -> x``) are called with ``x`` alone and
    draw from the global torch RNG (which :class:`DataAugmentationCallback` seeds per step).
    :meth:`sample_params` needs every step to be a :class:`BatchTransform`;
    :meth:`draw_and_apply` (what the callback uses) takes any steps and returns the parameters.

    Args:
        transforms: the transforms, in order.

    Example:
        >>> pipeline = Compose([RandomAffineCrop(32, hflip=0.5), GaussianNoise(0.05)])
        >>> pipeline(torch.rand(4, 3, 40, 40)).shape
        torch.Size([4, 3, 32, 32])
    """

    def __init__(self, transforms: Sequence[BatchTransform | TensorFn]) -> None:
        super().__init__()
        for i, t in enumerate(transforms):
            if not callable(t):
                raise TypeError(f"`transforms[{i}]` must be callable, got {t!r}")
        self.transforms = list(transforms)
        self._modules_list = nn.ModuleList([t for t in transforms if isinstance(t, nn.Module)])

    def output_shape(self, shape: Shape) -> Shape:
        for i, t in enumerate(self.transforms):
            if not isinstance(t, BatchTransform):
                raise RuntimeError(
                    f"Compose needs BatchTransform steps to predict shapes and parameters; step "
                    f"{i} is {t!r}. Use Compose.draw_and_apply (or call the Compose) instead."
                )
            shape = t.output_shape(shape)
        return shape

    def sample_params(self, shape: Shape, *, device: Dev = None, generator: Gen = None) -> Params:
        """Parameters of every step (only when every step is a :class:`BatchTransform`)."""
        self.output_shape(shape)  # raises unless every step is a BatchTransform
        params: Params = {}
        for i, t in enumerate(self.transforms):
            params[str(i)] = t.sample_params(shape, device=device, generator=generator)
            shape = t.output_shape(shape)
        return params

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        for i, t in enumerate(self.transforms):
            x = t.apply(x, params[str(i)]) if isinstance(t, BatchTransform) else t(x)
        return x

    def draw_and_apply(self, x: torch.Tensor, generator: Gen = None) -> tuple[torch.Tensor, Params]:
        """Draw and apply step by step (other callables use the global RNG); return the params.

        Unlike :meth:`sample_params` this works with any callable step.
        """
        params: Params = {}
        for i, t in enumerate(self.transforms):
            if isinstance(t, BatchTransform):
                x, params[str(i)] = t.draw_and_apply(x, generator)
            else:
                x = t(x)
        return x, params

    def extra_repr(self) -> str:
        return ""


class RandomHorizontalFlip(BatchTransform):
    """Flip each image left-right with probability ``p`` (per sample), any ``(B, ..., W)``.

    Args:
        p: probability that a sample is flipped, in [0, 1].

    Raises:
        ValueError: if ``p`` is outside [0, 1] or NaN.

    Example:
        >>> RandomHorizontalFlip(p=1.0)(torch.arange(3.0).view(1, 1, 1, 3))
        tensor([[[[2., 1., 0.]]]])
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p)

    def sample_params(self, shape: Shape, *, device: Dev = None, generator: Gen = None) -> Params:
        return {"flip": _rand(shape[:1], generator, device) < self.p}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return torch.where(_per_sample(params["flip"], x), x.flip(-1), x)


class RandomResizedCrop(BatchTransform):
    """Crop a random box per sample and resize it to ``size`` (kornia ``crop_and_resize``).

    The boxes follow torchvision's ``RandomResizedCrop`` (see :func:`sample_crop_boxes`).

    Args:
        size: output ``(height, width)``, or one int for a square.
        scale: range of the box area as a fraction of the image area, within (0, 1].
        ratio: range of the box aspect ratio ``w / h`` (sampled log-uniformly), positive.
        mode: interpolation, ``"bilinear"`` or ``"nearest"``.

    Raises:
        ValueError: for a non-positive size, a scale outside (0, 1] or a non-positive ratio.

    Example:
        >>> RandomResizedCrop(8)(torch.rand(2, 3, 16, 16)).shape
        torch.Size([2, 3, 8, 8])
    """

    def __init__(
        self,
        size: int | tuple[int, int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        mode: str = "bilinear",
    ) -> None:
        super().__init__()
        size = size if isinstance(size, Sequence) else (size, size)
        if len(size) != 2:
            raise ValueError(f"`size` must be an int or a (height, width) pair, got {size!r}")
        self.size = (check_int("size[0]", size[0], 1), check_int("size[1]", size[1], 1))
        self.scale = _range("scale", scale, 0.0, 1.0, low_inclusive=False)
        self.ratio = _range("ratio", ratio, 0.0, math.inf, low_inclusive=False)
        self.mode = check_choice("mode", mode, ("bilinear", "nearest"))

    def output_shape(self, shape: Shape) -> Shape:
        return (*shape[:-2], *self.size)

    def sample_params(self, shape: Shape, *, device: Dev = None, generator: Gen = None) -> Params:
        _hw(shape, self)
        return {"box": sample_crop_boxes(shape, self.scale, self.ratio, generator, device)[0]}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        import kornia.geometry as KG

        corners = KG.bbox_generator(*params["box"].to(x.dtype).unbind(1))  # (B, 4, 2), inclusive
        out = KG.crop_and_resize(_bchw(x, self), corners, self.size, self.mode, align_corners=True)
        return out.reshape(*x.shape[:-2], *self.size)


class RandomRotation(BatchTransform):
    """Rotate each image by an angle ``~U(degrees)`` about its centre (kornia ``rotate``).

    Positive angles rotate counter-clockwise; uncovered corners are filled with zeros.

    Args:
        degrees: ``d`` for ``U(-d, d)``, or a ``(low, high)`` range in degrees.
        p: probability that a sample is rotated, in [0, 1].
        mode: interpolation, ``"bilinear"`` or ``"nearest"``.

    Raises:
        ValueError: for a negative ``degrees``, ``low > high`` or ``p`` outside [0, 1].

    Example:
        >>> RandomRotation(15.0)(torch.rand(2, 3, 8, 8)).shape
        torch.Size([2, 3, 8, 8])
    """

    def __init__(self, degrees: float | Pair, p: float = 1.0, mode: str = "bilinear") -> None:
        super().__init__(p)
        self.degrees = _range("degrees", degrees, centre=0.0)
        self.mode = check_choice("mode", mode, ("bilinear", "nearest"))

    def sample_params(self, shape: Shape, *, device: Dev = None, generator: Gen = None) -> Params:
        angle = _rand(shape[:1], generator, device, *self.degrees)
        return {"angle": angle, "apply": _rand(shape[:1], generator, device) < self.p}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        import kornia.geometry as KG

        rotated = KG.rotate(_bchw(x, self), params["angle"].to(x.dtype), mode=self.mode)
        return torch.where(_per_sample(params["apply"], x), rotated.reshape(x.shape), x)


class ColorJitter(BatchTransform):
    """Random brightness, contrast, saturation and hue per sample (torchvision semantics).

    Factors are drawn per sample: brightness, contrast and saturation from ``[1-v, 1+v]``
    (``v`` a number) or a given range; hue from ``[-h, h]`` in turns (``h <= 0.5``). They are
    applied in that fixed order with kornia's ``adjust_brightness_accumulative``,
    ``adjust_contrast_with_mean_subtraction``, ``adjust_saturation_with_gray_subtraction`` and
    ``adjust_hue``. Inputs are RGB in [0, 1]; outputs are clamped to [0, 1].

    Args:
        brightness: brightness jitter.
        contrast: contrast jitter.
        saturation: saturation jitter.
        hue: hue jitter in turns, within [0, 0.5].
        p: probability that a sample is jittered, in [0, 1].

    Raises:
        ValueError: for negative strengths, ``hue > 0.5`` or ``p`` outside [0, 1].

    Example:
        >>> ColorJitter(0.4, 0.4, 0.4, 0.1)(torch.rand(2, 3, 8, 8)).shape
        torch.Size([2, 3, 8, 8])
    """

    _FACTORS = ("brightness", "contrast", "saturation", "hue")

    def __init__(
        self,
        brightness: float | tuple[float, float] = 0.0,
        contrast: float | tuple[float, float] = 0.0,
        saturation: float | tuple[float, float] = 0.0,
        hue: float | tuple[float, float] = 0.0,
        p: float = 1.0,
    ) -> None:
        super().__init__(p)
        for name, value in zip(self._FACTORS, (brightness, contrast, saturation)):
            low, high = _range(name, value, centre=1.0)
            setattr(self, name, (max(low, 0.0), high))
        self.hue = _range("hue", hue, -0.5, 0.5, centre=0.0)

    def sample_params(self, shape: Shape, *, device: Dev = None, generator: Gen = None) -> Params:
        params = {k: _rand(shape[:1], generator, device, *getattr(self, k)) for k in self._FACTORS}
        return {**params, "apply": _rand(shape[:1], generator, device) < self.p}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        import kornia.enhance as KE

        _check_float(x, self)
        if x.ndim < 3 or x.shape[-3] != 3:
            raise ValueError(f"ColorJitter expects RGB images (B, 3, H, W), got {tuple(x.shape)}")
        f, out = {k: v.to(x.dtype) for k, v in params.items()}, x.clamp(0.0, 1.0)
        if self.brightness != (1.0, 1.0):  # factors that are always the identity are skipped
            out = KE.adjust_brightness_accumulative(out, f["brightness"])
        if self.contrast != (1.0, 1.0):
            out = KE.adjust_contrast_with_mean_subtraction(out, f["contrast"])
        if self.saturation != (1.0, 1.0):
            out = KE.adjust_saturation_with_gray_subtraction(out, f["saturation"])
        if self.hue != (0.0, 0.0):
            out = KE.adjust_hue(out, f["hue"] * (2 * math.pi))  # turns to radians
        return torch.where(_per_sample(params["apply"], x), out.clamp(0.0, 1.0), x)


class RandomErasing(BatchTransform):
    """Erase a random rectangle per sample (Zhong et al. 2020; torchvision's box rule).

    For each sample, up to 10 boxes with area fraction ``~U(scale)`` and log aspect ratio
    ``~U(log ratio)`` are drawn at once and the first that fits strictly inside the image is
    filled with ``value`` on every channel. If none fits, the sample is left unchanged.

    Args:
        p: probability that a sample is erased, in [0, 1].
        scale: range of the erased area as a fraction of the image, within (0, 1].
        ratio: range of the aspect ratio ``h / w``, positive.
        value: the fill value.

    Raises:
        ValueError: for ``p`` outside [0, 1], bad ranges or a non-finite value.

    Example:
        >>> RandomErasing(p=1.0)(torch.rand(2, 3, 16, 16)).shape
        torch.Size([2, 3, 16, 16])

    Reference:
        Zhong et al., "Random Erasing Data Augmentation", AAAI 2020.
    """

    def __init__(
        self, p: float = 0.5, scale: Pair = (0.02, 0.33), ratio: Pair = (0.3, 3.3), value: float = 0
    ) -> None:
        super().__init__(p)
        self.scale = _range("scale", scale, 0.0, 1.0, low_inclusive=False)
        self.ratio = _range("ratio", ratio, 0.0, math.inf, low_inclusive=False)
        self.value = check_range("value", value)

    def sample_params(self, shape: Shape, *, device: Dev = None, generator: Gen = None) -> Params:
        _hw(shape, self)
        r0, r1 = self.ratio  # our ratio is h / w: log(w / h) ~ U(-log r1, -log r0)
        box, found = sample_crop_boxes(shape, self.scale, (1 / r1, 1 / r0), generator, device, True)
        return {"box": box, "apply": found & (_rand(shape[:1], generator, device) < self.p)}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        x0, y0, w, h = params["box"].unbind(1)
        rows, cols = _band(x.shape[-2], y0, h), _band(x.shape[-1], x0, w)
        mask = rows[:, None, :, None] & cols[:, None, None, :] & params["apply"].view(-1, 1, 1, 1)
        return x.reshape(len(x), -1, *x.shape[-2:]).masked_fill(mask, self.value).view_as(x)


class RandomAffineCrop(RandomResizedCrop):
    """Fused flip + random resized crop + rotation: one affine matrix per sample, one warp.

    Each of these transforms is an affine map of the sampling grid, so their composition is
    one ``2×3`` matrix per sample; the image is resampled once (``F.affine_grid`` +
    ``F.grid_sample``, bilinear, ``align_corners=False``) instead of once per transform. This
    is both faster and sharper than chaining :class:`RandomHorizontalFlip`,
    :class:`RandomResizedCrop` and :class:`RandomRotation`. The crop boxes follow torchvision's
    ``RandomResizedCrop`` rule; the rotation turns the crop about its centre; samples falling
    outside the image read ``padding_mode``. No antialiasing is applied when shrinking.

    Args:
        size: output ``(height, width)``, or one int for a square.
        scale: range of the crop area as a fraction of the image area, within (0, 1].
        ratio: range of the crop aspect ratio ``w / h``, positive.
        hflip: probability of a horizontal flip per sample, in [0, 1].
        degrees: rotation ``d`` for ``U(-d, d)`` or a ``(low, high)`` range (0 = none).
        padding_mode: ``"zeros"``, ``"border"`` or ``"reflection"``.
        mode: interpolation, ``"bilinear"`` or ``"nearest"``.

    Raises:
        ValueError: for bad sizes, ranges, probabilities or modes.

    Example:
        >>> crop = RandomAffineCrop(32, scale=(0.5, 1.0), hflip=0.5, degrees=10.0)
        >>> crop(torch.rand(8, 3, 40, 40)).shape
        torch.Size([8, 3, 32, 32])
    """

    def __init__(
        self,
        size: int | tuple[int, int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        hflip: float = 0.5,
        degrees: float | tuple[float, float] = 0.0,
        padding_mode: str = "zeros",
        mode: str = "bilinear",
    ) -> None:
        super().__init__(size, scale, ratio, mode)
        self.hflip = check_probability("hflip", hflip)
        self.degrees = _range("degrees", degrees, centre=0.0)
        modes = ("zeros", "border", "reflection")
        self.padding_mode = check_choice("padding_mode", padding_mode, modes)

    def sample_params(self, shape: Shape, *, device: Dev = None, generator: Gen = None) -> Params:
        params = super().sample_params(shape, device=device, generator=generator)
        u = _rand((shape[0], 2), generator, device)
        low, high = self.degrees
        return {**params, "flip": u[:, 0] < self.hflip, "angle": u[:, 1] * (high - low) + low}

    @staticmethod
    def matrix(params: Params, height: int, width: int) -> torch.Tensor:
        """The ``(B, 2, 3)`` ``affine_grid`` matrices: output to input normalised coordinates.

        With input pixel coordinates ``q`` relative to the image centre, an output point ``u``
        in ``[-1, 1]²`` reads ``q = c + R(θ) · diag(w/2, h/2) · diag(±1, 1) · u`` where ``c`` is the
        box centre, ``(w, h)`` its size and ``θ`` the angle; ``affine_grid`` wants
        ``diag(2/W, 2/H) · q``.
        """
        x0, y0, bw, bh = params["box"].float().unbind(1)
        theta = torch.deg2rad(params["angle"].float())
        cos, sin = torch.cos(theta), torch.sin(theta)
        sx, sy = torch.where(params["flip"], -0.5 * bw, 0.5 * bw), 0.5 * bh
        # R(θ) in y-down pixel coordinates; positive θ turns the content counter-clockwise.
        row_x = torch.stack([cos * sx, -sin * sy, (2 * x0 + bw - width) / 2], dim=1) * (2 / width)
        row_y = torch.stack([sin * sx, cos * sy, (2 * y0 + bh - height) / 2], dim=1) * (2 / height)
        return torch.stack([row_x, row_y], dim=1)

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        img = _bchw(x, self)
        theta = self.matrix(params, *img.shape[-2:]).to(x.dtype)
        grid = F.affine_grid(theta, [x.shape[0], 1, *self.size], align_corners=False)
        out = F.grid_sample(img, grid, self.mode, self.padding_mode, align_corners=False)
        return out.reshape(*x.shape[:-2], *self.size)


class GaussianNoise(BatchTransform):
    """Add ``N(mean, std²)`` noise, any modality; ``std`` may be drawn per sample from a range.

    Args:
        std: the standard deviation, or a ``(low, high)`` range drawn uniformly per sample.
        mean: the noise mean.
        p: probability that a sample gets noise, in [0, 1].
        clip: optional ``(low, high)`` to clamp the result to.

    Raises:
        ValueError: for a negative or non-finite ``std``, ``p`` outside [0, 1] or a bad ``clip``.

    Example:
        >>> GaussianNoise(0.1)(torch.zeros(2, 5)).shape
        torch.Size([2, 5])
    """

    def __init__(
        self, std: float | Pair = 0.1, mean: float = 0.0, p: float = 1.0, clip: Pair | None = None
    ) -> None:
        super().__init__(p)
        self.std = _range("std", std, 0.0)
        self.mean = check_range("mean", mean)
        self.clip = None if clip is None else _range("clip", clip)

    def sample_params(self, shape: Shape, *, device: Dev = None, generator: Gen = None) -> Params:
        std = _rand(shape[:1], generator, device, *self.std)
        if self.p < 1.0:
            std = torch.where(_rand(shape[:1], generator, device) < self.p, std, 0.0)
        return {"std": std, "noise": torch.randn(shape, generator=generator, device=device)}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        _check_float(x, self)
        noise = params["noise"].to(x.dtype)
        out = torch.addcmul(x, noise, _per_sample(params["std"].to(x.dtype), noise))
        if self.mean != 0.0:
            out = out + torch.where(_per_sample(params["std"], x) > 0, self.mean, 0.0).to(x.dtype)
        return out if self.clip is None else out.clamp(*self.clip)


class TokenMasking(BatchTransform):
    """Corrupt integer token sequences: mask or replace each token with probability ``p``.

    Each token is selected with probability ``p`` (never ``protected_ids``, e.g. padding and
    special tokens). A selected token becomes ``mask_token_id`` with probability
    ``mask_fraction``, a uniform random token from ``[0, vocab_size)`` with probability
    ``random_fraction``, and stays as it is otherwise (BERT uses 0.8 / 0.1).

    Args:
        p: per-token selection probability, in [0, 1].
        mask_token_id: the id that replaces masked tokens.
        mask_fraction: share of selected tokens masked, in [0, 1].
        random_fraction: share of selected tokens replaced by random ones, in [0, 1].
        vocab_size: vocabulary size, needed when ``random_fraction > 0``.
        protected_ids: token ids that are never selected.

    Raises:
        ValueError: for probabilities outside [0, 1], ``mask_fraction + random_fraction > 1``,
            or ``random_fraction > 0`` without ``vocab_size``.

    Example:
        >>> tokens = torch.randint(5, 100, (2, 16))
        >>> TokenMasking(0.15, mask_token_id=4)(tokens).shape
        torch.Size([2, 16])

    Reference:
        Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers", NAACL 2019.
    """

    def __init__(
        self,
        p: float = 0.15,
        *,
        mask_token_id: int,
        mask_fraction: float = 1.0,
        random_fraction: float = 0.0,
        vocab_size: int | None = None,
        protected_ids: list[int] | None = None,
    ) -> None:
        super().__init__(p)
        self.mask_token_id = check_int("mask_token_id", mask_token_id)
        self.mask_fraction = check_probability("mask_fraction", mask_fraction)
        self.random_fraction = check_probability("random_fraction", random_fraction)
        total = self.mask_fraction + self.random_fraction
        check_range("mask_fraction + random_fraction", total, 0.0, 1.0 + 1e-12)
        self.vocab_size = None if vocab_size is None else check_int("vocab_size", vocab_size, 1)
        if self.random_fraction > 0 and self.vocab_size is None:
            raise ValueError("`vocab_size` is required when `random_fraction` > 0, got None")
        self.protected_ids = [check_int("protected_ids[i]", i) for i in (protected_ids or [])]

    def sample_params(self, shape: Shape, *, device: Dev = None, generator: Gen = None) -> Params:
        # One uniform per token: [0, p·mask_fraction) masks, the next p·random_fraction replaces.
        u, cut = _rand(shape, generator, device), self.p * self.mask_fraction
        params = {"mask": u < cut, "random": (u >= cut) & (u < cut + self.p * self.random_fraction)}
        if self.random_fraction == 0:
            return params
        tokens = torch.randint(self.vocab_size, shape, generator=generator, device=device)
        return {**params, "tokens": tokens}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"TokenMasking expects integer token ids, got {x.dtype}")
        out = x.masked_fill(params["mask"], self.mask_token_id)
        if "tokens" in params:
            out = torch.where(params["random"], params["tokens"].to(x.dtype), out)
        if self.protected_ids:  # protected tokens keep their id
            out = torch.where(torch.isin(x, x.new_tensor(self.protected_ids)), x, out)
        return out


class _AxisMasking(BatchTransform):
    """SpecAugment masking of ``num_masks`` bands along ``axis`` (-1, -2) of ``(B, ..., F, T)``."""

    axis: int

    def __init__(self, max_width: int, num_masks: int = 1, value: float = 0.0, p: float = 1.0):
        super().__init__(p)
        self.max_width = check_int("max_width", max_width, 0)
        self.num_masks = check_int("num_masks", num_masks, 0)
        self.value = check_range("value", value)

    def sample_params(self, shape: Shape, *, device: Dev = None, generator: Gen = None) -> Params:
        size = _hw(shape, self, "spectrograms (B, ..., freq, time)")[self.axis]
        u = _rand((shape[0], self.num_masks, 2), generator, device)
        width = torch.floor(u[..., 0] * (min(self.max_width, size) + 1))
        start = torch.floor(u[..., 1] * (size - width + 1))
        width = torch.where(_rand((shape[0], 1), generator, device) < self.p, width, 0.0)
        return {"start": start, "width": width}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        band = _band(x.shape[self.axis], params["start"], params["width"]).any(dim=1)  # (B, size)
        band = band.view(len(x), *[1] * (x.ndim - 2), -1)  # along the last axis
        return x.masked_fill(band if self.axis == -1 else band.transpose(-1, -2), self.value)


class TimeMasking(_AxisMasking):
    """SpecAugment time masking: ``num_masks`` bands of ``~U{0..max_width}`` steps per sample.

    The input is a spectrogram batch ``(B, ..., freq, time)``; the bands along the last axis are
    set to ``value``. A band of width ``w`` starts uniformly in ``[0, T - w]``.

    Args:
        max_width: the largest band width, in time steps (>= 0).
        num_masks: bands per sample (>= 0).
        value: the fill value.
        p: probability that a sample is masked, in [0, 1].

    Raises:
        ValueError: for negative widths or counts, or ``p`` outside [0, 1].

    Example:
        >>> TimeMasking(10, num_masks=2)(torch.rand(2, 1, 40, 100)).shape
        torch.Size([2, 1, 40, 100])

    Reference:
        Park et al., "SpecAugment", Interspeech 2019.
    """

    axis = -1


class FrequencyMasking(_AxisMasking):
    """SpecAugment frequency masking: like :class:`TimeMasking` along the frequency axis (-2).

    Args:
        max_width: the largest band width, in frequency bins (>= 0).
        num_masks: bands per sample (>= 0).
        value: the fill value.
        p: probability that a sample is masked, in [0, 1].

    Raises:
        ValueError: for negative widths or counts, or ``p`` outside [0, 1].

    Example:
        >>> FrequencyMasking(8)(torch.rand(2, 1, 40, 100)).shape
        torch.Size([2, 1, 40, 100])

    Reference:
        Park et al., "SpecAugment", Interspeech 2019.
    """

    axis = -2


# --------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------


class DataAugmentationCallback(pl.Callback):
    """Apply a batched transform to the inputs of every training batch, on the batch's device.

    The inputs are rewritten in ``on_train_batch_start`` (the object ``training_step``
    receives); validation, test and predict batches are never touched. Each sample gets the
    transform with probability ``p`` (a per-sample mask and ``torch.where``).

    Randomness: every step draws from the callback's own generator seeded from
    ``(seed, rank, step counter)`` (see :class:`CallbackRNG`): per sample, on the device,
    reproducible under ``seed_everything``, different on each DDP rank, and resumed exactly from
    a checkpoint. Built-in :class:`BatchTransform` objects receive that generator; any other
    callable (e.g. kornia's ``AugmentationSequential``) runs with the global torch RNG seeded
    from it for the duration of the call (and restored afterwards), so it gets the same
    guarantees. The transform runs under ``torch.no_grad()``.

    Args:
        transform: any batched callable ``x -> x̃``, e.g. a :class:`Compose` of built-ins or a
            kornia ``AugmentationSequential``.
        p: probability that each sample is transformed, in [0, 1]. With ``p < 1`` the
            transform must keep the input's shape.
        input_key: list index or dict key of the inputs in the batch.
        getter: optional ``getter(batch) -> Tensor`` for other batch types.
        setter: optional ``setter(batch, value)`` that writes the inputs back.
        seed: fixed seed for the stream; ``None`` uses ``torch.initial_seed()``.

    Raises:
        ValueError: if ``p`` is outside [0, 1] (NaN included).
        TypeError: if ``transform`` is not callable.
        RuntimeError: during training, for a tuple batch, or a transform that changes the shape
            while ``p < 1`` or returns no tensor.

    Example:
        >>> from lightning_reg.augmentation import Compose, GaussianNoise, RandomAffineCrop
        >>> cb = DataAugmentationCallback(
        ...     Compose([RandomAffineCrop(32, scale=(0.35, 1.0)), GaussianNoise(0.03)]))
        >>> # Trainer(callbacks=[cb])

    Reference:
        Shorten & Khoshgoftaar, "A survey on Image Data Augmentation for Deep Learning",
        J. Big Data 2019.
    """

    def __init__(
        self,
        transform: BatchTransform | TensorFn,
        *,
        p: float = 1.0,
        input_key: BatchKey = 0,
        getter: Callable[[Any], torch.Tensor] | None = None,
        setter: Callable[[Any, torch.Tensor], None] | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if not callable(transform):
            raise TypeError(f"`transform` must be callable, got {transform!r}")
        self.transform = transform
        # A plain callable (e.g. kornia) runs inside a Compose, which returns no parameters for it.
        self._pipe = transform if isinstance(transform, BatchTransform) else Compose([transform])
        self.p = check_probability("p", p)
        self.input = BatchSlot(input_key, getter=getter, setter=setter, role="input")
        self.rng = CallbackRNG(seed, salt=0xA06)
        self.last_params: Params | None = None

    @property
    @override
    def state_key(self) -> str:
        key = {"input_key": self.input.key, "transform": type(self.transform).__name__}
        return self._generate_state_key(**key)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.rng.setup(trainer)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """Draw this step's randomness and return the augmented ``x`` (no batch access)."""
        generator, step_seed = self.rng.next(x.device)
        params: Params = {}
        with torch.no_grad(), seeded_global_rng(step_seed, x.device):
            if self.p < 1.0:
                params["selected"] = _rand(x.shape[:1], generator, x.device) < self.p
            out, params["transform"] = self._pipe.draw_and_apply(x, generator)
            if not isinstance(out, torch.Tensor):
                raise RuntimeError(f"The transform returned a {type(out).__name__}, not a tensor")
            if self.p < 1.0:
                if out.shape != x.shape:
                    raise RuntimeError(
                        f"With p={self.p} < 1 the transform must keep the input shape, but it maps "
                        f"{tuple(x.shape)} to {tuple(out.shape)}: use p=1.0 or keep the shape"
                    )
                out = torch.where(_per_sample(params["selected"], x), out.to(x.dtype), x)
        self.last_params = params
        return out

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.input.set(batch, self.augment(self.input.get(batch)))
        if self.p < 1.0 and is_logging_step(trainer):
            fraction = self.last_params["selected"].float().mean()  # type: ignore[index]
            log_scalars(pl_module, {"reg/augmentation/applied_fraction": fraction})

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rng.load_state_dict(state_dict["rng"])
