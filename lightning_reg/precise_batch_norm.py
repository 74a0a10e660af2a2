"""Precise BatchNorm statistics (fvcore's ``update_bn_stats``; Wu & Johnson 2021).

The running EMA of the last batches lags the weights. Precise BN replaces it by the exact
population statistics of the training-mode activations over ``num_batches`` batches:
``μ = E[x]`` and the unbiased ``σ² = N/(N−1)·(E[x²] − E[x]²)`` per channel (the convention of
``BatchNorm.running_var``), merged from per-batch ``(count, mean, M2)`` with Chan's rule in
float64. Under DDP the per-rank ``(count, mean, M2)`` are all-gathered and merged the same way,
so every rank ends with the statistics of the union of the data.

Pure torch: :func:`merge_moments`, :func:`recompute_batch_norm_stats`. Lightning:
:class:`PreciseBatchNormCallback`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_reg.core.logging import log_scalars
from lightning_reg.core.strategies import ALL_SHARDED, refuse_strategies
from lightning_reg.core.surgery import training_flags_restored
from lightning_reg.core.validation import check_int

__all__ = [
    "PreciseBatchNormCallback",
    "batch_norm_layers",
    "merge_moments",
    "recompute_batch_norm_stats",
]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_LAZY_BATCH_NORMS = (nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)
_BATCH_NORM_FORWARD = nn.BatchNorm2d.forward  # every BatchNorm1d/2d/3d shares this forward

Moments = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def batch_norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every BatchNorm layer of ``model`` that keeps running statistics (``(path, module)``).

    BatchNorm1d/2d/3d and their subclasses (ghost BN, initialised lazy BN) and SyncBatchNorm.

    Example:
        >>> [p for p, _ in batch_norm_layers(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))]
        ['1']
    """
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, _BATCH_NORMS) and m.track_running_stats and m.running_mean is not None
    ]


def merge_moments(counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor) -> Moments:
    """Merge ``R`` sets of per-channel moments into one, exactly (Chan et al.'s rule).

    ``N = Σ n_r``, ``μ = Σ n_r μ_r / N``, ``M2 = Σ M2_r + Σ n_r (μ_r − μ)²``, where ``M2`` is the
    sum of squared deviations from the mean. Sets with ``n_r = 0`` contribute nothing.

    Args:
        counts: ``(R,)`` values per channel in each set.
        means: ``(R, C)`` per-channel means.
        m2s: ``(R, C)`` per-channel sums of squared deviations.

    Returns:
        ``(count, mean, m2)`` of the union: a scalar and two ``(C,)`` tensors.

    Example:
        >>> # [1, 2] (mean 1.5, M2 0.5) merged with [4] (mean 4, M2 0): the moments of [1, 2, 4]
        >>> n, mean, m2 = merge_moments(torch.tensor([2.0, 1.0]), torch.tensor([[1.5], [4.0]]),
        ...                             torch.tensor([[0.5], [0.0]]))
        >>> round(float(mean), 4), round(float(m2 / (n - 1)), 4)  # torch.tensor([1., 2, 4]).var()
        (2.3333, 2.3333)

    Reference:
        Chan, Golub, LeVeque, "Updating formulae and a pairwise algorithm for computing sample
        variances", 1979.
    """
    total = counts.sum()
    weights = counts.unsqueeze(1)
    mean = (weights * means).sum(0) / total.clamp_min(1)
    return total, mean, m2s.sum(0) + (weights * (means - mean) ** 2).sum(0)


def _model_input(batch: Any, input_key: int | str) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch
    try:
        return batch[input_key]
    except (KeyError, IndexError, TypeError) as err:
        raise RuntimeError(
            f"Precise BN could not read input_key={input_key!r} from a training batch of type "
            f"{type(batch).__name__}. Set `input_key`, or pass `forward_fn(model, batch)`."
        ) from err


def _row(n: int, mean: torch.Tensor, m2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[count, mean..., M2...]`` in ``dtype``: one batch's (or one process's) moments."""
    return torch.cat([mean.new_full((1,), n), mean, m2]).to(dtype)


def _merge_rows(rows: torch.Tensor) -> Moments:
    c = (rows.shape[1] - 1) // 2
    return merge_moments(rows[:, 0], rows[:, 1 : 1 + c], rows[:, 1 + c :])


@torch.no_grad()
def recompute_batch_norm_stats(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int,
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    input_key: int | str = 0,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> int:
    """Set every BatchNorm's running statistics to the exact population statistics.

    Runs up to ``num_batches`` batches through ``model`` with the BatchNorm layers in training
    mode (they normalise with batch statistics, as in training) and every other module in eval
    mode (dropout off: the statistics are those the eval-time network sees). Hooks record each
    BatchNorm input's exact per-channel moments; the running mean/var become ``E[x]`` and the
    unbiased variance. Training flags, ``momentum``, ``num_batches_tracked`` and every other
    buffer are left as found. A layer that no batch reaches (an auxiliary head, an EMA teacher)
    keeps its statistics, with one warning that names it.

    Args:
        model: the network.
        batches: an iterable of batches, on the model's device and in its precision.
        num_batches: how many batches to use at most (>= 1).
        forward_fn: ``forward_fn(model, batch)``; default ``model(batch[input_key])`` (or
            ``model(batch)`` for a tensor batch).
        input_key: index or key of the input in list/dict batches.
        reduce_fn: optional ``fn(packed (L,)) -> gathered (R, L)`` across processes; the
            per-process moments are merged in rank order, so all processes get equal results.

    Returns:
        The number of batches used on this process.

    Raises:
        ValueError: if ``num_batches`` is not an integer >= 1.
        RuntimeError: if the model has no BatchNorm with running statistics, no batch came, or
            the input cannot be read from a batch.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> recompute_batch_norm_stats(net, [torch.randn(8, 3) for _ in range(5)], 3)
        3

    Reference:
        Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021 (fvcore ``update_bn_stats``).
    """
    num_batches = check_int("num_batches", num_batches, minimum=1)
    named = batch_norm_layers(model)
    if not named:
        raise RuntimeError("Precise BN found no BatchNorm layer with running statistics.")
    layers = [m for _, m in named]
    device = layers[0].running_mean.device
    dtype = torch.float32 if device.type == "mps" else torch.float64
    # A plain fp32/fp64 BatchNorm computes the batch statistics anyway: with momentum 1 its
    # buffers hold the batch mean and unbiased variance after each forward, read by a post-hook
    # (no second pass). Other layers (ghost, SyncBatchNorm, custom, fp16/bf16 buffers) get their
    # input's moments from a pre-hook, and normalise with batch statistics, buffers untouched.
    fast = [
        type(m).forward is _BATCH_NORM_FORWARD
        and m.running_mean.dtype in (torch.float32, torch.float64)
        for m in layers
    ]
    records: list[list[torch.Tensor]] = [[] for _ in layers]

    def pre_hook(rec: list[torch.Tensor]) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            var, mean = torch.var_mean(x, dim=[0, *range(2, x.ndim)], correction=0)
            n = x.numel() // x.shape[1]
            rec.append(_row(n, mean, var * n, dtype))

        return hook

    def post_hook(rec: list[torch.Tensor]) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            n = args[0].numel() // args[0].shape[1]
            rec.append(_row(n, module.running_mean, module.running_var * (n - 1), dtype))

        return hook

    saved = [(m.track_running_stats, m.momentum, [b.clone() for b in m.buffers()]) for m in layers]
    handles = [
        m.register_forward_hook(post_hook(r)) if f else m.register_forward_pre_hook(pre_hook(r))
        for m, r, f in zip(layers, records, fast)
    ]
    used = 0
    try:
        with training_flags_restored(model) as modules:
            bn_ids = {id(m) for m in layers}
            for module in modules:
                module.training = id(module) in bn_ids
            for module, is_fast in zip(layers, fast):
                module.momentum = 1.0 if is_fast else module.momentum
                module.track_running_stats = is_fast
            for batch in batches:
                if forward_fn is None:
                    model(_model_input(batch, input_key))
                else:
                    forward_fn(model, batch)
                used += 1
                if used >= num_batches:
                    break
    finally:
        for handle in handles:
            handle.remove()
        for module, (track, momentum, buffers) in zip(layers, saved):
            module.track_running_stats, module.momentum = track, momentum
            for buf, old in zip(module.buffers(), buffers):
                buf.copy_(old)
    if used == 0:
        raise RuntimeError("Precise BN got no batch: the training data loader is empty.")
    local = []
    for m, rec in zip(layers, records):
        if rec:
            local.append(torch.cat([t.reshape(-1) for t in _merge_rows(torch.stack(rec))]))
        else:  # no batch reached this layer here; maybe on another process
            local.append(torch.zeros(1 + 2 * m.running_mean.numel(), dtype=dtype, device=device))
    flat = torch.cat(local)
    rows = flat.unsqueeze(0) if reduce_fn is None else reduce_fn(flat).to(dtype)
    skipped, offset = [], 0
    for (path, m), part in zip(named, local):
        n, mean, m2 = _merge_rows(rows[:, offset : offset + part.numel()])
        offset += part.numel()
        if n == 0:
            skipped.append(path)
        else:
            m.running_mean.copy_(mean)
            m.running_var.copy_(m2 / (n - 1).clamp_min(1))
    if skipped:
        warnings.warn(
            f"Precise BN: no batch reached the BatchNorm layer(s) {skipped} in forward (an "
            "auxiliary head or a teacher model?); their running statistics are left unchanged.",
            stacklevel=2,
        )
    return used


class PreciseBatchNormCallback(pl.Callback):
    """Recompute exact BatchNorm population statistics before each validation.

    Before every validation during ``fit`` (not the sanity check), and once at the end of
    training if the weights changed since, the running mean and variance of every BatchNorm
    layer are replaced by the exact statistics over ``num_batches`` training batches (see
    :func:`recompute_batch_norm_stats`). The batches come from a fresh iterator over the
    training data loader (under DDP with its distributed sampler) and take the training path:
    the precision plugin's ``convert_input``, ``on_before_batch_transfer`` and the strategy's
    ``batch_to_device``, then a forward in the training precision context. Under DDP the
    per-rank moments are all-gathered and merged, so every rank gets the statistics of the
    union of what all ranks saw, bit-identical. Works with ``sync_batchnorm=True`` and with lazy
    BatchNorm (initialised by the first training step). Logs ``reg/precise_bn/num_batches`` and
    ``reg/precise_bn/mean_shift`` (mean ``|μ_new − μ_old| / σ_new`` over channels and layers).

    With ``persistent_workers=True`` and validation in the middle of an epoch, iterating the
    training loader again resets that epoch's iterator; validate at epoch ends then (this
    callback does not check it).

    Args:
        num_batches: training batches per recompute (>= 1); fewer are used if the loader is
            shorter (with a warning). Under DDP every rank uses the same number.
        input_key: index or key of the model input in list/dict batches.
        forward_fn: ``forward_fn(model, batch)`` for other batch layouts.

    Raises:
        ValueError: if ``num_batches`` is not an integer >= 1.
        TypeError: if ``input_key`` is not an int or str, or ``forward_fn`` is not callable.
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
        self._warned = False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_strategies(trainer, "PreciseBatchNormCallback", ALL_SHARDED, "checked on DDP only")
        lazy = any(isinstance(m, _LAZY_BATCH_NORMS) for m in pl_module.modules())
        if not lazy and not batch_norm_layers(pl_module):
            found = sorted({type(m).__name__ for m in pl_module.modules()})
            raise RuntimeError(
                "PreciseBatchNormCallback found no BatchNorm layer with running statistics in "
                f"the model (it has: {found}). Insert some with "
                "`lightning_reg.add_batch_norm(model)` or remove the callback."
            )

    def _batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterable[Any]:
        for batch in trainer.train_dataloader:  # type: ignore[union-attr]
            batch = trainer.precision_plugin.convert_input(batch)
            batch = pl_module.on_before_batch_transfer(batch, 0)
            yield trainer.strategy.batch_to_device(batch)

    def _recompute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[int, Any]:
        loader = trainer.train_dataloader
        if loader is None or isinstance(loader, (Mapping, list, tuple)):
            raise RuntimeError(
                "PreciseBatchNormCallback needs a single training data loader; with several, "
                "wrap them into one loader and pass `forward_fn`."
            )
        count = self.num_batches
        with contextlib.suppress(TypeError):  # an iterable dataset may have no length
            count = min(count, len(loader))
        if trainer.world_size > 1:
            t = torch.tensor(float(count), device=pl_module.device)
            count = int(trainer.strategy.reduce(t, reduce_op="min"))
        if count < self.num_batches and not self._warned:
            self._warned = True
            rank_zero_warn(
                f"PreciseBatchNormCallback(num_batches={self.num_batches}): the training "
                f"loader has only {count} batches per rank; using {count}."
            )
        layers = [m for _, m in batch_norm_layers(pl_module)]
        old = [m.running_mean.clone() for m in layers]

        def gather(packed: torch.Tensor) -> torch.Tensor:
            return trainer.strategy.all_gather(packed).reshape(-1, packed.numel())

        with trainer.precision_plugin.train_step_context():
            used = recompute_batch_norm_stats(
                pl_module,
                self._batches(trainer, pl_module),
                count,
                forward_fn=self.forward_fn,
                input_key=self.input_key,
                reduce_fn=gather if trainer.world_size > 1 else None,
            )
        shift = torch.stack([
            ((m.running_mean - o).abs() / (m.running_var + m.eps).sqrt()).float().mean()
            for m, o in zip(layers, old)
        ]).mean()  # fmt: skip
        self.last_step = trainer.global_step
        self.last_num_batches = used
        return used, shift

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
