"""Ghost batch norm (Hoffer et al. 2017): BatchNorm statistics per virtual batch.

A training batch of ``N`` rows is split into ``n = ceil(N / virtual_batch_size)`` virtual batches
(``torch.tensor_split``: sizes differ by at most one, none exceeds ``virtual_batch_size``), and
each is normalised with its own mean and biased variance. The running statistics are updated as
if ``BatchNorm`` had seen the chunks in turn with momentum ``momentum / n`` (Composer's rule). A
batch of at most ``virtual_batch_size`` rows is plain ``BatchNorm``; eval is ``BatchNorm`` eval.

Pure torch: :func:`ghost_batch_norm`, :class:`GhostBatchNorm1d`/``2d``/``3d``,
:func:`apply_ghost_batch_norm`, :func:`remove_ghost_batch_norm`. Lightning:
:class:`GhostBatchNormCallback` and the :class:`GhostSyncBatchNorm` layer-sync plugin.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import TorchSyncBatchNorm
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_reg.core.logging import is_logging_step, log_scalars
from lightning_reg.core.strategies import ALL_SHARDED, refuse_strategies
from lightning_reg.core.surgery import ModuleChange, format_changes, replace_modules
from lightning_reg.core.validation import check_int, check_positive, check_probability

__all__ = [
    "GhostBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GhostBatchNormCallback",
    "GhostSyncBatchNorm",
    "apply_ghost_batch_norm",
    "ghost_batch_norm",
    "remove_ghost_batch_norm",
    "virtual_batch_sizes",
]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_LAZY_BATCH_NORMS = (nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)
_ONE_CALL_PER_CHUNK = {"cpu"}  # devices where a loop of fused calls beats the side-by-side layout


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
) -> torch.Tensor:
    """Normalise each virtual batch of ``x`` (shape ``(N, C, *S)``) with its own statistics.

    Every virtual batch is normalised as ``F.batch_norm(chunk, training=True)`` does. Given
    running statistics, they are updated as ``BatchNorm`` would after seeing the chunks in turn
    with momentum ``momentum / n_chunks`` (``momentum=None``: the cumulative average over the
    ``num_batches_tracked`` chunks seen before and these).

    One algorithm, laid out for the device. On CPU it is one fused ``F.batch_norm`` per chunk
    (Composer's loop: the CPU kernel's per-call cost is small). On an accelerator the chunks of
    equal size are laid side by side as channels, ``(size, k·C, *S)``, and normalised by one
    fused call; their statistics come back through temporary buffers and update the running
    ones in closed form. On an H200 that is 3.6x the loop (``benchmarks/README.md``).

    Args:
        x: input ``(N, C, *S)``.
        virtual_batch_size: maximum rows per virtual batch (>= 1).
        weight: optional per-channel scale ``(C,)``.
        bias: optional per-channel shift ``(C,)``.
        running_mean: optional buffer ``(C,)``, updated in place.
        running_var: optional buffer ``(C,)``, updated in place.
        momentum: BatchNorm momentum, or ``None`` for the cumulative average.
        eps: added to the variance.
        num_batches_tracked: chunks seen before (used when ``momentum is None``).

    Returns:
        The normalised tensor, same shape and dtype as ``x``.

    Raises:
        ValueError: if ``x`` has fewer than 2 dims, or a virtual batch has a single value per
            channel (its variance is undefined; ``BatchNorm`` refuses it in training too).

    Example:
        >>> y = ghost_batch_norm(torch.randn(8, 3) * 5 + 2, 4)
        >>> bool(y[:4].mean(0).abs().max() < 1e-5)
        True

    Reference:
        Hoffer, Hubara, Soudry, "Train longer, generalize better", NeurIPS 2017.
    """
    if x.ndim < 2:
        raise ValueError(f"ghost_batch_norm needs input (N, C, ...), got shape {tuple(x.shape)}")
    sizes = virtual_batch_sizes(x.shape[0], virtual_batch_size)
    per_row = math.prod(x.shape[2:])
    if min(sizes) * per_row <= 1:
        msg = f"{min(sizes)} row(s) x {per_row} value(s) (input {tuple(x.shape)})"
        raise ValueError(f"Expected more than 1 value per channel in each virtual batch, got {msg}")
    # On CPU each chunk is one fused call and BatchNorm updates the running buffers in turn with
    # momentum / n (Composer's loop). On an accelerator, chunks of equal size go side by side as
    # channels, (size, k·C, *S), through one fused call; temporary buffers (momentum 1) catch
    # their statistics for a closed-form update of the running ones.
    if x.device.type in _ONE_CALL_PER_CHUNK:
        groups = [(size, 1) for size in sizes]
    else:  # tensor_split puts the larger chunks first
        groups = [(size, sizes.count(size)) for size in sorted(set(sizes), reverse=True)]
    direct = len(groups) == len(sizes)
    channels, spatial = x.shape[1], x.shape[2:]
    parts = torch.split(x, [k * size for size, k in groups])  # one backward for all parts
    outs, stats, running = [], [], [running_mean, running_var]
    for i, ((size, k), lanes) in enumerate(zip(groups, parts)):
        if k > 1:
            lanes = lanes.reshape(k, size, channels, *spatial).transpose(0, 1).flatten(1, 2)
        buffers, factor = running, 1.0
        if direct:
            n_seen = num_batches_tracked + i + 1
            factor = 1.0 / n_seen if momentum is None else momentum / len(sizes)
        elif running_mean is not None and running_var is not None:  # in the buffers' dtype
            buffers = [running_mean.new_zeros(k * channels), running_var.new_ones(k * channels)]
            stats.append(buffers)
        affine = [t if t is None or k == 1 else t.repeat(k) for t in (weight, bias)]
        y = F.batch_norm(lanes, *buffers, *affine, True, factor, eps)
        outs.append(y if k == 1 else y.unflatten(1, (k, channels)).transpose(0, 1).flatten(0, 1))
    if stats:
        stats = [torch.stack(b).view(2, -1, channels) for b in stats]
        _update_running_stats_(running, torch.cat(stats, 1), momentum, num_batches_tracked)
    return outs[0] if len(outs) == 1 else torch.cat(outs)


@torch.no_grad()
def _update_running_stats_(
    running: list[Any], stats: torch.Tensor, momentum: float | None, tracked: int
) -> None:
    """BatchNorm's update after seeing ``n`` chunks in turn, in closed form (float32 or wider).

    ``running`` is ``[running_mean, running_var]``, updated in place; ``stats`` is ``(2, n, C)``:
    the chunks' means and unbiased variances. Momentum ``m``:
    ``r ← (1 − m/n)^n·r + Σ_k (m/n)(1 − m/n)^{n−1−k}·s_k``. ``None`` (cumulative average):
    ``r ← (t·r + Σ_k s_k) / (t + n)`` with ``t = tracked``.
    """
    n = stats.shape[1]
    dtype = torch.promote_types(stats.dtype, torch.float32)
    stats = stats.to(dtype)
    old = torch.stack(running).to(dtype)
    if momentum is None:
        new = (old * tracked + stats.sum(1)) / (tracked + n)
    else:
        m = momentum / n
        w = m * (1 - m) ** torch.arange(n - 1, -1, -1, dtype=dtype, device=stats.device)
        new = old * (1 - m) ** n + (w.view(1, n, 1) * stats).sum(1)
    for buffer, value in zip(running, new):
        buffer.copy_(value)


_BATCH_NORM_FORWARD = nn.BatchNorm2d.forward  # every BatchNorm1d/2d/3d shares this forward


class GhostBatchNorm(nn.Module):
    """Batch norm over virtual batches of at most ``virtual_batch_size`` rows.

    The base of :class:`GhostBatchNorm1d`/``2d``/``3d``, which subclass ``nn.BatchNorm1d``/
    ``2d``/``3d``: ``isinstance`` checks, ``state_dict`` keys and checkpoints are those of
    ``BatchNorm`` (weights load both ways). Use ``isinstance(m, GhostBatchNorm)`` to find them.

    In training each virtual batch (:func:`virtual_batch_sizes`) is normalised with its own
    mean and biased variance; the running statistics are updated as if ``BatchNorm`` had seen
    the chunks in turn with momentum ``momentum / n_chunks``, and ``num_batches_tracked`` grows
    by ``n_chunks``. A batch of at most ``virtual_batch_size`` rows is plain ``BatchNorm``; one
    with fewer rows warns once per module (ghost BN does nothing on it; under DDP that is the
    per-rank batch). Eval mode is ``BatchNorm`` eval, bit for bit.

    Args:
        num_features: channels ``C``.
        eps: added to the variance (> 0).
        momentum: running-statistics momentum in [0, 1], or ``None`` (cumulative average).
        affine: learn a per-channel scale and shift.
        track_running_stats: keep running statistics (for eval).
        device: device of the parameters and buffers.
        dtype: dtype of the parameters and buffers.
        virtual_batch_size: rows per virtual batch (>= 1; keyword).
        impl: deprecated and ignored (one implementation since 0.3; it warns).

    Raises:
        ValueError: if ``virtual_batch_size`` is not an integer >= 1, ``eps`` is not > 0 or
            ``momentum`` is not in [0, 1] or ``None``; in training, if a virtual batch holds a
            single value per channel; for an input of the wrong number of dims.
        TypeError: if ``GhostBatchNorm`` itself is instantiated.

    Example:
        >>> bn = GhostBatchNorm2d(8, virtual_batch_size=4)
        >>> bn(torch.randn(16, 8, 5, 5)).shape
        torch.Size([16, 8, 5, 5])

    Reference:
        Hoffer, Hubara, Soudry, "Train longer, generalize better: closing the generalization
        gap in large batch training of neural networks", NeurIPS 2017.
    """

    input_dims: tuple[int, ...] = ()

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
        impl: str | None = None,
    ) -> None:
        if not self.input_dims:
            raise TypeError("Use GhostBatchNorm1d, GhostBatchNorm2d or GhostBatchNorm3d.")
        eps = check_positive("eps", eps)
        if momentum is not None:
            momentum = check_probability("momentum", momentum)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)  # type: ignore[call-arg]
        self.virtual_batch_size = check_int("virtual_batch_size", virtual_batch_size, minimum=1)
        if impl is not None:
            msg = "GhostBatchNorm(impl=...) is deprecated and ignored (there is one implementation)"
            warnings.warn(f"{msg}; it goes in the next release.", DeprecationWarning, stacklevel=2)
        self.last_num_virtual_batches = 0
        self._warned_small_batch = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() not in self.input_dims:
            dims = " or ".join(f"{d}D" for d in self.input_dims)
            raise ValueError(f"expected {dims} input (got {input.dim()}D input)")
        bn: Any = self  # a BatchNormNd (see the subclasses)
        rows, size = input.shape[0], self.virtual_batch_size
        if not (self.training or bn.running_mean is None) or rows <= size:
            if self.training:
                self.last_num_virtual_batches = 1
                if rows < size and not self._warned_small_batch:
                    self._warned_small_batch = True
                    warnings.warn(f"GhostBatchNorm got a training batch of {rows} rows, fewer than "
                                  f"virtual_batch_size={size}: it is plain BatchNorm (under DDP, "
                                  "per rank). Lower virtual_batch_size or raise the batch size.",
                                  stacklevel=2)  # fmt: skip
            return super().forward(input)  # type: ignore[misc]
        update = self.training and bn.track_running_stats and bn.running_mean is not None
        if self.training:
            self.last_num_virtual_batches = math.ceil(rows / size)
        tracked = int(bn.num_batches_tracked) if update and bn.momentum is None else 0
        stats = (bn.running_mean, bn.running_var) if update else (None, None)
        y = ghost_batch_norm(input, size, bn.weight, bn.bias, *stats, bn.momentum, bn.eps, tracked)
        if update:
            bn.num_batches_tracked.add_(self.last_num_virtual_batches)
        return y

    @staticmethod
    def from_batch_norm(bn: nn.Module, virtual_batch_size: int) -> GhostBatchNorm:
        """A ghost BN of the matching dimension sharing ``bn``'s parameters and buffers.

        Raises:
            TypeError: if ``bn`` is not an ``nn.BatchNorm1d``/``2d``/``3d``.
        """
        target = next((g for b, g in _GHOST_OF.items() if isinstance(bn, b)), None)
        if target is None:
            raise TypeError(f"No ghost batch norm for {type(bn).__name__}; use BatchNorm1d/2d/3d")
        return _sharing_state(bn, target, virtual_batch_size=virtual_batch_size)

    def to_batch_norm(self) -> nn.Module:
        """The plain ``nn.BatchNormNd`` with the same parameters and buffers (shared)."""
        return _sharing_state(self, next(b for b in _BATCH_NORMS if isinstance(self, b)))


def _sharing_state(src: Any, cls: type[Any], **kwargs: Any) -> Any:
    """A ``cls`` configured as ``src``, sharing its very parameters and buffers (for optimizers)."""
    args = (src.num_features, src.eps, src.momentum, src.affine, src.track_running_stats)
    dst = cls(*args, device="meta", **kwargs)
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        setattr(dst, name, getattr(src, name))
    return dst.train(src.training)


class GhostBatchNorm1d(GhostBatchNorm, nn.BatchNorm1d):
    """:class:`GhostBatchNorm` for ``(N, C)`` or ``(N, C, L)`` input; an ``nn.BatchNorm1d``.

    Example:
        >>> GhostBatchNorm1d(4, virtual_batch_size=2)(torch.randn(8, 4)).shape
        torch.Size([8, 4])
    """

    input_dims = (2, 3)


class GhostBatchNorm2d(GhostBatchNorm, nn.BatchNorm2d):
    """:class:`GhostBatchNorm` for ``(N, C, H, W)`` input; an ``nn.BatchNorm2d``.

    Example:
        >>> GhostBatchNorm2d(4, virtual_batch_size=2)(torch.randn(8, 4, 5, 5)).shape
        torch.Size([8, 4, 5, 5])
    """

    input_dims = (4,)


class GhostBatchNorm3d(GhostBatchNorm, nn.BatchNorm3d):
    """:class:`GhostBatchNorm` for ``(N, C, D, H, W)`` input; an ``nn.BatchNorm3d``.

    Example:
        >>> GhostBatchNorm3d(4, virtual_batch_size=2)(torch.randn(8, 4, 2, 3, 3)).shape
        torch.Size([8, 4, 2, 3, 3])
    """

    input_dims = (5,)


_GHOST_OF = dict(zip(_BATCH_NORMS, (GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d)))


def apply_ghost_batch_norm(model: nn.Module, virtual_batch_size: int) -> list[ModuleChange]:
    """Replace every ``nn.BatchNorm1d``/``2d``/``3d`` by its ghost version (in place).

    The ghost layers share the original parameters and buffers, so ``state_dict`` keys and
    values are unchanged and an optimizer created before still works. Subclasses with their own
    ``forward`` (timm's ``BatchNormAct2d``) are left alone. Forward hooks registered on the
    replaced modules are not carried over.

    Args:
        model: the model to change.
        virtual_batch_size: rows per virtual batch (>= 1).

    Returns:
        The list of changes.

    Raises:
        ValueError: if ``virtual_batch_size`` is not an integer >= 1.
        RuntimeError: if the model already has ghost batch norm, has lazy (uninitialised)
            BatchNorm, or has no BatchNorm1d/2d/3d (the message says what it has instead).

    Example:
        >>> m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> apply_ghost_batch_norm(m, 8)[0].new_type
        'GhostBatchNorm2d'
    """
    virtual_batch_size = check_int("virtual_batch_size", virtual_batch_size, minimum=1)

    def convert(module: nn.Module, path: str) -> nn.Module | None:
        if type(module).forward is not _BATCH_NORM_FORWARD:  # its own forward: left alone
            return None
        return GhostBatchNorm.from_batch_norm(module, virtual_batch_size)

    lazy = [n for n, m in model.named_modules() if isinstance(m, _LAZY_BATCH_NORMS)]
    policy = dict.fromkeys(_BATCH_NORMS, convert)
    changes = [] if lazy else replace_modules(model, policy, refuse_if_contains=(GhostBatchNorm,))
    if changes:
        return changes
    sync = [n for n, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)]
    if lazy:
        why = (
            f"the BatchNorm layers {lazy[:3]} are lazy and not initialised yet. Run one "
            "forward pass on a sample batch first (they then become nn.BatchNormNd)"
        )
    elif sync:
        why = (
            f"the BatchNorm layers {sync[:3]} are SyncBatchNorm (one batch over all ranks, "
            "the opposite of per-rank virtual batches). Build the model with nn.BatchNormNd "
            "and pass Trainer(plugins=[lightning_reg.GhostSyncBatchNorm()]) to sync the rest"
        )
    else:
        why = (
            f"found no nn.BatchNorm1d/2d/3d layer (the model has: "
            f"{sorted({type(m).__name__ for m in model.modules()})}). Insert some with "
            "lightning_reg.add_batch_norm(model)"
        )
    raise RuntimeError(f"Ghost batch norm cannot be applied: {why}.")


def remove_ghost_batch_norm(model: nn.Module) -> list[ModuleChange]:
    """Replace every ghost batch norm by the plain ``nn.BatchNormNd`` sharing its state.

    Example:
        >>> m = nn.Sequential(nn.BatchNorm1d(4))
        >>> _ = apply_ghost_batch_norm(m, 2)
        >>> remove_ghost_batch_norm(m)[0].new_type
        'BatchNorm1d'
    """
    return replace_modules(model, {GhostBatchNorm: lambda m, path: m.to_batch_norm()})


class GhostSyncBatchNorm(TorchSyncBatchNorm):
    """Lightning's ``sync_batchnorm`` for models with ghost batch norm (a ``LayerSync`` plugin).

    Converts every plain ``BatchNorm`` layer to ``nn.SyncBatchNorm``, as Lightning's
    ``TorchSyncBatchNorm`` does, but leaves ghost batch norm per rank: a ghost layer normalises
    each per-rank virtual batch with its own statistics, the opposite of one global batch.
    ``Trainer(sync_batchnorm=True)`` alone would convert the ghost layers too, and
    :class:`GhostBatchNormCallback` refuses that at fit start.

    Example:
        >>> trainer = pl.Trainer(plugins=[GhostSyncBatchNorm()])  # doctest: +SKIP
    """

    @override
    def apply(self, model: nn.Module) -> nn.Module:
        sync = nn.SyncBatchNorm.convert_sync_batchnorm
        # The first matching type decides: ghost layers stay, with per-rank virtual batches.
        keep_ghost = {GhostBatchNorm: lambda m, p: None}
        replace_modules(model, {**keep_ghost, **dict.fromkeys(_BATCH_NORMS, lambda m, p: sync(m))})
        return model


class GhostBatchNormCallback(pl.Callback):
    """Swap every ``nn.BatchNorm1d/2d/3d`` for ghost batch norm, in ``setup``.

    The surgery runs in ``Callback.setup`` (before checkpoint restore, DDP and the optimizers)
    and once per model, so ``fit`` then ``validate`` does not wrap twice; the change table is
    logged once at rank zero. The callback keeps the ghost modules themselves (not their paths),
    so later surgery that wraps their blocks (stochastic depth) is fine, in any callback order.
    The model keeps its ghost layers afterwards (eval and ``state_dict`` are those of
    BatchNorm); :func:`remove_ghost_batch_norm` gives plain BatchNorm back. Logs
    ``reg/ghost_bn/num_virtual_batches`` on logging steps.

    ``Trainer(sync_batchnorm=True)`` would turn the ghost layers into SyncBatchNorm and undo
    ghost BN: pass ``Trainer(plugins=[GhostSyncBatchNorm()])`` instead.

    Args:
        virtual_batch_size: rows per virtual batch, per rank (>= 1).

    Raises:
        ValueError: if ``virtual_batch_size`` is not an integer >= 1.
        RuntimeError: at setup, if the model has no BatchNorm to replace (the message says why:
            lazy layers, SyncBatchNorm, none at all) or already has ghost batch norm with
            another virtual batch size; at fit start, if the ghost layers were replaced after
            setup (``sync_batchnorm=True``).

    Example:
        >>> trainer = pl.Trainer(callbacks=[GhostBatchNormCallback(32)])  # doctest: +SKIP

    Reference:
        Hoffer, Hubara, Soudry, "Train longer, generalize better", NeurIPS 2017.
    """

    def __init__(self, virtual_batch_size: int) -> None:
        super().__init__()
        self.virtual_batch_size = check_int("virtual_batch_size", virtual_batch_size, minimum=1)
        self._ghosts: list[GhostBatchNorm] = []

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_strategies(trainer, "GhostBatchNormCallback", ALL_SHARDED, "verified under DDP only")
        if not any(isinstance(m, GhostBatchNorm) for m in pl_module.modules()):
            changes = apply_ghost_batch_norm(pl_module, self.virtual_batch_size)
            rank_zero_info(format_changes(changes, "GhostBatchNormCallback"))
        self._ghosts = [m for m in pl_module.modules() if isinstance(m, GhostBatchNorm)]
        sizes = {m.virtual_batch_size for m in self._ghosts}
        if sizes != {self.virtual_batch_size}:
            raise RuntimeError(
                f"The model already has ghost batch norm with virtual_batch_size={sorted(sizes)}, "
                f"but GhostBatchNormCallback({self.virtual_batch_size}) was given. Call "
                "remove_ghost_batch_norm(model) first or use one virtual batch size."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        present = {id(m) for m in pl_module.modules()}
        lost = sum(id(g) not in present for g in self._ghosts)
        if lost and any(isinstance(m, nn.SyncBatchNorm) for m in pl_module.modules()):
            raise RuntimeError(
                f"Trainer(sync_batchnorm=True) turned {lost} ghost batch norm layer(s) into "
                "SyncBatchNorm, which normalises one batch over all ranks and undoes ghost batch "
                "norm. Drop sync_batchnorm=True and pass Trainer(plugins=[lightning_reg."
                "GhostSyncBatchNorm()]): it syncs the other BatchNorm layers, ghost ones per rank."
            )
        if lost:
            raise RuntimeError(
                f"{lost} ghost batch norm layer(s) were removed from the model after "
                "GhostBatchNormCallback.setup. Run surgery that replaces BatchNorm before it."
            )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        if self._ghosts and is_logging_step(trainer):
            count = max(m.last_num_virtual_batches for m in self._ghosts)
            log_scalars(pl_module, {"reg/ghost_bn/num_virtual_batches": float(count)})
