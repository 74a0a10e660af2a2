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

import warnings
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from itertools import islice
from operator import length_hint
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
_FORWARD = nn.BatchNorm2d.forward  # shared by every BatchNorm1d/2d/3d without its own
Moments = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def batch_norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every BatchNorm layer of ``model`` that keeps running statistics (``(path, module)``).

    BatchNorm1d/2d/3d and their subclasses (ghost BN, initialised lazy BN) and SyncBatchNorm.

    Example:
        >>> [p for p, _ in batch_norm_layers(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))]
        ['1']
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _BATCH_NORMS)]
    return [(n, m) for n, m in layers if m.track_running_stats and m.running_mean is not None]


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
    weights = counts.unsqueeze(1)
    mean = (weights * means).sum(0) / counts.sum().clamp_min(1)
    return counts.sum(), mean, m2s.sum(0) + (weights * (means - mean) ** 2).sum(0)


def _merge_rows(rows: torch.Tensor) -> torch.Tensor:
    """Merge packed moments ``[count, mean..., M2...]``, ``(R, 1 + 2C)``, into one such row."""
    c = (rows.shape[1] - 1) // 2
    n, mean, m2 = merge_moments(rows[:, 0], rows[:, 1 : 1 + c], rows[:, 1 + c :])
    return torch.cat([n.view(1), mean, m2])


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
        reduce_fn: optional ``fn(packed (L,))`` returning every process's ``packed``, as
            ``(R, L)`` or flat (``trainer.strategy.all_gather`` fits); the per-process moments
            are merged in rank order, so all processes get equal results.

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
    dtype = torch.float32 if layers[0].running_mean.device.type == "mps" else torch.float64
    # Each layer's packed moments [count, mean..., M2...], one row per forward, after a zero row
    # (no data), so that a layer no batch reaches merges to count 0.
    seen = [[m.running_mean.new_zeros(1 + 2 * m.num_features, dtype=dtype)] for m in layers]

    def record(rec: list[torch.Tensor], module: Any, args: Any, out: Any) -> None:
        x = args[0]
        if module.track_running_stats:  # a fast layer: its buffers hold the batch statistics
            var, mean = module.running_var, module.running_mean
        else:
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            var, mean = torch.var_mean(x, dim=[0, *range(2, x.ndim)])
        n = x.numel() // x.shape[1]
        rec.append(torch.cat([mean.new_full((1,), n), mean, var * (n - 1)]).to(dtype))

    saved = [(m.track_running_stats, m.momentum, [b.clone() for b in m.buffers()]) for m in layers]
    handles = [m.register_forward_hook(partial(record, s)) for m, s in zip(layers, seen)]
    forward = forward_fn or (lambda m, batch: m(_model_input(batch, input_key)))
    used = 0
    try:
        with training_flags_restored(model):
            model.eval()
            # A plain fp32/fp64 BatchNorm computes the batch statistics anyway: with momentum 1
            # its buffers hold the batch mean and unbiased variance after each forward (no second
            # pass). Other layers (ghost, SyncBatchNorm, custom, fp16/bf16 buffers) normalise with
            # batch statistics, buffers untouched, and the hook computes their input's moments.
            for m in layers:
                fast = type(m).forward is _FORWARD and m.running_mean.dtype.itemsize >= 4
                m.training, m.track_running_stats, m.momentum = True, fast, 1.0
            for batch in islice(batches, num_batches):  # no batch is loaded beyond num_batches
                forward(model, batch)
                used += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, (track, momentum, buffers) in zip(layers, saved):
            module.track_running_stats, module.momentum = track, momentum
            for buf, old in zip(module.buffers(), buffers):
                buf.copy_(old)
    if used == 0:
        raise RuntimeError("Precise BN got no batch: the training data loader is empty.")
    flat = torch.cat([_merge_rows(torch.stack(rec)) for rec in seen])
    rows = (flat if reduce_fn is None else reduce_fn(flat)).reshape(-1, len(flat)).to(dtype)
    skipped = []
    for (path, m), block in zip(named, rows.split([len(s[0]) for s in seen], dim=1)):
        n, mean, m2 = _merge_rows(block).split([1, m.num_features, m.num_features])
        if n == 0:  # no batch reached this layer on any process
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


def _model_input(batch: Any, input_key: int | str) -> Any:
    try:
        return batch if isinstance(batch, torch.Tensor) else batch[input_key]
    except (KeyError, IndexError, TypeError) as err:
        raise RuntimeError(
            f"Precise BN could not read input_key={input_key!r} from a training batch of type "
            f"{type(batch).__name__}. Set `input_key`, or pass `forward_fn(model, batch)`."
        ) from err


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
                "PreciseBatchNormCallback found no BatchNorm layer with running statistics (the "
                f"model has: {found}). Insert some with `lightning_reg.add_batch_norm(model)`."
            )

    def _recompute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[int, Any]:
        loader = trainer.train_dataloader
        if loader is None or isinstance(loader, (Mapping, list, tuple)):
            raise RuntimeError(
                "PreciseBatchNormCallback needs a single training data loader; with several, "
                "wrap them into one loader and pass `forward_fn`."
            )
        count = min(self.num_batches, length_hint(loader, self.num_batches))  # len() may fail
        t = torch.tensor(float(count), device=pl_module.device)
        count = int(trainer.strategy.reduce(t, reduce_op="min"))  # the same on every rank
        if count < self.num_batches and not self._warned:
            self._warned = True
            msg = f"only {count} batches per rank, fewer than num_batches={self.num_batches}"
            rank_zero_warn(f"PreciseBatchNormCallback: the training loader has {msg}; using all.")
        old = {m: m.running_mean.clone() for _, m in batch_norm_layers(pl_module)}
        gather = trainer.strategy.all_gather  # per-rank moments, merged on every rank
        options = {"forward_fn": self.forward_fn, "input_key": self.input_key, "reduce_fn": gather}
        convert, before = trainer.precision_plugin.convert_input, pl_module.on_before_batch_transfer
        batches = (trainer.strategy.batch_to_device(before(convert(b), 0)) for b in loader)
        with trainer.precision_plugin.train_step_context():  # batches take the training path
            used = recompute_batch_norm_stats(pl_module, batches, count, **options)
        shift = torch.stack([
            ((m.running_mean - o).abs() / (m.running_var + m.eps).sqrt()).float().mean()
            for m, o in old.items()
        ]).mean()  # fmt: skip
        self.last_step, self.last_num_batches = trainer.global_step, used
        return used, shift

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        used, shift = self._recompute(trainer, pl_module)
        values = {"reg/precise_bn/num_batches": float(used), "reg/precise_bn/mean_shift": shift}
        log_scalars(pl_module, values, on_step=False, on_epoch=True)

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
