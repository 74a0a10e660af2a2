"""MixUp and CutMix: convex combinations of training samples, with soft targets.

* **MixUp** (Zhang et al. 2018): ``x̃ = λ·x_i + (1−λ)·x_j``, ``ỹ = λ·y_i + (1−λ)·y_j`` with
  ``λ ~ Beta(α, α)`` and ``j = perm(i)`` a random permutation of the batch.
* **CutMix** (Yun et al. 2019): paste a box of ``x_j`` into ``x_i``. The box has area fraction
  ``1−λ`` (``λ ~ Beta(α, α)``) and a uniform centre; it is clipped at the border, so ``λ`` is
  corrected to the exact pasted area: the weight of ``y_j`` is the pasted pixel fraction.

Targets become soft ``(B, K)`` floats, which ``F.cross_entropy(logits, ỹ)`` accepts unchanged.
Targets that are already soft (e.g. smoothed labels) are mixed as they are.

**Reproducible Beta draws.** ``torch.distributions.Beta`` takes no generator (it calls
``torch._standard_gamma`` on the global RNG). :func:`sample_beta` therefore draws the two Gamma
variates itself, with Marsaglia & Tsang's (2000) method from the given generator, on the
device, vectorised: 16 candidates per variate are drawn at once and the first accepted one is
kept (each is accepted with probability > 0.95, so all 16 fail with probability < 1e-20).
Shapes below 1 use ``G(a) = G(a+1)·U^(1/a)`` in log space, and ``λ = sigmoid(log G_a − log G_b)``
stays finite even for tiny ``α``. Its distribution is tested against ``scipy.stats.beta``.

Pure torch first (:func:`sample_beta`, :func:`mixup`, :func:`cutmix_boxes`, :func:`cutmix`),
then the Lightning classes :class:`MixUpCallback`, :class:`CutMixCallback` and
:class:`MixUpCutMixCallback`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_reg.augmentation import CallbackRNG
from lightning_reg.core.batch import BatchKey, BatchSlot
from lightning_reg.core.logging import is_logging_step, log_scalars
from lightning_reg.core.validation import (
    check_choice,
    check_int,
    check_positive,
    check_probability,
)
from lightning_reg.label_smoothing import to_soft_targets

__all__ = [
    "CutMixCallback",
    "MixUpCallback",
    "MixUpCutMixCallback",
    "cutmix",
    "cutmix_boxes",
    "mixup",
    "sample_beta",
]

_CANDIDATES = 16


def _log_standard_gamma(
    concentration: float,
    shape: Sequence[int],
    generator: torch.Generator | None,
    device: Any,
) -> torch.Tensor:
    """``log G`` with ``G ~ Gamma(concentration, 1)``, Marsaglia & Tsang, from ``generator``."""
    a = float(concentration)
    boost = a < 1.0
    d = (a + 1.0 if boost else a) - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    cand = (*shape, _CANDIDATES)
    z = torch.randn(cand, generator=generator, device=device)
    u = torch.rand(cand, generator=generator, device=device)
    v = (1.0 + c * z) ** 3
    log_v = torch.log(v.clamp_min(1e-30))
    accept = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * log_v)
    first = accept.to(torch.uint8).argmax(dim=-1, keepdim=True)
    log_g = math.log(d) + log_v.gather(-1, first).squeeze(-1)
    if boost:
        u_boost = torch.rand(tuple(shape), generator=generator, device=device)
        log_g = log_g + torch.log(u_boost.clamp_min(1e-38)) / a
    return log_g


def _beta_logit(
    alpha: float,
    beta: float,
    shape: Sequence[int],
    generator: torch.Generator | None,
    device: Any,
) -> torch.Tensor:
    """``log(λ / (1 − λ))`` for ``λ ~ Beta(alpha, beta)``: ``log G_a − log G_b``."""
    log_ga = _log_standard_gamma(alpha, shape, generator, device)
    log_gb = _log_standard_gamma(beta, shape, generator, device)
    return log_ga - log_gb


def sample_beta(
    alpha: float,
    beta: float,
    shape: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``Beta(alpha, beta)`` samples of ``shape`` from ``generator``, on ``device``.

    The draw is reproducible given the generator's state (see the module docstring). In
    float32, values within ``6e-8`` of 1 round to 1 (this matters only for tiny ``alpha``); pass
    ``dtype=torch.float64`` for more resolution.

    Raises:
        ValueError: if ``alpha`` or ``beta`` is not a finite positive number.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> lam = sample_beta(0.2, 0.2, (1000,), generator=g)
        >>> bool(((lam >= 0) & (lam <= 1)).all())
        True
    """
    a = check_positive("alpha", alpha)
    b = check_positive("beta", beta)
    return torch.sigmoid(_beta_logit(a, b, shape, generator, device).to(dtype))


def _weights(lam: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor | float:
    if isinstance(lam, torch.Tensor):
        lam = lam.to(device=like.device, dtype=like.dtype)
        return lam.view(-1, *([1] * (like.ndim - 1))) if lam.numel() > 1 else lam.reshape(())
    return lam


def mixup(
    x: torch.Tensor, targets: torch.Tensor, lam: float | torch.Tensor, perm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(λ·x + (1−λ)·x[perm], λ·y + (1−λ)·y[perm])``.

    Args:
        x: floating inputs ``(B, ...)``.
        targets: soft targets ``(B, K, ...)`` (see :func:`to_soft_targets`).
        lam: one ``λ`` for the batch (a float or a 1-element tensor) or one per sample ``(B,)``.
        perm: a permutation of ``range(B)``: sample ``i`` is mixed with ``perm[i]``.

    Example:
        >>> x, y = torch.tensor([[0.0], [1.0]]), torch.eye(2)
        >>> mixup(x, y, 0.75, torch.tensor([1, 0]))[1]
        tensor([[0.7500, 0.2500],
                [0.2500, 0.7500]])
    """
    # lerp(start, end, w) is one fused kernel and exact at the ends: w = 1 gives `end` = x.
    x_mix = torch.lerp(x[perm], x, _weights(lam, x))
    y_mix = torch.lerp(targets[perm], targets, _weights(lam, targets))
    return x_mix, y_mix


def cutmix_boxes(
    lam: torch.Tensor,
    height: int,
    width: int,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Boxes ``(n, 4)`` as ``(y0, y1, x0, x1)`` (int64, half-open) for target ratios ``λ``.

    The unclipped box is ``⌊H·√(1−λ)⌋ × ⌊W·√(1−λ)⌋`` around a centre drawn uniformly over the
    pixels; it is clipped at the image border (Yun et al.; timm's rule). Draws happen on
    ``lam``'s device.
    """
    n = lam.shape[0]
    cut = torch.sqrt((1.0 - lam.float()).clamp(0.0, 1.0))
    cut_h = torch.floor(height * cut).long()
    cut_w = torch.floor(width * cut).long()
    u = torch.rand((n, 2), generator=generator, device=lam.device)
    cy = torch.floor(u[:, 0] * height).long().clamp_max(height - 1)
    cx = torch.floor(u[:, 1] * width).long().clamp_max(width - 1)
    y0 = (cy - cut_h // 2).clamp(0, height)
    y1 = (cy + cut_h // 2).clamp(0, height)
    x0 = (cx - cut_w // 2).clamp(0, width)
    x1 = (cx + cut_w // 2).clamp(0, width)
    return torch.stack([y0, y1, x0, x1], dim=1)


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
    """
    height, width = x.shape[-2], x.shape[-1]
    boxes = boxes.to(x.device)
    y0, y1, x0, x1 = boxes.unbind(1)
    rows = torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device)
    in_rows = (rows >= y0[:, None]) & (rows < y1[:, None])
    in_cols = (cols >= x0[:, None]) & (cols < x1[:, None])
    mask = in_rows[:, :, None] & in_cols[:, None, :]  # (n, H, W)
    mask = mask.view(mask.shape[0], *([1] * (x.ndim - 3)), height, width)
    x_mix = torch.where(mask, x[perm], x)
    area = (y1 - y0) * (x1 - x0)
    lam = 1.0 - area.to(torch.float32) / float(height * width)
    y_mix = torch.lerp(targets[perm], targets, _weights(lam, targets))
    return x_mix, y_mix, lam


# --------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------

Params = dict[str, Any]


class _MixCallbackBase(Callback):
    """Shared machinery of the mixing callbacks: batch access, soft targets, RNG, state."""

    technique = "mixup"
    _salt = 0x3171

    def __init__(
        self,
        *,
        num_classes: int,
        p: float,
        mode: str,
        until_epoch: int | None,
        input_key: BatchKey,
        target_key: BatchKey,
        input_getter: Callable[[Any], torch.Tensor] | None,
        input_setter: Callable[[Any, torch.Tensor], None] | None,
        target_getter: Callable[[Any], torch.Tensor] | None,
        target_setter: Callable[[Any, torch.Tensor], None] | None,
        seed: int | None,
    ) -> None:
        super().__init__()
        self.num_classes = check_int("num_classes", num_classes, 1)
        self.p = check_probability("p", p)
        self.mode = check_choice("mode", mode, ("batch", "sample"))
        self.until_epoch = None if until_epoch is None else check_int("until_epoch", until_epoch, 0)
        self.input = BatchSlot(input_key, getter=input_getter, setter=input_setter, role="input")
        self.target = BatchSlot(
            target_key, getter=target_getter, setter=target_setter, role="target"
        )
        self.rng = CallbackRNG(seed, salt=self._salt)
        self._cpu_generator = torch.Generator()
        self._postprocessors: list[Callable[[torch.Tensor], torch.Tensor]] = []
        self.last_params: Params | None = None

    # -- hooks for other callbacks (label smoothing) -------------------------------------------

    def add_target_postprocessor(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Run ``fn(targets)`` on the targets after every rewrite (even when not mixing)."""
        self._postprocessors.append(fn)

    def remove_target_postprocessor(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._postprocessors = [f for f in self._postprocessors if f != fn]

    # -- subclass interface ---------------------------------------------------------------------

    def sample_params(
        self,
        shape: tuple[int, ...],
        *,
        device: torch.device,
        generator: torch.Generator,
        cpu_generator: torch.Generator,
    ) -> Params:  # pragma: no cover - abstract
        """Draw this step's parameters; ``cpu_generator`` draws batch-level scalars."""
        raise NotImplementedError

    def apply(
        self, x: torch.Tensor, targets: torch.Tensor, params: Params
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        """Return ``(x̃, ỹ, λ)`` for soft ``targets``."""
        raise NotImplementedError

    def _active_draw(self, n: int, device: Any, generator: torch.Generator) -> torch.Tensor:
        return torch.rand((n,), generator=generator, device=device) < self.p

    # -- Lightning ------------------------------------------------------------------------------

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(input_key=self.input.key, target_key=self.target.key)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.rng.setup(trainer)

    def is_active(self, epoch: int) -> bool:
        """Whether mixing happens in ``epoch`` (``until_epoch`` is exclusive)."""
        return self.until_epoch is None or epoch < self.until_epoch

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
        try:
            soft = to_soft_targets(y, self.num_classes)
        except ValueError as err:
            raise RuntimeError(f"{type(self).__name__}: {err}") from err
        generator, step_seed = self.rng.next(x.device)
        self._cpu_generator.manual_seed(step_seed ^ 0x5DEECE66D)
        params = self.sample_params(
            tuple(x.shape),
            device=x.device,
            generator=generator,
            cpu_generator=self._cpu_generator,
        )
        self.last_params = params
        with torch.no_grad():
            if params.get("skip", False):
                params["lam"] = torch.ones(1)
                return x, soft
            x_mix, y_mix, lam = self.apply(x, soft, params)
        params["lam"] = lam
        return x_mix, y_mix

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.is_active(trainer.current_epoch):
            x_mix, y_mix = self.mix_batch(self.input.get(batch), self.target.get(batch))
            self.input.set(batch, x_mix)
            targets = y_mix
        elif self._postprocessors:
            targets = self.target.get(batch)
        else:
            return
        for fn in self._postprocessors:
            targets = fn(targets)
        self.target.set(batch, targets)
        if self.last_params is not None and is_logging_step(trainer):
            lam = self.last_params["lam"]
            log_scalars(pl_module, {f"reg/{self.technique}/lambda": lam.float().mean()})

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rng.load_state_dict(state_dict["rng"])


_SHARED_ARGS_DOC = """
        num_classes: the number of classes ``K``; labels must be in ``[0, K)``.
        p: probability of mixing (per batch in ``mode="batch"``, per sample in ``"sample"``);
            unmixed batches still get one-hot targets, so the target type never changes.
        mode: ``"batch"``: one ``λ`` (and box) per batch, as in the papers; ``"sample"``: one
            per sample.
        until_epoch: mixing stops at this epoch (exclusive); from then on the batch is left as
            it is (hard labels). ``None``: always mix.
        input_key: list index or dict key of the inputs.
        target_key: list index or dict key of the targets.
        input_getter: optional ``getter(batch) -> Tensor`` for the inputs.
        input_setter: optional ``setter(batch, value)`` for the inputs.
        target_getter: optional ``getter(batch) -> Tensor`` for the targets.
        target_setter: optional ``setter(batch, value)`` for the targets.
        seed: fixed seed; ``None`` uses ``torch.initial_seed()`` (``seed_everything``). Draws
            differ per DDP rank and resume exactly from a checkpoint."""


class MixUpCallback(_MixCallbackBase):
    """MixUp: ``x̃ = λ·x_i + (1−λ)·x_j``, ``ỹ = λ·y_i + (1−λ)·y_j``, ``λ ~ Beta(α, α)``.

    Rewrites the training batch in ``on_train_batch_start`` (validation, test and predict
    batches are untouched); ``j`` is a random permutation of the batch. Integer labels become
    soft ``(B, K)`` float targets; soft targets are mixed as they are. ``λ`` (the weight of
    each sample's own target) is logged as ``reg/mixup/lambda``.

    Args:
        alpha: the Beta concentration ``α > 0``.
    {shared}

    Raises:
        ValueError: for ``alpha <= 0`` or NaN, ``p`` outside [0, 1], ``num_classes < 1`` or an
            unknown ``mode``.
        RuntimeError: during training, for a tuple batch, labels outside ``[0, K)``, or
            non-floating inputs.

    Example:
        >>> cb = MixUpCallback(0.2, num_classes=10)
        >>> # Trainer(callbacks=[cb]); training_step: F.cross_entropy(logits, y) unchanged

    Reference:
        Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018.
    """

    technique = "mixup"
    _salt = 0x3171

    def __init__(
        self,
        alpha: float = 0.2,
        *,
        num_classes: int,
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
        self.alpha = check_positive("alpha", alpha)
        super().__init__(
            num_classes=num_classes,
            p=p,
            mode=mode,
            until_epoch=until_epoch,
            input_key=input_key,
            target_key=target_key,
            input_getter=input_getter,
            input_setter=input_setter,
            target_getter=target_getter,
            target_setter=target_setter,
            seed=seed,
        )

    @override
    def sample_params(
        self,
        shape: tuple[int, ...],
        *,
        device: torch.device,
        generator: torch.Generator,
        cpu_generator: torch.Generator,
    ) -> Params:
        b = shape[0]
        perm = torch.randperm(b, generator=generator, device=device)
        if self.mode == "batch":
            if not bool(self._active_draw(1, "cpu", cpu_generator)):
                return {"perm": perm, "skip": True}
            lam = sample_beta(self.alpha, self.alpha, (1,), generator=cpu_generator)
            return {"perm": perm, "lam": lam.to(device)}
        lam = sample_beta(self.alpha, self.alpha, (b,), generator=generator, device=device)
        active = self._active_draw(b, device, generator)
        return {"perm": perm, "lam": torch.where(active, lam, 1.0)}

    @override
    def apply(
        self, x: torch.Tensor, targets: torch.Tensor, params: Params
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_mix, y_mix = mixup(x, targets, params["lam"], params["perm"])
        return x_mix, y_mix, params["lam"]


class CutMixCallback(_MixCallbackBase):
    """CutMix: paste a box of ``x_j`` into ``x_i``; targets weighted by the exact pasted area.

    ``λ ~ Beta(α, α)`` sets the box area fraction ``1−λ``; the box is clipped at the border and
    ``λ`` is corrected, so the weight of ``y_j`` equals the pasted pixel fraction. The last two
    input dims are spatial. Logged as ``reg/cutmix/lambda``.

    Args:
        alpha: the Beta concentration ``α > 0``.
    {shared}

    Raises:
        ValueError: for ``alpha <= 0`` or NaN, ``p`` outside [0, 1], ``num_classes < 1`` or an
            unknown ``mode``.
        RuntimeError: during training, for a tuple batch, labels outside ``[0, K)``,
            non-floating inputs or inputs without two spatial dims.

    Example:
        >>> cb = CutMixCallback(1.0, num_classes=10)
        >>> # Trainer(callbacks=[cb])

    Reference:
        Yun et al., "CutMix: Regularization Strategy to Train Strong Classifiers with
        Localizable Features", ICCV 2019.
    """

    technique = "cutmix"
    _salt = 0xC07

    def __init__(
        self,
        alpha: float = 1.0,
        *,
        num_classes: int,
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
        self.alpha = check_positive("alpha", alpha)
        super().__init__(
            num_classes=num_classes,
            p=p,
            mode=mode,
            until_epoch=until_epoch,
            input_key=input_key,
            target_key=target_key,
            input_getter=input_getter,
            input_setter=input_setter,
            target_getter=target_getter,
            target_setter=target_setter,
            seed=seed,
        )

    @override
    def sample_params(
        self,
        shape: tuple[int, ...],
        *,
        device: torch.device,
        generator: torch.Generator,
        cpu_generator: torch.Generator,
    ) -> Params:
        _check_spatial(shape, type(self).__name__)
        b, height, width = shape[0], shape[-2], shape[-1]
        perm = torch.randperm(b, generator=generator, device=device)
        if self.mode == "batch":
            if not bool(self._active_draw(1, "cpu", cpu_generator)):
                return {"perm": perm, "skip": True}
            lam = sample_beta(self.alpha, self.alpha, (1,), generator=cpu_generator)
            boxes = cutmix_boxes(lam, height, width, generator=cpu_generator)
            return {"perm": perm, "boxes": boxes}
        lam = sample_beta(self.alpha, self.alpha, (b,), generator=generator, device=device)
        lam = torch.where(self._active_draw(b, device, generator), lam, 1.0)
        return {"perm": perm, "boxes": cutmix_boxes(lam, height, width, generator=generator)}

    @override
    def apply(
        self, x: torch.Tensor, targets: torch.Tensor, params: Params
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return cutmix(x, targets, params["boxes"], params["perm"])


class MixUpCutMixCallback(_MixCallbackBase):
    """MixUp or CutMix, switching at random: CutMix with probability ``switch_prob``.

    The choice is made per batch (``mode="batch"``) or per sample (``mode="sample"``); each
    branch is exactly :class:`MixUpCallback` / :class:`CutMixCallback`. Logged as
    ``reg/mixup_cutmix/lambda``.

    Args:
        mixup_alpha: MixUp's Beta concentration ``> 0``.
        cutmix_alpha: CutMix's Beta concentration ``> 0``.
        switch_prob: probability of CutMix instead of MixUp, in [0, 1].
    {shared}

    Raises:
        ValueError: for non-positive or NaN alphas, probabilities outside [0, 1],
            ``num_classes < 1`` or an unknown ``mode``.
        RuntimeError: during training, as :class:`MixUpCallback` and :class:`CutMixCallback`.

    Example:
        >>> cb = MixUpCutMixCallback(0.8, 1.0, num_classes=1000, switch_prob=0.5)

    Reference:
        Zhang et al., ICLR 2018; Yun et al., ICCV 2019; the switching follows timm's ``Mixup``.
    """

    technique = "mixup_cutmix"
    _salt = 0x5C

    def __init__(
        self,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        *,
        num_classes: int,
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
        self.mixup_alpha = check_positive("mixup_alpha", mixup_alpha)
        self.cutmix_alpha = check_positive("cutmix_alpha", cutmix_alpha)
        self.switch_prob = check_probability("switch_prob", switch_prob)
        super().__init__(
            num_classes=num_classes,
            p=p,
            mode=mode,
            until_epoch=until_epoch,
            input_key=input_key,
            target_key=target_key,
            input_getter=input_getter,
            input_setter=input_setter,
            target_getter=target_getter,
            target_setter=target_setter,
            seed=seed,
        )

    @override
    def sample_params(
        self,
        shape: tuple[int, ...],
        *,
        device: torch.device,
        generator: torch.Generator,
        cpu_generator: torch.Generator,
    ) -> Params:
        _check_spatial(shape, type(self).__name__)
        b, height, width = shape[0], shape[-2], shape[-1]
        perm = torch.randperm(b, generator=generator, device=device)
        if self.mode == "batch":
            u = torch.rand((2,), generator=cpu_generator)
            if not bool(u[0] < self.p):
                return {"perm": perm, "skip": True}
            use_cutmix = bool(u[1] < self.switch_prob)
            alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
            lam = sample_beta(alpha, alpha, (1,), generator=cpu_generator)
            if use_cutmix:
                boxes = cutmix_boxes(lam, height, width, generator=cpu_generator)
                return {"perm": perm, "use_cutmix": True, "boxes": boxes}
            return {"perm": perm, "use_cutmix": False, "mixup_lam": lam.to(device)}
        active = self._active_draw(b, device, generator)
        use_cutmix = torch.rand((b,), generator=generator, device=device) < self.switch_prob
        lam_m = sample_beta(
            self.mixup_alpha, self.mixup_alpha, (b,), generator=generator, device=device
        )
        lam_c = sample_beta(
            self.cutmix_alpha, self.cutmix_alpha, (b,), generator=generator, device=device
        )
        lam_c = torch.where(active & use_cutmix, lam_c, 1.0)
        return {
            "perm": perm,
            "use_cutmix": use_cutmix,
            "mixup_lam": torch.where(active & ~use_cutmix, lam_m, 1.0),
            "boxes": cutmix_boxes(lam_c, height, width, generator=generator),
        }

    @override
    def apply(
        self, x: torch.Tensor, targets: torch.Tensor, params: Params
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        perm, use_cutmix = params["perm"], params["use_cutmix"]
        if use_cutmix is True:
            return cutmix(x, targets, params["boxes"], perm)
        if use_cutmix is False:
            x_mix, y_mix = mixup(x, targets, params["mixup_lam"], perm)
            return x_mix, y_mix, params["mixup_lam"]
        xm, ym = mixup(x, targets, params["mixup_lam"], perm)
        xc, yc, lam_c = cutmix(x, targets, params["boxes"], perm)
        x_mix = torch.where(use_cutmix.view(-1, *([1] * (x.ndim - 1))), xc, xm)
        y_mix = torch.where(use_cutmix.view(-1, *([1] * (ym.ndim - 1))), yc, ym)
        return x_mix, y_mix, torch.where(use_cutmix, lam_c, params["mixup_lam"])


def _check_spatial(shape: tuple[int, ...], name: str) -> None:
    if len(shape) < 3:
        raise RuntimeError(
            f"{name} needs inputs with two spatial dims (B, ..., H, W), got shape {shape}. "
            "Use MixUpCallback for vector inputs."
        )


for _cls in (MixUpCallback, CutMixCallback, MixUpCutMixCallback):
    _cls.__doc__ = (_cls.__doc__ or "").replace("    {shared}", _SHARED_ARGS_DOC.strip("\n"))
