"""MixUp and CutMix: convex combinations of training samples, with soft targets.

* **MixUp** (Zhang et al. 2018): ``x̃ = λ·x_i + (1−λ)·x_j``, ``ỹ = λ·y_i + (1−λ)·y_j`` with
  ``λ ~ Beta(α, α)`` and ``j = perm(i)`` a random permutation of the batch.
* **CutMix** (Yun et al. 2019): paste a box of ``x_j`` into ``x_i``. The box has area fraction
  ``1−λ`` (``λ ~ Beta(α, α)``) and a uniform centre; it is clipped at the border, so ``λ`` is
  corrected to the exact pasted area: the weight of ``y_j`` is the pasted pixel fraction.

Targets become soft ``(B, K)`` floats, which ``F.cross_entropy(logits, ỹ)`` accepts unchanged;
targets that are already soft are mixed as they are. Label smoothing is an argument of the
mixing callback, as in timm's ``Mixup``: the targets are smoothed, then mixed.

``λ`` comes from ``torch.distributions.Beta``, which draws from the global torch RNG; the
callback runs it inside :func:`~lightning_reg.core.random.seeded_global_rng` with the step's seed
from :class:`~lightning_reg.core.random.CallbackRNG`, so draws are reproducible, per rank and
resumed exactly, and the user's global RNG is left as it was.

Pure torch first (:func:`mixup`, :func:`cutmix_boxes`, :func:`cutmix`), then the Lightning class
:class:`MixUpCutMixCallback` and its presets :class:`MixUpCallback` and :class:`CutMixCallback`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_reg.core.batch import BatchKey, BatchSlot
from lightning_reg.core.logging import is_logging_step, log_scalars
from lightning_reg.core.random import CallbackRNG, seeded_global_rng
from lightning_reg.core.targets import check_labels, to_soft_targets
from lightning_reg.core.validation import (
    check_choice,
    check_int,
    check_non_negative,
    check_positive,
    check_probability,
)

__all__ = [
    "CutMixCallback",
    "MixUpCallback",
    "MixUpCutMixCallback",
    "cutmix",
    "cutmix_boxes",
    "mixup",
    "sample_beta",
]


def _weights(lam: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor | float:
    """``λ`` (a float, one value or one per sample) broadcastable against ``like``."""
    # (1,) or (B,) -> (1 or B, 1, ...)
    return lam.to(like).view(-1, *([1] * (like.ndim - 1))) if torch.is_tensor(lam) else lam


def mixup(
    x: torch.Tensor, targets: torch.Tensor, lam: float | torch.Tensor, perm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(λ·x + (1−λ)·x[perm], λ·y + (1−λ)·y[perm])``.

    Args:
        x: floating inputs ``(B, ...)``.
        targets: soft targets ``(B, K, ...)`` (see
            :func:`~lightning_reg.core.targets.to_soft_targets`).
        lam: one ``λ`` for the batch (a float or a 1-element tensor) or one per sample ``(B,)``.
        perm: a permutation of ``range(B)``: sample ``i`` is mixed with ``perm[i]``.

    Example:
        >>> x, y = torch.tensor([[0.0], [1.0]]), torch.eye(2)
        >>> mixup(x, y, 0.75, torch.tensor([1, 0]))[1]
        tensor([[0.7500, 0.2500],
                [0.2500, 0.7500]])

    Reference:
        Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018.
    """
    # lerp(start, end, w) is one fused kernel and exact at the ends: w = 1 gives `end` = x.
    x_mix = torch.lerp(x[perm], x, _weights(lam, x))
    y_mix = torch.lerp(targets[perm], targets, _weights(lam, targets))
    return x_mix, y_mix


def cutmix_boxes(
    lam: torch.Tensor, height: int, width: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Boxes ``(n, 4)`` as ``(y0, y1, x0, x1)`` (int64, half-open) for target ratios ``λ``.

    The unclipped box is ``⌊H·√(1−λ)⌋ × ⌊W·√(1−λ)⌋`` around a centre drawn uniformly over the
    pixels (``⌊cut/2⌋`` before it, ``⌈cut/2⌉`` after it); it is clipped at the image border, as
    timm's ``rand_bbox``. Draws happen on ``lam``'s device.

    Example:
        >>> cutmix_boxes(torch.tensor([0.75]), 8, 8).shape
        torch.Size([1, 4])
    """
    size = torch.tensor([height, width], device=lam.device)  # per axis: (y, x)
    cut = torch.floor(size * torch.sqrt((1.0 - lam.float()).clamp(0.0, 1.0))[:, None]).long()
    u = torch.rand((lam.shape[0], 2), generator=generator, device=lam.device)
    start = torch.minimum(torch.floor(u * size).long(), size - 1) - cut // 2  # centre - cut / 2
    box = torch.stack([start, start + cut], dim=2).clamp_min(0).minimum(size[:, None])
    return box.flatten(1)  # (n, 2, 2) -> (n, 4): y0, y1, x0, x1


def cutmix(
    x: torch.Tensor, targets: torch.Tensor, boxes: torch.Tensor, perm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste ``boxes`` of ``x[perm]`` into ``x``; mix targets by the exact pasted fraction.

    Args:
        x: floating inputs ``(B, ..., H, W)`` (the last two dims are spatial).
        targets: soft targets ``(B, K, ...)``.
        boxes: ``(1, 4)`` (one box for the batch) or ``(B, 4)`` boxes ``(y0, y1, x0, x1)``.
        perm: a permutation of ``range(B)``.

    Returns:
        ``(x̃, ỹ, λ)`` where ``λ = 1 − pasted area / (H·W)`` is the weight of the sample's own
        target, shape ``(1,)`` or ``(B,)``.

    Example:
        >>> x = torch.zeros(2, 1, 4, 4); x[1] = 1
        >>> box = torch.tensor([[0, 2, 0, 2]])
        >>> cutmix(x, torch.eye(2), box, torch.tensor([1, 0]))[2]
        tensor([0.7500])

    Reference:
        Yun et al., "CutMix: Regularization Strategy to Train Strong Classifiers with
        Localizable Features", ICCV 2019.
    """
    height, width = x.shape[-2], x.shape[-1]
    y0, y1, x0, x1 = boxes.to(x.device)[:, :, None, None].unbind(1)  # each (n, 1, 1)
    rows = torch.arange(height, device=x.device)[:, None]
    cols = torch.arange(width, device=x.device)
    mask = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # (n, H, W)
    mask = mask.view(mask.shape[0], *([1] * (x.ndim - 3)), height, width)
    x_mix = torch.where(mask, x[perm], x)
    lam = 1.0 - ((y1 - y0) * (x1 - x0)).flatten().to(torch.float32) / float(height * width)
    return x_mix, torch.lerp(targets[perm], targets, _weights(lam, targets)), lam


def _beta(alpha: float, n: int, device: torch.device) -> torch.Tensor:
    """``n`` draws of ``Beta(α, α)`` from the global RNG of ``device`` (ones for ``α = 0``)."""
    c = torch.full((n,), alpha, device=device)
    return torch.distributions.Beta(c, c, validate_args=False).sample() if alpha > 0 else c + 1


def sample_beta(
    alpha: float,
    beta: float,
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Deprecated (removed in the next release): use ``torch.distributions.Beta``.

    Draws ``Beta(alpha, beta)`` samples of ``shape`` reproducibly from ``generator``: one seed is
    drawn from it and ``torch.distributions.Beta`` samples under that seed.

    Raises:
        ValueError: if ``alpha`` or ``beta`` is not a finite positive number.
    """
    warnings.warn(
        "sample_beta is deprecated: use torch.distributions.Beta", DeprecationWarning, stacklevel=2
    )
    a, b = check_positive("alpha", alpha), check_positive("beta", beta)
    gen_device = getattr(generator, "device", "cpu")
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=gen_device))
    with seeded_global_rng(seed, torch.device(device)):
        ones = torch.ones(tuple(shape), device=device, dtype=torch.float64)
        return torch.distributions.Beta(ones * a, ones * b).sample().to(dtype)


# --------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------


class MixUpCutMixCallback(Callback):
    """MixUp and/or CutMix on every training batch, with optional label smoothing (timm's Mixup).

    Rewrites the training batch in ``on_train_batch_start`` (validation, test and predict
    batches are untouched). With both alphas ``> 0`` each batch (``mode="batch"``) or sample
    (``mode="sample"``) uses CutMix with probability ``switch_prob`` and MixUp otherwise; an
    alpha of 0 disables that method. Integer labels become soft ``(B, K)`` float targets,
    smoothed by ``label_smoothing`` and then mixed; soft targets are smoothed and mixed as they
    are. ``λ`` (the weight of each sample's own target; for CutMix the exact unpasted area) is
    logged as ``reg/<technique>/lambda``.

    Args:
        mixup_alpha: MixUp's Beta concentration ``α >= 0`` (0 disables MixUp).
        cutmix_alpha: CutMix's Beta concentration ``α >= 0`` (0 disables CutMix).
        num_classes: the number of classes ``K``; labels must be in ``[0, K)`` and the model
            must output ``K`` logits.
        label_smoothing: smoothing ``s`` in [0, 1]: targets ``(1 − s)·y + s/K`` before mixing.
        switch_prob: probability of CutMix instead of MixUp when both are enabled, in [0, 1].
        p: probability of mixing (per batch in ``mode="batch"``, per sample in ``"sample"``);
            unmixed batches still get (smoothed) one-hot targets, so the target type never
            changes.
        mode: ``"batch"``: one ``λ`` (and box) per batch, as in the papers; ``"sample"``: one
            per sample.
        until_epoch: mixing stops at this epoch (exclusive); from then on the targets are only
            smoothed (or left as they are with ``label_smoothing=0``). ``None``: always mix.
        input_key: list index or dict key of the inputs.
        target_key: list index or dict key of the targets.
        input_getter: optional ``getter(batch) -> Tensor`` for the inputs.
        input_setter: optional ``setter(batch, value)`` for the inputs.
        target_getter: optional ``getter(batch) -> Tensor`` for the targets.
        target_setter: optional ``setter(batch, value)`` for the targets.
        seed: fixed seed; ``None`` uses ``torch.initial_seed()`` (``seed_everything``). Draws
            differ per DDP rank and resume exactly from a checkpoint.

    Raises:
        ValueError: for a negative or NaN alpha (or both 0), probabilities outside [0, 1],
            ``num_classes < 1`` or an unknown ``mode``.
        RuntimeError: during training, for a tuple batch, labels outside ``[0, K)`` (checked on
            the first batch on any device), non-floating inputs, or CutMix inputs without two
            spatial dims. If the first step fails (e.g. the model outputs a number of logits
            other than ``num_classes``), a note naming ``num_classes`` is added to the error.

    Example:
        >>> cb = MixUpCutMixCallback(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=1000,
        ...                          label_smoothing=0.1)
        >>> # Trainer(callbacks=[cb]); training_step: F.cross_entropy(logits, y) unchanged

    Reference:
        Zhang et al., ICLR 2018; Yun et al., ICCV 2019; the switching and the smoothing follow
        timm's ``Mixup``.
    """

    technique = "mixup_cutmix"
    mixes_targets = True  # marker read by LabelSmoothingCallback (duck typing, no import)
    _salt = 0x5C

    def __init__(
        self,
        *,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        num_classes: int,
        label_smoothing: float = 0.0,
        switch_prob: float = 0.5,
        p: float = 1.0,
        mode: str = "batch",
        until_epoch: int | None = None,
        input_key: BatchKey = 0,
        target_key: BatchKey = 1,
        input_getter: Callable[[Any], torch.Tensor] | None = None,
        input_setter: Callable[[Any, torch.Tensor], None] | None = None,
        target_getter: Callable[[Any], torch.Tensor] | None = None,
        target_setter: Callable[[Any, torch.Tensor], None] | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.mixup_alpha = check_non_negative("mixup_alpha", mixup_alpha)
        self.cutmix_alpha = check_non_negative("cutmix_alpha", cutmix_alpha)
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            raise ValueError("`mixup_alpha` or `cutmix_alpha` must be > 0, got 0 for both")
        self.num_classes = check_int("num_classes", num_classes, 1)
        self.label_smoothing = check_probability("label_smoothing", label_smoothing)
        self.switch_prob = check_probability("switch_prob", switch_prob)
        self.p = check_probability("p", p)
        self.mode = check_choice("mode", mode, ("batch", "sample"))
        self.until_epoch = None if until_epoch is None else check_int("until_epoch", until_epoch, 0)
        self.input = BatchSlot(input_key, getter=input_getter, setter=input_setter, role="input")
        self.target = BatchSlot(
            target_key, getter=target_getter, setter=target_setter, role="target"
        )
        self.rng = CallbackRNG(seed, salt=self._salt)
        self.last_params: dict[str, Any] | None = None
        self._first_step = True

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(input_key=self.input.key, target_key=self.target.key)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.rng.setup(trainer)
            self._first_step = True

    def sample_params(self, shape: tuple[int, ...], device: torch.device) -> dict[str, Any]:
        """Draw one step's ``perm``, ``λ`` targets, CutMix choice and boxes (global RNG).

        Batch-level draws (``mode="batch"``) happen on the CPU, so branching on them never
        waits for the device.
        """
        n, dev = (1, torch.device("cpu")) if self.mode == "batch" else (shape[0], device)
        perm = torch.randperm(shape[0], device=device)
        u = torch.rand((2, n), device=dev)
        active = u[0] < self.p
        # CutMix with probability `switch_prob` if both are enabled, else 1 or 0 (u < 1 always)
        cut = u[1] < (self.switch_prob if self.mixup_alpha > 0 else 1.0) * (self.cutmix_alpha > 0)
        lam = torch.where(cut, _beta(self.cutmix_alpha, n, dev), _beta(self.mixup_alpha, n, dev))
        params: dict[str, Any] = {"perm": perm, "lam": torch.where(active, lam, 1.0), "cut": cut}
        if self.cutmix_alpha > 0:
            if len(shape) < 3:
                raise RuntimeError(
                    f"CutMix needs inputs with two spatial dims (B, ..., H, W), got shape {shape}."
                    " Use MixUpCallback for vector inputs."
                )
            # λ = 1 (an empty box) where MixUp was chosen
            params["boxes"] = cutmix_boxes(torch.where(cut, params["lam"], 1.0), *shape[-2:])
        params["skip"] = self.mode == "batch" and not bool(active)
        return params

    def apply(
        self, x: torch.Tensor, soft: torch.Tensor, params: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(x̃, ỹ, λ)`` for soft targets, with the drawn ``params``."""
        perm, lam, cut = params["perm"], params["lam"], params["cut"]
        # `mode="batch"`: one method for the whole batch, chosen by a CPU draw (no device sync).
        if self.cutmix_alpha == 0 or (self.mode == "batch" and not bool(cut)):
            return (*mixup(x, soft, lam, perm), lam)
        x_cut, y_cut, lam_cut = cutmix(x, soft, params["boxes"], perm)
        if self.mixup_alpha == 0 or self.mode == "batch":
            return x_cut, y_cut, lam_cut
        # per sample: CutMix where `cut`, else MixUp (those samples got an empty box: x_cut = x)
        x_out = torch.lerp(x[perm], x_cut, _weights(torch.where(cut, 1.0, lam), x))
        lam = torch.where(cut, lam_cut, lam)
        return x_out, torch.lerp(soft[perm], soft, _weights(lam, soft)), lam

    def soft_targets(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` as smoothed soft targets; the label range is checked on the first call."""
        try:
            if self._first_step:  # once: on an accelerator this reads back to the host
                check_labels(y, self.num_classes)
            return to_soft_targets(y, self.num_classes, smoothing=self.label_smoothing)
        except ValueError as err:
            raise RuntimeError(f"{type(self).__name__}: {err}") from err

    def mix_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw this step's parameters and return ``(x̃, ỹ)`` (no batch access)."""
        if not x.is_floating_point():
            raise RuntimeError(
                f"{type(self).__name__} mixes floating-point inputs, got {x.dtype}. Convert the "
                "inputs to float (e.g. `x.float() / 255`) in your Dataset or a transform."
            )
        if y.shape[0] != x.shape[0]:
            raise RuntimeError(
                f"Inputs and targets disagree on the batch size: {x.shape[0]} vs {y.shape[0]}. "
                "Check `input_key` and `target_key`."
            )
        soft = self.soft_targets(y)
        with seeded_global_rng(self.rng.next(x.device)[1], x.device):  # this step's seed
            params = self.last_params = self.sample_params(tuple(x.shape), x.device)
        if not params["skip"]:
            with torch.no_grad():
                x, soft, params["lam"] = self.apply(x, soft, params)
        return x, soft

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.until_epoch is not None and trainer.current_epoch >= self.until_epoch:
            if self.label_smoothing > 0:
                self.target.set(batch, self.soft_targets(self.target.get(batch)))
            return
        x_mix, y_mix = self.mix_batch(self.input.get(batch), self.target.get(batch))
        self.input.set(batch, x_mix)
        self.target.set(batch, y_mix)
        if is_logging_step(trainer):
            lam = self.last_params["lam"].float().mean()  # type: ignore[index]
            log_scalars(pl_module, {f"reg/{self.technique}/lambda": lam})

    @override
    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._first_step = False

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._first_step and isinstance(exception, (RuntimeError, ValueError)):
            exception.add_note(
                f"{type(self).__name__} rewrote the targets to soft (B, num_classes="
                f"{self.num_classes}) floats: check that `num_classes` equals the number of "
                "logits your model outputs and that your loss accepts soft targets."
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rng.load_state_dict(state_dict["rng"])


class MixUpCallback(MixUpCutMixCallback):
    """MixUp: ``x̃ = λ·x_i + (1−λ)·x_j``, ``ỹ = λ·y_i + (1−λ)·y_j``, ``λ ~ Beta(α, α)``.

    A preset of :class:`MixUpCutMixCallback` with ``cutmix_alpha=0``; ``λ`` is logged as
    ``reg/mixup/lambda``.

    Args:
        alpha: the Beta concentration ``α > 0``.
        **kwargs: any other argument of :class:`MixUpCutMixCallback` (``num_classes`` is
            required; ``label_smoothing``, ``p``, ``mode``, ``until_epoch``, keys, ``seed``).

    Raises:
        ValueError: for ``alpha <= 0`` or NaN, and as :class:`MixUpCutMixCallback`.
        RuntimeError: during training, as :class:`MixUpCutMixCallback`.

    Example:
        >>> cb = MixUpCallback(0.2, num_classes=10, label_smoothing=0.1)

    Reference:
        Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018.
    """

    technique = "mixup"
    _salt = 0x3171

    def __init__(self, alpha: float = 0.2, **kwargs: Any) -> None:
        self.alpha = check_positive("alpha", alpha)
        super().__init__(mixup_alpha=self.alpha, cutmix_alpha=0.0, **kwargs)


class CutMixCallback(MixUpCutMixCallback):
    """CutMix: paste a box of ``x_j`` into ``x_i``; targets weighted by the exact pasted area.

    A preset of :class:`MixUpCutMixCallback` with ``mixup_alpha=0``. ``λ ~ Beta(α, α)`` sets the
    box area fraction ``1−λ``; the box is clipped at the border and ``λ`` is corrected, so the
    weight of ``y_j`` equals the pasted pixel fraction. The last two input dims are spatial.
    Logged as ``reg/cutmix/lambda``.

    Args:
        alpha: the Beta concentration ``α > 0``.
        **kwargs: any other argument of :class:`MixUpCutMixCallback` (``num_classes`` is
            required; ``label_smoothing``, ``p``, ``mode``, ``until_epoch``, keys, ``seed``).

    Raises:
        ValueError: for ``alpha <= 0`` or NaN, and as :class:`MixUpCutMixCallback`.
        RuntimeError: during training, as :class:`MixUpCutMixCallback`.

    Example:
        >>> cb = CutMixCallback(1.0, num_classes=10)

    Reference:
        Yun et al., "CutMix: Regularization Strategy to Train Strong Classifiers with
        Localizable Features", ICCV 2019.
    """

    technique = "cutmix"
    _salt = 0xC07

    def __init__(self, alpha: float = 1.0, **kwargs: Any) -> None:
        self.alpha = check_positive("alpha", alpha)
        super().__init__(mixup_alpha=0.0, cutmix_alpha=self.alpha, **kwargs)
