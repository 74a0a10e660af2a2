"""Batch normalization as a regularizer: ghost batch norm, precise statistics, insertion.

Maths. BatchNorm normalises with the mini-batch statistics, ``x̂ = (x − μ_B)/sqrt(σ²_B + ε)``;
the noise of ``μ_B, σ²_B`` is its regularizing effect, and smaller batches give more of it.

* **Ghost batch norm** (Hoffer et al. 2017) splits a batch of ``N`` rows into
  ``n = ceil(N / virtual_batch_size)`` virtual batches and normalises each with its own mean and
  biased variance. The split is ``torch.tensor_split(x, n)``: sizes differ by at most one and
  none exceeds ``virtual_batch_size``, so there is never a tiny remainder chunk. The running
  statistics are updated as if ``BatchNorm`` had seen the ``n`` chunks one after another with
  momentum ``momentum / n`` (Composer's rule), computed in closed form. A batch of at most
  ``virtual_batch_size`` rows is one virtual batch: exactly ``BatchNorm``. Eval is ``BatchNorm``.
* **Precise BN** (fvcore's ``update_bn_stats``; Wu & Johnson 2021) replaces the running EMA by
  the exact population statistics of the training-mode activations over ``num_batches`` batches:
  ``μ = E[x]`` and the unbiased ``σ² = N/(N−1)·(E[x²] − E[x]²)`` per channel (the same unbiased
  convention as ``BatchNorm.running_var``), accumulated with Chan's stable merge of per-batch
  ``(count, mean, M2)`` in float64. Under DDP the per-rank ``(count, mean, M2)`` are all-gathered
  and merged the same way, so every rank ends with the statistics of the union of the data.

Pure torch first: :func:`ghost_batch_norm`, :func:`update_running_stats_`, :class:`GhostBatchNorm`
(1d/2d/3d subclasses of ``nn.BatchNormNd``), :func:`apply_ghost_batch_norm`,
:func:`remove_ghost_batch_norm`, :func:`add_batch_norm`, :func:`remove_batch_norm`,
:class:`RunningMoments`. Lightning below: :class:`GhostBatchNormCallback`,
:class:`PreciseBatchNormCallback`, :class:`BatchNormFreezeCallback`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from lightning_reg.core.logging import is_logging_step, log_scalars
from lightning_reg.core.strategies import ALL_SHARDED, refuse_strategies
from lightning_reg.core.surgery import (
    ModuleChange,
    TransparentWrapper,
    format_changes,
    replace_modules,
    restore_modules,
)
from lightning_reg.core.validation import check_choice, check_int

__all__ = [
    "BatchNormAfter",
    "BatchNormFreezeCallback",
    "GhostBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GhostBatchNormCallback",
    "PreciseBatchNormCallback",
    "RunningMoments",
    "add_batch_norm",
    "apply_ghost_batch_norm",
    "batch_norm_layers",
    "ghost_batch_norm",
    "recompute_batch_norm_stats",
    "remove_batch_norm",
    "remove_ghost_batch_norm",
    "update_running_stats_",
    "virtual_batch_sizes",
]


# --------------------------------------------------------------------------------------------
# Ghost batch norm: functions
# --------------------------------------------------------------------------------------------


_IMPLS = ("auto", "loop", "vectorized")


def virtual_batch_sizes(batch_size: int, virtual_batch_size: int) -> list[int]:
    """Row counts of the virtual batches a batch of ``batch_size`` rows is split into.

    ``ceil(batch_size / virtual_batch_size)`` chunks whose sizes differ by at most one (as
    ``torch.tensor_split``).

    Example:
        >>> virtual_batch_sizes(10, 4)
        [4, 3, 3]
    """
    n = max(1, math.ceil(batch_size / virtual_batch_size))
    q, r = divmod(batch_size, n)
    return [q + 1] * r + [q] * (n - r)


def ghost_batch_norm(
    x: torch.Tensor,
    virtual_batch_size: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: int = 0,
    impl: str = "auto",
) -> torch.Tensor:
    """Normalise each virtual batch of ``x`` (shape ``(N, C, *S)``) with its own statistics.

    Every virtual batch is normalised with its mean and biased variance, exactly as
    ``F.batch_norm(chunk, training=True)``. If running statistics are given they are updated as
    ``BatchNorm`` would after seeing the chunks in turn with momentum ``momentum / n_chunks``
    (with ``momentum=None``: the cumulative average, ``num_batches_tracked`` chunks seen so far).

    Two implementations give the same result:

    * ``"loop"``: one fused ``F.batch_norm`` per chunk (Composer's algorithm). Fastest on CPU,
      where the fused kernel dominates and per-call overhead is small.
    * ``"vectorized"``: the chunks of equal size are laid side by side as channels,
      ``(size, k·C, *S)``, and normalised by ONE fused ``F.batch_norm`` whatever the number of
      chunks (two when sizes differ); the per-chunk statistics come back through temporary
      running buffers with momentum 1 and update the real ones in closed form
      (:func:`update_running_stats_`). Costs two layout copies; meant for accelerators, where
      a loop pays kernel launches per chunk.
    * ``"auto"``: ``"loop"`` on CPU, ``"vectorized"`` elsewhere.

    Args:
        x: input ``(N, C, *S)``.
        virtual_batch_size: maximum rows per virtual batch (>= 1).
        weight, bias: optional per-channel affine parameters ``(C,)``.
        running_mean, running_var: optional buffers ``(C,)`` updated in place.
        momentum: BatchNorm momentum, or ``None`` for the cumulative average.
        eps: added to the variance.
        num_batches_tracked: chunks seen before (only used when ``momentum is None``).
        impl: ``"auto"``, ``"loop"`` or ``"vectorized"``.

    Returns:
        The normalised tensor, same shape and dtype as ``x``.

    Raises:
        ValueError: if a virtual batch has a single value per channel (its variance is
            undefined; ``BatchNorm`` refuses it in training too), ``x`` has fewer than 2 dims,
            or ``impl`` is unknown.
    """
    if x.ndim < 2:
        raise ValueError(f"ghost_batch_norm needs input (N, C, ...), got shape {tuple(x.shape)}")
    check_choice("impl", impl, _IMPLS)
    n_rows, channels = x.shape[0], x.shape[1]
    spatial = tuple(x.shape[2:])
    sizes = virtual_batch_sizes(n_rows, virtual_batch_size)
    per_row = math.prod(spatial)
    if min(sizes) * per_row <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel in each virtual batch when training, got "
            f"virtual batches of {min(sizes)} row(s) x {per_row} value(s) (input shape "
            f"{tuple(x.shape)}, virtual_batch_size={virtual_batch_size}). Raise "
            "virtual_batch_size or the batch size."
        )
    n = len(sizes)
    track = running_mean is not None and running_var is not None
    if impl == "auto":
        impl = "loop" if x.device.type == "cpu" else "vectorized"
    if impl == "loop" or n == 1:
        outs = []
        for k, chunk in enumerate(torch.split(x, sizes)):
            if not track:
                factor = 0.0
            elif momentum is None:
                factor = 1.0 / (num_batches_tracked + k + 1)
            else:
                factor = momentum / n
            outs.append(
                F.batch_norm(chunk, running_mean, running_var, weight, bias, True, factor, eps)
            )
        return torch.cat(outs, dim=0)

    stats_dtype = torch.promote_types(running_mean.dtype if track else torch.float32, torch.float32)
    outs, means, variances = [], [], []
    start = 0
    for size in sorted(set(sizes), reverse=True):  # tensor_split puts the larger chunks first
        k = sizes.count(size)
        part = x[start : start + k * size]
        start += k * size
        side_by_side = part.reshape(k, size, channels, *spatial).transpose(0, 1)
        side_by_side = side_by_side.reshape(size, k * channels, *spatial)
        tmp_mean = torch.zeros(k * channels, device=x.device, dtype=stats_dtype)
        tmp_var = torch.ones(k * channels, device=x.device, dtype=stats_dtype)
        y = F.batch_norm(
            side_by_side,
            tmp_mean if track else None,
            tmp_var if track else None,
            None if weight is None else weight.repeat(k),
            None if bias is None else bias.repeat(k),
            True,
            1.0,
            eps,
        )
        y = y.reshape(size, k, channels, *spatial).transpose(0, 1)
        outs.append(y.reshape(k * size, channels, *spatial))
        means.append(tmp_mean.view(k, channels))
        variances.append(tmp_var.view(k, channels))
    if track:
        assert running_mean is not None and running_var is not None
        update_running_stats_(
            running_mean,
            running_var,
            torch.cat(means),
            torch.cat(variances),
            momentum,
            num_batches_tracked,
        )
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


@torch.no_grad()
def update_running_stats_(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    means: torch.Tensor,
    unbiased_vars: torch.Tensor,
    momentum: float | None,
    num_batches_tracked: int = 0,
) -> None:
    """Update running statistics as ``BatchNorm`` would after seeing ``n`` chunks in turn.

    With ``momentum`` ``m``: each chunk is an EMA step with ``m / n`` (Composer's ghost-BN rule),
    in closed form ``r ← (1 − m/n)^n·r + Σ_k (m/n)(1 − m/n)^{n−k}·s_k``. With ``momentum=None``
    (BatchNorm's cumulative average): ``r ← (t·r + Σ_k s_k) / (t + n)`` where ``t`` is
    ``num_batches_tracked`` before the update.

    Args:
        running_mean: buffer (C,), updated in place.
        running_var: buffer (C,), updated in place.
        means: per-chunk means (n, C).
        unbiased_vars: per-chunk unbiased variances (n, C).
        momentum: BatchNorm momentum or ``None``.
        num_batches_tracked: chunks seen so far (used when ``momentum is None``).
    """
    n = means.shape[0]
    dtype = means.dtype
    if momentum is None:
        t = float(num_batches_tracked)
        new_mean = (running_mean.to(dtype) * t + means.sum(0)) / (t + n)
        new_var = (running_var.to(dtype) * t + unbiased_vars.sum(0)) / (t + n)
    else:
        m = float(momentum) / n
        decay = 1.0 - m
        powers = torch.arange(n - 1, -1, -1, device=means.device, dtype=torch.float64)
        w = (m * decay**powers).to(dtype).unsqueeze(1)
        new_mean = running_mean.to(dtype) * decay**n + (w * means).sum(0)
        new_var = running_var.to(dtype) * decay**n + (w * unbiased_vars).sum(0)
    running_mean.copy_(new_mean)
    running_var.copy_(new_var)


# --------------------------------------------------------------------------------------------
# Ghost batch norm: modules
# --------------------------------------------------------------------------------------------


class GhostBatchNorm(_BatchNorm):
    """Batch norm over virtual batches of at most ``virtual_batch_size`` rows.

    In training each virtual batch (see :func:`virtual_batch_sizes`) is normalised with its own
    mean and biased variance; the running statistics are updated as if ``BatchNorm`` had seen the
    chunks in turn with momentum ``momentum / n_chunks``, and ``num_batches_tracked`` grows by
    ``n_chunks``. A batch of at most ``virtual_batch_size`` rows is normalised exactly as
    ``BatchNorm`` does. Eval mode is ``BatchNorm`` eval, bit for bit.

    Use :class:`GhostBatchNorm1d`/``2d``/``3d``: they subclass ``nn.BatchNorm1d``/``2d``/``3d``,
    so ``isinstance`` checks, ``state_dict`` keys and checkpoints are those of ``BatchNorm``
    (weights load both ways). ``GhostBatchNorm`` itself accepts any input ``(N, C, ...)``.

    A training batch with fewer rows than ``virtual_batch_size`` warns once per module: it has a
    single virtual batch, so ghost BN does nothing on it. Under DDP that is the per-rank batch.

    Args:
        num_features: channels ``C``.
        eps, momentum, affine, track_running_stats, device, dtype: as ``nn.BatchNorm2d``.
        virtual_batch_size: rows per virtual batch (>= 1; keyword).
        impl: ``"auto"``, ``"loop"`` or ``"vectorized"``, see :func:`ghost_batch_norm`.

    Raises:
        ValueError: if ``virtual_batch_size`` is not an integer >= 1; in training, if a virtual
            batch holds a single value per channel.

    Example:
        >>> bn = GhostBatchNorm2d(8, virtual_batch_size=4)
        >>> bn(torch.randn(16, 8, 5, 5)).shape
        torch.Size([16, 8, 5, 5])

    Reference:
        Hoffer, Hubara, Soudry, "Train longer, generalize better: closing the generalization
        gap in large batch training of neural networks", NeurIPS 2017.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        virtual_batch_size: int = 32,
        impl: str = "auto",
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.virtual_batch_size = check_int("virtual_batch_size", virtual_batch_size, minimum=1)
        self.impl = check_choice("impl", impl, _IMPLS)
        self.last_num_virtual_batches = 0
        self._warned_small_batch = False

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        rows = input.shape[0]
        if not use_batch_stats or rows <= self.virtual_batch_size:
            if self.training and rows < self.virtual_batch_size and not self._warned_small_batch:
                self._warned_small_batch = True
                warnings.warn(
                    f"GhostBatchNorm got a training batch of {rows} rows, fewer than "
                    f"virtual_batch_size={self.virtual_batch_size}: it is normalised as one "
                    "batch (plain BatchNorm). Under DDP this is the per-rank batch. Lower "
                    "virtual_batch_size or raise the batch size.",
                    stacklevel=2,
                )
            if self.training:
                self.last_num_virtual_batches = 1
            return super().forward(input)
        update = self.training and self.track_running_stats and self.running_mean is not None
        if self.training:
            self.last_num_virtual_batches = math.ceil(rows / self.virtual_batch_size)
        tracked = 0
        if update and self.momentum is None:
            assert self.num_batches_tracked is not None
            tracked = int(self.num_batches_tracked)  # BatchNorm syncs here too
        y = ghost_batch_norm(
            input,
            self.virtual_batch_size,
            self.weight,
            self.bias,
            self.running_mean if update else None,
            self.running_var if update else None,
            self.momentum,
            self.eps,
            tracked,
            self.impl,
        )
        if update:
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.add_(self.last_num_virtual_batches)
        return y

    @classmethod
    def from_batch_norm(cls, bn: _BatchNorm, virtual_batch_size: int) -> GhostBatchNorm:
        """A ghost BN of the matching dimension sharing ``bn``'s parameters and buffers.

        Raises:
            TypeError: if ``bn`` is not an ``nn.BatchNorm1d``/``2d``/``3d``.
        """
        target = _GHOST_OF.get(type(bn))
        if target is None:
            target = next((g for b, g in _GHOST_OF.items() if isinstance(bn, b)), None)
        if target is None:
            raise TypeError(
                f"No ghost batch norm for {type(bn).__name__}; expected BatchNorm1d/2d/3d"
            )
        ghost = target(
            bn.num_features,
            bn.eps,
            bn.momentum,
            bn.affine,
            bn.track_running_stats,
            device="meta",
            virtual_batch_size=virtual_batch_size,
        )
        _share_state(bn, ghost)
        return ghost

    def to_batch_norm(self) -> _BatchNorm:
        """The plain ``nn.BatchNormNd`` with the same parameters and buffers (shared)."""
        plain_type = next((b for b, g in _GHOST_OF.items() if isinstance(self, g)), None)
        if plain_type is None:
            raise TypeError("A generic GhostBatchNorm has no plain BatchNorm counterpart")
        bn = plain_type(
            self.num_features,
            self.eps,
            self.momentum,
            self.affine,
            self.track_running_stats,
            device="meta",
        )
        _share_state(self, bn)
        return bn


def _share_state(src: _BatchNorm, dst: _BatchNorm) -> None:
    """Make ``dst`` use ``src``'s very parameters and buffers (optimizers keep working)."""
    for name in ("weight", "bias"):
        value = getattr(src, name)
        dst._parameters[name] = value
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        dst._buffers[name] = src._buffers.get(name)
    dst.train(src.training)
    if hasattr(src, "qconfig"):
        dst.qconfig = src.qconfig


class GhostBatchNorm1d(GhostBatchNorm, nn.BatchNorm1d):
    """:class:`GhostBatchNorm` for ``(N, C)`` or ``(N, C, L)`` input; an ``nn.BatchNorm1d``.

    Example:
        >>> bn = GhostBatchNorm1d(4, virtual_batch_size=2)
        >>> bn(torch.randn(8, 4)).shape
        torch.Size([8, 4])
    """

    _check_input_dim = nn.BatchNorm1d._check_input_dim


class GhostBatchNorm2d(GhostBatchNorm, nn.BatchNorm2d):
    """:class:`GhostBatchNorm` for ``(N, C, H, W)`` input; an ``nn.BatchNorm2d``.

    Example:
        >>> bn = GhostBatchNorm2d(4, virtual_batch_size=2)
        >>> bn(torch.randn(8, 4, 5, 5)).shape
        torch.Size([8, 4, 5, 5])
    """

    _check_input_dim = nn.BatchNorm2d._check_input_dim


class GhostBatchNorm3d(GhostBatchNorm, nn.BatchNorm3d):
    """:class:`GhostBatchNorm` for ``(N, C, D, H, W)`` input; an ``nn.BatchNorm3d``.

    Example:
        >>> bn = GhostBatchNorm3d(4, virtual_batch_size=2)
        >>> bn(torch.randn(8, 4, 2, 3, 3)).shape
        torch.Size([8, 4, 2, 3, 3])
    """

    _check_input_dim = nn.BatchNorm3d._check_input_dim


_GHOST_OF: dict[type[_BatchNorm], type[GhostBatchNorm]] = {
    nn.BatchNorm1d: GhostBatchNorm1d,
    nn.BatchNorm2d: GhostBatchNorm2d,
    nn.BatchNorm3d: GhostBatchNorm3d,
}


def batch_norm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every BatchNorm-family layer (``_BatchNorm``: BN1d/2d/3d, SyncBN, ghost BN) of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def apply_ghost_batch_norm(model: nn.Module, virtual_batch_size: int) -> list[ModuleChange]:
    """Replace every ``nn.BatchNorm1d``/``2d``/``3d`` by its ghost version (in place).

    The ghost layers share the original parameters and buffers, so ``state_dict`` keys and
    values are unchanged and an optimizer created before still works. Forward hooks registered
    on the replaced modules are not carried over.

    Args:
        model: the model to change.
        virtual_batch_size: rows per virtual batch (>= 1).

    Returns:
        The list of changes.

    Raises:
        ValueError: if ``virtual_batch_size`` is not an integer >= 1.
        RuntimeError: if the model already has ghost batch norm, or has no BatchNorm1d/2d/3d.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> apply_ghost_batch_norm(m, 8)[0].new_type
        'GhostBatchNorm2d'
    """
    virtual_batch_size = check_int("virtual_batch_size", virtual_batch_size, minimum=1)

    def convert(module: nn.Module, path: str) -> nn.Module:
        assert isinstance(module, _BatchNorm)
        return GhostBatchNorm.from_batch_norm(module, virtual_batch_size)

    policy = {t: convert for t in _GHOST_OF}
    changes = replace_modules(model, policy, refuse_if_contains=(GhostBatchNorm,))
    if not changes:
        found = sorted({type(m).__name__ for m in model.modules()})
        raise RuntimeError(
            "apply_ghost_batch_norm found no BatchNorm1d/2d/3d layer to replace. The model "
            f"has: {found}. Add batch norm first with `lightning_reg.add_batch_norm(model)`."
        )
    return changes


def remove_ghost_batch_norm(model: nn.Module) -> list[ModuleChange]:
    """Replace every ghost batch norm by the plain ``nn.BatchNormNd`` with the same state."""

    def convert(module: nn.Module, path: str) -> nn.Module:
        assert isinstance(module, GhostBatchNorm)
        return module.to_batch_norm()

    return replace_modules(model, {GhostBatchNorm: convert})


# --------------------------------------------------------------------------------------------
# Inserting batch norm
# --------------------------------------------------------------------------------------------

_BN_FOR: dict[type[nn.Module], type[_BatchNorm]] = {
    nn.Linear: nn.BatchNorm1d,
    nn.Conv1d: nn.BatchNorm1d,
    nn.Conv2d: nn.BatchNorm2d,
    nn.Conv3d: nn.BatchNorm3d,
}


class BatchNormAfter(TransparentWrapper):
    """``module`` followed by a new BatchNorm over its output channels.

    For ``nn.Linear`` the BatchNorm1d normalises the last dim (extra leading dims are flattened
    into the batch); for ``ConvNd`` it is a BatchNormNd over ``out_channels``. The wrapped
    module's ``state_dict`` keys are unchanged; the new layer's keys are ``<path>.bn.*``.
    :meth:`unwrap` returns ``module``.

    Args:
        module: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``.
        momentum: momentum of the new BatchNorm.

    Raises:
        TypeError: for another module type.

    Example:
        >>> layer = BatchNormAfter(nn.Linear(3, 4))
        >>> sorted(layer.state_dict())[:3]
        ['bias', 'bn.bias', 'bn.num_batches_tracked']
    """

    def __init__(self, module: nn.Module, momentum: float | None = 0.1) -> None:
        super().__init__(module)
        bn_type = next((b for t, b in _BN_FOR.items() if isinstance(module, t)), None)
        if bn_type is None:
            raise TypeError(
                f"BatchNormAfter supports {[t.__name__ for t in _BN_FOR]}, got "
                f"{type(module).__name__}"
            )
        features = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        weight = next(module.parameters(), None)
        factory = {} if weight is None else {"device": weight.device, "dtype": weight.dtype}
        self.bn = bn_type(features, momentum=momentum, **factory)
        self._flatten = isinstance(module, nn.Linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.module(x)
        if self._flatten and y.ndim != 2:
            return self.bn(y.reshape(-1, y.shape[-1])).reshape(y.shape)
        return self.bn(y)


def add_batch_norm(
    model: nn.Module,
    after: tuple[type[nn.Module], ...] | type[nn.Module] = (nn.Linear, nn.Conv2d),
    *,
    skip_last: bool = True,
    allow_existing: bool = False,
    momentum: float | None = 0.1,
) -> list[ModuleChange]:
    """Insert a BatchNorm after every module of the types in ``after`` (in place).

    Args:
        model: the model to change.
        after: module types to follow with BatchNorm (``nn.Linear``, ``nn.ConvNd``).
        skip_last: leave the last matching module alone (usually the classifier head: batch
            norm on the logits is rarely wanted).
        allow_existing: insert even though the model already has BatchNorm layers.
        momentum: momentum of the new layers.

    Returns:
        The list of changes.

    Raises:
        RuntimeError: if the model already has BatchNorm (unless ``allow_existing``), was
            already changed by ``add_batch_norm``, or has nothing to follow.
        TypeError: if ``after`` names a type other than Linear/Conv1d/2d/3d.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> [c.path for c in add_batch_norm(m)]
        ['0']
    """
    types = (after,) if isinstance(after, type) else tuple(after)
    bad = [t for t in types if not (isinstance(t, type) and issubclass(t, tuple(_BN_FOR)))]
    if bad or not types:
        raise TypeError(f"`after` must be Linear/Conv1d/Conv2d/Conv3d types, got {after!r}")
    if any(isinstance(m, BatchNormAfter) for m in model.modules()):
        raise RuntimeError(
            "The model already has BatchNorm inserted by add_batch_norm; call "
            "remove_batch_norm(model) first, or do not apply it twice."
        )
    existing = [n for n, _ in batch_norm_layers(model)]
    if existing and not allow_existing:
        raise RuntimeError(
            f"The model already has BatchNorm layers ({existing[:3]}"
            f"{'...' if len(existing) > 3 else ''}); add_batch_norm is for models without any. "
            "Pass allow_existing=True to insert more anyway."
        )
    targets = [n for n, m in model.named_modules() if n and isinstance(m, types)]
    skip = targets[-1] if skip_last and targets else None

    def wrap(module: nn.Module, path: str) -> nn.Module | None:
        return None if path == skip else BatchNormAfter(module, momentum)

    changes = replace_modules(model, {t: wrap for t in types})
    if not changes:
        raise RuntimeError(
            f"add_batch_norm found no {[t.__name__ for t in types]} to follow with BatchNorm"
            f"{' (other than the last one, skip_last=True)' if skip else ''}."
        )
    return changes


def remove_batch_norm(model: nn.Module) -> list[ModuleChange]:
    """Undo :func:`add_batch_norm`: the wrapped modules come back, the inserted BN goes."""
    return restore_modules(model, BatchNormAfter)


# --------------------------------------------------------------------------------------------
# Precise statistics: functions
# --------------------------------------------------------------------------------------------


class RunningMoments:
    """Exact per-channel ``(count, mean, M2)`` of everything passed to :meth:`update`.

    Batches are merged with Chan et al.'s parallel rule in float64 (float32 on MPS), which is
    stable where ``E[x²] − E[x]²`` would cancel. :meth:`merge` combines several of them (for
    example one per DDP rank).

    Args:
        num_features: channels ``C`` (dim 1 of the input).
        device: where the accumulators live.
    """

    def __init__(self, num_features: int, device: torch.device | str | None = None) -> None:
        device = torch.device(device) if device is not None else torch.device("cpu")
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.count = torch.zeros((), device=device, dtype=dtype)
        self.mean = torch.zeros(num_features, device=device, dtype=dtype)
        self.m2 = torch.zeros(num_features, device=device, dtype=dtype)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add a batch ``(N, C, *S)``; every value of channel ``c`` counts once."""
        dims = [0, *range(2, x.ndim)]
        xf = x.detach().to(torch.promote_types(x.dtype, torch.float32))
        var, mean = torch.var_mean(xf, dim=dims, correction=0)
        n = x.numel() // x.shape[1]
        self._merge(
            torch.tensor(float(n), dtype=self.count.dtype, device=self.count.device),
            mean.to(self.mean.dtype),
            var.to(self.m2.dtype) * n,
        )

    def _merge(self, n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        total = self.count + n
        safe = torch.where(total > 0, total, torch.ones_like(total))
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / safe)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * n / safe)
        self.count = total

    @staticmethod
    def merge(counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor) -> RunningMoments:
        """Combine ``(R,)`` counts, ``(R, C)`` means and ``(R, C)`` M2s into one, exactly.

        Closed form of Chan's rule: ``μ = Σ n_r μ_r / N``, ``M2 = Σ M2_r + Σ n_r (μ_r − μ)²``.
        """
        out = RunningMoments(means.shape[1], means.device)
        dtype = out.mean.dtype
        counts, means, m2s = counts.to(dtype), means.to(dtype), m2s.to(dtype)
        total = counts.sum()
        mean = (counts.unsqueeze(1) * means).sum(0) / total.clamp_min(1)
        out.count = total
        out.mean = mean
        out.m2 = m2s.sum(0) + (counts.unsqueeze(1) * (means - mean) ** 2).sum(0)
        return out

    def pack(self) -> torch.Tensor:
        """``[count, mean..., M2...]`` as one flat tensor (for a collective)."""
        return torch.cat([self.count.reshape(1), self.mean, self.m2])

    @staticmethod
    def unpack(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = (flat.shape[-1] - 1) // 2
        return flat[..., 0], flat[..., 1 : 1 + c], flat[..., 1 + c :]

    @property
    def var(self) -> torch.Tensor:
        """Unbiased variance ``M2 / (count − 1)`` (BatchNorm's ``running_var`` convention)."""
        return self.m2 / (self.count - 1).clamp_min(1)


def _default_forward(input_key: int | str) -> Callable[[nn.Module, Any], Any]:
    def forward(model: nn.Module, batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            return model(batch)
        if isinstance(batch, (Mapping, Sequence)) and not isinstance(batch, str):
            try:
                x = batch[input_key]  # type: ignore[index]
            except (KeyError, IndexError, TypeError) as err:
                raise RuntimeError(
                    f"PreciseBatchNormCallback could not read input_key={input_key!r} from a "
                    f"training batch of type {type(batch).__name__}. Set `input_key`, or pass "
                    "`forward_fn(model, batch)`."
                ) from err
            return model(x)
        raise RuntimeError(
            f"PreciseBatchNormCallback cannot find the input in a {type(batch).__name__} "
            "batch; pass `forward_fn(model, batch)`."
        )

    return forward


@torch.no_grad()
def recompute_batch_norm_stats(
    model: nn.Module,
    batches: Any,
    num_batches: int,
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    input_key: int | str = 0,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> int:
    """Set every BatchNorm's running statistics to the exact population statistics.

    Runs up to ``num_batches`` batches from ``batches`` through ``model`` with BatchNorm layers in
    training mode (they normalise with batch statistics, as in training, but do not touch their
    buffers) and every other module in eval mode (dropout off: the statistics are those the
    eval-time network sees). Forward pre-hooks record the exact per-channel moments of each BN
    input; the running mean/var become ``E[x]`` and the unbiased variance. Flags, buffers other
    than ``running_mean``/``running_var`` and ``num_batches_tracked`` are left as found.

    Args:
        model: the network.
        batches: an iterable of batches (already on the model's device).
        num_batches: how many batches to use at most (>= 1).
        forward_fn: ``forward_fn(model, batch)``; default ``model(batch[input_key])``.
        input_key: index or key of the input in list/dict batches.
        reduce_fn: optional ``fn(packed (L,)) -> gathered (R, L)`` across processes; the
            per-process moments are merged in rank order, so all processes get equal results.

    Returns:
        The number of batches used on this process.

    Raises:
        RuntimeError: if the model has no BatchNorm with running statistics, or no batch came.
    """
    num_batches = check_int("num_batches", num_batches, minimum=1)
    layers = [
        m
        for _, m in batch_norm_layers(model)
        if m.track_running_stats and m.running_mean is not None
    ]
    if not layers:
        raise RuntimeError(
            "Precise BN found no BatchNorm layer with running statistics in the model."
        )
    forward_fn = forward_fn or _default_forward(input_key)
    flags = [(m, m.training) for m in model.modules()]
    saved = [
        (m, m.track_running_stats, m.momentum, [b.detach().clone() for b in m.buffers()])
        for m in layers
    ]
    # Plain BatchNorm computes the batch statistics anyway: with momentum 1 its buffers hold
    # exactly the batch mean and unbiased variance after each forward, read by a post-hook (no
    # second pass over the activations). Layers with their own forward (ghost, SyncBatchNorm,
    # custom) get their input's moments computed by a pre-hook instead.
    fast = [type(m).forward is _BatchNorm.forward for m in layers]

    records: list[list[tuple[int, torch.Tensor, torch.Tensor]]] = [[] for _ in layers]

    def pre_hook(rec: list[tuple[int, torch.Tensor, torch.Tensor]]) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            n = x.numel() // x.shape[1]
            xf = x.to(torch.promote_types(x.dtype, torch.float32))
            var, mean = torch.var_mean(xf, dim=[0, *range(2, x.ndim)], correction=0)
            rec.append((n, mean, var * n))

        return hook

    def post_hook(rec: list[tuple[int, torch.Tensor, torch.Tensor]]) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            n = args[0].numel() // args[0].shape[1]
            rec.append((n, module.running_mean.clone(), module.running_var * (n - 1)))

        return hook

    handles = [
        m.register_forward_hook(post_hook(r)) if f else m.register_forward_pre_hook(pre_hook(r))
        for m, r, f in zip(layers, records, fast)
    ]
    used = 0
    try:
        for module, _ in flags:
            module.training = False
        for module, is_fast in zip(layers, fast):
            module.training = True
            if is_fast:
                module.momentum = 1.0
            else:
                module.track_running_stats = False  # batch statistics, buffers untouched
        for batch in batches:
            if used >= num_batches:
                break
            forward_fn(model, batch)
            used += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            module.training = flag
        for module, track, momentum, buffers in saved:
            module.track_running_stats = track
            module.momentum = momentum
            for buf, old in zip(module.buffers(), buffers):
                buf.copy_(old)
    if used == 0:
        raise RuntimeError("Precise BN got no batch: the training data loader is empty.")
    moments = [
        RunningMoments.merge(
            torch.tensor([r[0] for r in rec], device=m.running_mean.device),
            torch.stack([r[1] for r in rec]),
            torch.stack([r[2] for r in rec]),
        )
        for m, rec in zip(layers, records)
    ]
    if reduce_fn is not None:
        packed = torch.cat([a.pack() for a in moments])
        gathered = reduce_fn(packed)
        offset = 0
        merged = []
        for a in moments:
            size = a.pack().numel()
            merged.append(
                RunningMoments.merge(*RunningMoments.unpack(gathered[:, offset : offset + size]))
            )
            offset += size
        moments = merged
    for module, acc in zip(layers, moments):
        module.running_mean.copy_(acc.mean.to(module.running_mean.dtype))
        module.running_var.copy_(acc.var.to(module.running_var.dtype))
    return used


# --------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------


class _GhostAwareSyncBatchNorm(TorchSyncBatchNorm):
    """Lightning's ``sync_batchnorm=True`` conversion that leaves ghost batch norm alone.

    Ghost BN normalises each per-rank virtual batch with its own statistics, which is the
    opposite of SyncBatchNorm's global batch. Other BatchNorm layers are converted as usual.
    """

    @override
    def apply(self, model: nn.Module) -> nn.Module:
        def convert(module: nn.Module, path: str) -> nn.Module | None:
            if isinstance(module, (GhostBatchNorm, nn.SyncBatchNorm)):
                return None
            return nn.SyncBatchNorm.convert_sync_batchnorm(module)

        replace_modules(model, {_BatchNorm: convert})
        return model


class GhostBatchNormCallback(pl.Callback):
    """Swap every ``nn.BatchNorm1d/2d/3d`` for ghost batch norm, in ``setup``.

    The surgery runs in ``Callback.setup`` (before checkpoint restore, DDP and the optimizers)
    and only once per model, so ``fit`` then ``validate`` does not wrap twice; the change table
    is logged once at rank zero. The model keeps its ghost layers afterwards (eval and
    ``state_dict`` are those of BatchNorm); :func:`remove_ghost_batch_norm` gives plain
    BatchNorm back. Logs ``reg/ghost_bn/num_virtual_batches`` on logging steps.

    With ``Trainer(sync_batchnorm=True)``, Lightning would convert the ghost layers (they are
    BatchNorm subclasses) to SyncBatchNorm after ``setup`` and silently undo ghost BN. The
    callback swaps Lightning's converter for one that leaves ghost layers per-rank and converts
    the other BatchNorm layers; it raises at fit start if ghost layers were converted anyway.

    Args:
        virtual_batch_size: rows per virtual batch, per rank (>= 1).

    Raises:
        ValueError: if ``virtual_batch_size`` is not an integer >= 1.
        RuntimeError: at setup, if the model has no BatchNorm, or already has ghost batch norm
            with another virtual batch size; at fit start, if ghost layers became SyncBatchNorm.

    Example:
        >>> trainer = pl.Trainer(callbacks=[GhostBatchNormCallback(32)])  # doctest: +SKIP

    Reference:
        Hoffer, Hubara, Soudry, "Train longer, generalize better", NeurIPS 2017.
    """

    def __init__(self, virtual_batch_size: int) -> None:
        super().__init__()
        self.virtual_batch_size = check_int("virtual_batch_size", virtual_batch_size, minimum=1)
        self._paths: list[str] = []

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_strategies(
            trainer, "GhostBatchNormCallback", ALL_SHARDED, "it is verified under DDP only"
        )
        ghosts = [(n, m) for n, m in pl_module.named_modules() if isinstance(m, GhostBatchNorm)]
        if ghosts:
            sizes = {m.virtual_batch_size for _, m in ghosts}
            if sizes != {self.virtual_batch_size}:
                raise RuntimeError(
                    "The model already has ghost batch norm with virtual_batch_size="
                    f"{sorted(sizes)}, but GhostBatchNormCallback({self.virtual_batch_size}) "
                    "was given. Call "
                    "remove_ghost_batch_norm(model) first or use one virtual batch size."
                )
            self._paths = [n for n, _ in ghosts]
        else:
            if not batch_norm_layers(pl_module):
                found = sorted({type(m).__name__ for m in pl_module.modules()})
                raise RuntimeError(
                    "GhostBatchNormCallback found no BatchNorm layer in the model (it has: "
                    f"{found}). Insert some with `lightning_reg.add_batch_norm(model)` or remove "
                    "the callback."
                )
            changes = apply_ghost_batch_norm(pl_module, self.virtual_batch_size)
            self._paths = [c.path for c in changes]
            rank_zero_info(format_changes(changes, "GhostBatchNormCallback"))
        layer_sync = getattr(trainer.strategy, "_layer_sync", None)
        if type(layer_sync) is TorchSyncBatchNorm:
            trainer.strategy._layer_sync = _GhostAwareSyncBatchNorm()
            rank_zero_info(
                "GhostBatchNormCallback: sync_batchnorm=True converts the other BatchNorm layers "
                "to SyncBatchNorm; ghost layers keep per-rank virtual batches."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        modules = dict(pl_module.named_modules())
        lost = [p for p in self._paths if not isinstance(modules.get(p), GhostBatchNorm)]
        if lost:
            raise RuntimeError(
                f"Ghost batch norm layers were replaced after setup ({lost[:3]} are now "
                f"{type(modules.get(lost[0])).__name__}), most likely by a custom LayerSync "
                "plugin (sync_batchnorm). Use Lightning's default sync_batchnorm=True or "
                "sync_batchnorm=False with GhostBatchNormCallback."
            )

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not is_logging_step(trainer):
            return
        counts = [
            m.last_num_virtual_batches for m in pl_module.modules() if isinstance(m, GhostBatchNorm)
        ]
        if counts:
            log_scalars(pl_module, {"reg/ghost_bn/num_virtual_batches": float(max(counts))})

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"virtual_batch_size": self.virtual_batch_size}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("virtual_batch_size", self.virtual_batch_size)
        if saved != self.virtual_batch_size:
            rank_zero_warn(
                f"Resuming with GhostBatchNormCallback({self.virtual_batch_size}) from a "
                f"checkpoint trained with virtual_batch_size={saved}."
            )


class PreciseBatchNormCallback(pl.Callback):
    """Recompute exact BatchNorm population statistics before each validation.

    Before every validation during ``fit`` (not the sanity check) and once at the end of
    training if the weights changed since, the running mean and variance of every BatchNorm
    layer are replaced by the exact statistics over ``num_batches`` training batches (see
    :func:`recompute_batch_norm_stats`; the EMA of the last batches lags the weights). The
    batches are drawn from a fresh iterator over the training data loader (under DDP with its
    distributed sampler) and moved to the device as in training, in the training precision
    context. Under DDP the per-rank moments are all-gathered and merged, so every rank gets the
    statistics of the union of what all ranks saw, bit-identical. Works with
    ``sync_batchnorm=True``. Logs ``reg/precise_bn/num_batches`` and
    ``reg/precise_bn/mean_shift`` (mean ``|μ_new − μ_old| / σ_new`` over channels).

    Note: with ``persistent_workers=True`` and validation in the middle of an epoch, iterating
    the training loader again resets the epoch's iterator; validate at epoch ends then.

    Args:
        num_batches: training batches per recompute (>= 1); fewer are used if the loader is
            shorter (with a warning). Under DDP every rank uses the same number.
        input_key: index or key of the model input in list/dict batches.
        forward_fn: ``forward_fn(model, batch)`` for other batch layouts.

    Raises:
        ValueError: if ``num_batches`` is not an integer >= 1.
        RuntimeError: at setup, if the model has no BatchNorm with running statistics; when
            the training loader is not a single iterable or the input cannot be read.

    Example:
        >>> trainer = pl.Trainer(callbacks=[PreciseBatchNormCallback(200)])  # doctest: +SKIP

    Reference:
        Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021 (fvcore ``update_bn_stats``).
    """

    def __init__(
        self,
        num_batches: int = 200,
        *,
        input_key: int | str = 0,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    ) -> None:
        super().__init__()
        self.num_batches = check_int("num_batches", num_batches, minimum=1)
        if isinstance(input_key, bool) or not isinstance(input_key, (int, str)):
            raise TypeError(f"`input_key` must be an int or a str, got {input_key!r}")
        if forward_fn is not None and not callable(forward_fn):
            raise TypeError(f"`forward_fn` must be callable, got {forward_fn!r}")
        self.input_key = input_key
        self.forward_fn = forward_fn
        self.last_step: int | None = None
        self.last_num_batches = 0
        self._warned_short = False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_strategies(
            trainer,
            "PreciseBatchNormCallback",
            ALL_SHARDED,
            "its cross-rank statistics are verified under DDP only",
        )
        if not any(m.track_running_stats for _, m in batch_norm_layers(pl_module)):
            raise RuntimeError(
                "PreciseBatchNormCallback found no BatchNorm layer with running statistics in "
                "the model. Insert some with `lightning_reg.add_batch_norm(model)` or remove "
                "the callback."
            )

    def _batches(self, trainer: pl.Trainer, count: int) -> Any:
        loader = trainer.train_dataloader
        for i, batch in enumerate(loader):
            if i >= count:
                return
            yield trainer.strategy.batch_to_device(batch)

    def _recompute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[int, float]:
        loader = trainer.train_dataloader
        if loader is None:
            raise RuntimeError("PreciseBatchNormCallback needs the training data loader.")
        if isinstance(loader, (Mapping, list, tuple)):
            raise RuntimeError(
                "PreciseBatchNormCallback supports a single training data loader; with several, "
                "pass `forward_fn` and wrap them into one loader."
            )
        if getattr(loader, "persistent_workers", False) and getattr(loader, "num_workers", 0):
            if not self._warned_short:
                rank_zero_warn(
                    "PreciseBatchNormCallback iterates the training loader again; with "
                    "persistent_workers=True, validate only at epoch ends."
                )
        count = self.num_batches
        try:
            count = min(count, len(loader))
        except TypeError:
            pass
        if trainer.world_size > 1:
            t = torch.tensor(float(count), device=pl_module.device)
            count = int(trainer.strategy.reduce(t, reduce_op="min"))
        if count < self.num_batches and not self._warned_short:
            self._warned_short = True
            rank_zero_warn(
                f"PreciseBatchNormCallback(num_batches={self.num_batches}): the training "
                f"loader has only {count} batches per rank; using {count}."
            )
        old = [
            m.running_mean.detach().clone()
            for _, m in batch_norm_layers(pl_module)
            if m.track_running_stats and m.running_mean is not None
        ]

        def gather(packed: torch.Tensor) -> torch.Tensor:
            if trainer.world_size <= 1:
                return packed.unsqueeze(0)
            return trainer.strategy.all_gather(packed).reshape(trainer.world_size, -1)

        with torch.no_grad(), trainer.precision_plugin.train_step_context():
            used = recompute_batch_norm_stats(
                pl_module,
                self._batches(trainer, count),
                count,
                forward_fn=self.forward_fn,
                input_key=self.input_key,
                reduce_fn=gather,
            )
        layers = [
            m
            for _, m in batch_norm_layers(pl_module)
            if m.track_running_stats and m.running_mean is not None
        ]
        shifts = [
            ((m.running_mean - o).abs() / (m.running_var + m.eps).sqrt()).mean()
            for m, o in zip(layers, old)
        ]
        self.last_step = trainer.global_step
        self.last_num_batches = used
        return used, float(torch.stack(shifts).mean())

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        used, shift = self._recompute(trainer, pl_module)
        log_scalars(
            pl_module,
            {"reg/precise_bn/num_batches": float(used), "reg/precise_bn/mean_shift": shift},
            on_step=False,
            on_epoch=True,
        )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.last_step != trainer.global_step:
            self._recompute(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = state_dict.get("last_step")


class BatchNormFreezeCallback(pl.Callback):
    """From epoch ``epoch`` on, keep every BatchNorm layer in eval mode during training.

    Frozen layers normalise with their running statistics and stop updating them (their affine
    parameters still train), a common last phase of fine-tuning. Logs
    ``reg/batch_norm/frozen`` (0 or 1) on logging steps.

    Args:
        epoch: first epoch (0-based) with frozen BatchNorm (>= 0).

    Raises:
        ValueError: if ``epoch`` is not an integer >= 0.
        RuntimeError: at setup, if the model has no BatchNorm.

    Example:
        >>> trainer = pl.Trainer(callbacks=[BatchNormFreezeCallback(10)])  # doctest: +SKIP

    Reference:
        Ioffe & Szegedy, "Batch Normalization", ICML 2015 (inference-mode normalisation).
    """

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = check_int("epoch", epoch, minimum=0)
        self._layers: list[nn.Module] = []

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not batch_norm_layers(pl_module):
            raise RuntimeError("BatchNormFreezeCallback found no BatchNorm layer in the model.")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._layers = [m for _, m in batch_norm_layers(pl_module)]

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        frozen = trainer.current_epoch >= self.epoch
        if frozen:
            for module in self._layers:
                module.training = False
        if is_logging_step(trainer):
            log_scalars(pl_module, {"reg/batch_norm/frozen": float(frozen)})
