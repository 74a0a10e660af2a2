"""Stochastic depth (Huang et al. 2016): drop whole residual blocks during training.

Block ``l`` of ``L`` (1-based, in depth order) survives a training step with probability
``p_l = 1 - (l / L) * (1 - p_L)`` (``schedule="linear"``) or ``p_L`` (``"uniform"``). The
wrapper around a shape-preserving block ``f`` computes

* dropped: ``x`` -- the block is **not computed** (no forward, no backward, no activations);
* kept: ``x + (f(x) - x) / p`` -- inverted scaling, so the training output is unbiased;
* eval: ``f(x)`` exactly, bit for bit the output of the unwrapped block.

``mode="batch"`` draws one decision per block and step; ``mode="row"`` draws one per sample and
runs the block only on the kept rows (``index_select``, then ``index_put`` back).

Unlike torchvision's ``StochasticDepth`` and timm's ``DropPath`` (which compute the block and
multiply it by a mask), a dropped block costs nothing. It still runs under plain
``strategy="ddp"`` (``find_unused_parameters=False``): a dropped block passes ``x`` through a tiny
autograd function that takes the block's parameters and gives them an exact zero gradient, so
every parameter is in the graph on every rank (the same zero gradient that mask-multiply
produces). :class:`StochasticDepthCallback` also draws the batch-mode decisions from a generator
that is identical on all ranks, so all ranks skip the same blocks and none waits for another.
See ``docs/stochastic-depth.md``.

The pure functions come first (no Lightning needed); :class:`StochasticDepthCallback` is below.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_reg.core.logging import is_logging_step, log_scalars
from lightning_reg.core.strategies import ALL_SHARDED, refuse_strategies
from lightning_reg.core.surgery import (
    ModuleChange,
    SurgeryWrapper,
    format_changes,
    hide_wrapper_level,
    replace_modules,
    restore_modules,
)
from lightning_reg.core.validation import check_choice, check_int, check_probability

__all__ = [
    "StochasticDepthCallback",
    "StochasticDepthWrapper",
    "apply_stochastic_depth",
    "default_block_types",
    "expected_depth",
    "remove_stochastic_depth",
    "sample_keep",
    "stochastic_depth",
    "survival_probabilities",
]

_MODES = ("batch", "row")
_SCHEDULES = ("linear", "uniform")
_LOG_PREFIX = "reg/stochastic_depth"


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


def survival_probabilities(
    num_blocks: int, survival_prob_last: float, schedule: str = "linear"
) -> list[float]:
    """The survival probability of each of ``num_blocks`` blocks, in depth order.

    ``"linear"``: ``p_l = 1 - (l / L) * (1 - p_L)`` for ``l = 1..L`` (Huang et al. 2016), so the
    last block has ``p_L`` and the first ``1 - (1 - p_L) / L``. ``"uniform"``: ``p_l = p_L``.

    Raises:
        ValueError: if ``num_blocks < 1``, ``survival_prob_last`` is outside ``(0, 1]`` or
            ``schedule`` is unknown.

    Example:
        >>> survival_probabilities(4, 0.5)
        [0.875, 0.75, 0.625, 0.5]
    """
    num_blocks = check_int("num_blocks", num_blocks, minimum=1)
    p_last = check_probability("survival_prob_last", survival_prob_last, allow_zero=False)
    check_choice("schedule", schedule, _SCHEDULES)
    if schedule == "uniform":
        return [p_last] * num_blocks
    return [1.0 - (k / num_blocks) * (1.0 - p_last) for k in range(1, num_blocks + 1)]


def sample_keep(
    survival_prob: float,
    batch_size: int | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw keep decisions: a CPU bool tensor of shape ``()`` (batch mode) or ``(batch_size,)``.

    The decisions live on the host on purpose: whether a block runs is a Python-level choice,
    and a host tensor gives it without a device synchronisation. ``generator`` is a CPU
    ``torch.Generator`` (``None``: torch's global CPU RNG, seeded by ``seed_everything``).
    """
    shape = () if batch_size is None else (batch_size,)
    return torch.rand(shape, generator=generator) < survival_prob


class _TouchParams(torch.autograd.Function):
    """``x -> copy of x`` whose backward passes the gradient through and gives each parameter an
    exact zero gradient, without computing anything. It keeps a skipped block's parameters in
    the autograd graph, so DDP's reducer (``find_unused_parameters=False``) sees all of them."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.param_meta = [(p.shape, p.dtype, p.device) for p in params]
        # A copy, not a view: autograd forbids in-place ops on views returned by a Function,
        # and the next layer may well do ``relu_()`` on it.
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        zero: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        grads = []
        for shape, dtype, device in ctx.param_meta:
            if (dtype, device) not in zero:
                zero[dtype, device] = torch.zeros((), dtype=dtype, device=device)
            grads.append(zero[dtype, device].expand(shape))
        return (grad, *grads)


def _skip(x: torch.Tensor, block: Any) -> torch.Tensor:
    """The output of a dropped block: ``x``, with the block's trainable parameters kept in the
    autograd graph at no compute (they get an exact zero gradient)."""
    if not torch.is_grad_enabled() or not isinstance(block, nn.Module):
        return x
    params = [p for p in block.parameters() if p.requires_grad]
    if not params:
        return x
    return _TouchParams.apply(x, *params)


def _select_rows(value: Any, idx: torch.Tensor, dim: int) -> Any:
    return value.index_select(dim, idx) if isinstance(value, torch.Tensor) else value


def stochastic_depth(
    block: Callable[..., torch.Tensor],
    x: torch.Tensor,
    keep: torch.Tensor | bool,
    survival_prob: float,
    *args: Any,
    batch_dim: int = 0,
    row_args: Callable[[tuple, dict, torch.Tensor], tuple[tuple, dict]] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Apply one stochastic-depth step to ``block`` with fixed decisions ``keep``.

    Args:
        block: a shape-preserving callable ``block(x, *args, **kwargs)``; if it is an
            ``nn.Module``, its parameters are kept in the autograd graph when it is skipped.
        x: the block input (the residual is on this argument).
        keep: ``True``/``False`` or a 0-d bool tensor (whole batch), or a bool tensor of shape
            ``(B,)`` with one decision per sample along ``batch_dim`` (row mode).
        survival_prob: ``p`` in ``(0, 1]``, used for the inverted scaling.
        batch_dim: the batch dimension of ``x`` (row mode).
        row_args: in row mode, ``fn(args, kwargs, kept_idx) -> (args, kwargs)`` that selects the
            kept rows of batched extra arguments. ``None``: extra tensor arguments are refused.

    Returns:
        ``x`` where dropped, ``x + (block(x) - x) / p`` where kept.

    Raises:
        RuntimeError: if the block's output shape differs from its input's, or row mode meets
            an extra tensor argument it does not know how to slice.
    """
    if isinstance(keep, torch.Tensor) and keep.dim() == 0:
        keep = bool(keep.cpu())  # a host tensor in practice: no device sync
    if isinstance(keep, bool):
        if not keep:
            return _skip(x, block)
        y = block(x, *args, **kwargs)
        _check_shape(block, x, y)
        return _rescale(x, y, survival_prob)
    keep = keep.cpu()
    if keep.dim() != 1 or keep.shape[0] != x.shape[batch_dim]:
        raise RuntimeError(
            f"Row-mode keep decisions must have shape ({x.shape[batch_dim]},) (the batch size "
            f"along dim {batch_dim}), got {tuple(keep.shape)}."
        )
    kept_idx = keep.nonzero().squeeze(1)
    n_kept = kept_idx.numel()
    if n_kept == 0:
        return _skip(x, block)
    if n_kept == keep.shape[0]:
        y = block(x, *args, **kwargs)
        _check_shape(block, x, y)
        return _rescale(x, y, survival_prob)
    idx = kept_idx.to(x.device, non_blocking=True)
    if row_args is not None:
        args, kwargs = row_args(args, kwargs, idx)
    elif any(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values())):
        raise RuntimeError(
            f"Row-mode stochastic depth runs {type(block).__name__} on the kept rows only and "
            "cannot know how to slice its extra tensor arguments. Use mode='batch' for this "
            "block, or call it with a single tensor."
        )
    x_kept = x.index_select(batch_dim, idx)
    y_kept = block(x_kept, *args, **kwargs)
    _check_shape(block, x_kept, y_kept)
    # Kept rows become lerp(x, y, 1/p) = x + (y - x) / p; ``index_put`` with unique indices
    # saves only the indices for backward (``index_add`` would also save its source rows).
    dtype = torch.promote_types(x.dtype, y_kept.dtype)
    rows = torch.lerp(x_kept.to(dtype), y_kept.to(dtype), 1.0 / survival_prob)
    out = x.to(dtype).movedim(batch_dim, 0).index_put((idx,), rows.movedim(batch_dim, 0))
    return out.movedim(0, batch_dim)


def _rescale(x: torch.Tensor, y: torch.Tensor, survival_prob: float) -> torch.Tensor:
    """``x + (y - x) / p`` (one fused ``lerp`` kernel when the dtypes agree)."""
    if survival_prob == 1.0:
        return y
    if x.dtype == y.dtype:
        return torch.lerp(x, y, 1.0 / survival_prob)
    return x + (y - x) / survival_prob


def _check_shape_on_meta(block: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """Check that ``block`` preserves the shape of ``x`` by running it on the meta device.

    Returns whether the check ran. An op without a meta kernel makes it return ``False``: the
    check then happens the first time the block really runs (it always checks the shape).
    """

    def meta(value: Any) -> Any:
        return value.to("meta") if isinstance(value, torch.Tensor) else value

    state = {name: meta(t) for name, t in (*block.named_parameters(), *block.named_buffers())}
    try:
        with torch.no_grad():
            y = torch.func.functional_call(
                block,
                state,
                tuple(meta(a) for a in (x, *args)),
                {k: meta(v) for k, v in kwargs.items()},
            )
    except Exception:  # no meta kernel: verified on the block's first real run instead
        return False
    _check_shape(block, x, y)
    return True


def _check_shape(block: Any, x: torch.Tensor, y: Any) -> None:
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise RuntimeError(
            f"Stochastic depth only wraps shape-preserving blocks, but {type(block).__name__} "
            f"maps an input of shape {tuple(x.shape)} to {got}. Do not wrap it: leave its type "
            "out of `block_types` (a torchvision block with a `downsample` is skipped for you)."
        )


# --------------------------------------------------------------------------------------------
# The wrapper and the surgery
# --------------------------------------------------------------------------------------------


def _transformer_batch_dim(block: nn.Module) -> int | None:
    if isinstance(block, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return 0 if block.self_attn.batch_first else 1
    return None


def _transformer_row_args(batch_dim: int) -> Callable[[tuple, dict, torch.Tensor], tuple]:
    """Row slicing of the extra arguments of ``nn.Transformer{Encoder,Decoder}Layer``."""

    def select(args: tuple, kwargs: dict, idx: torch.Tensor) -> tuple[tuple, dict]:
        # Positional: the decoder's ``memory`` (batched like x); anything else is refused.
        new_args = list(args)
        if new_args:
            new_args[0] = _select_rows(new_args[0], idx, batch_dim)
        for extra in new_args[1:]:
            if isinstance(extra, torch.Tensor):
                raise RuntimeError(
                    "Row-mode stochastic depth supports transformer layers called with masks as "
                    "keyword arguments only. Use mode='batch', or pass the masks by keyword."
                )
        new_kwargs = dict(kwargs)
        for key, value in kwargs.items():
            if not isinstance(value, torch.Tensor):
                continue
            if key == "memory":
                new_kwargs[key] = _select_rows(value, idx, batch_dim)
            elif key.endswith("key_padding_mask"):
                new_kwargs[key] = _select_rows(value, idx, 0)
            elif key.endswith("mask") and value.dim() == 2:
                pass  # (L, S) masks are shared by every sample
            else:
                raise RuntimeError(
                    f"Row-mode stochastic depth cannot slice the transformer argument {key!r} of "
                    f"shape {tuple(value.shape)} by sample. Use mode='batch' for these layers."
                )
        return tuple(new_args), new_kwargs

    return select


class StochasticDepthWrapper(SurgeryWrapper):
    """Wrap a shape-preserving residual block so that training drops it at random.

    Dropped, the wrapper returns ``x`` without computing the block. Kept, it returns
    ``x + (block(x) - x) / p``. In eval mode it returns ``block(x)`` exactly. Extra positional and
    keyword arguments go to the block unchanged; the residual is on the first argument (so a
    ``TransformerDecoderLayer(tgt, memory)`` works). Attributes the wrapper does not have are
    looked up on the block (``wrapper.self_attn`` is ``block.self_attn``), and the state dict
    has the block's own keys (no extra ``block.`` level), so checkpoints of the wrapped and of
    the plain model load into each other.

    Every time the block runs, its output shape is checked against its input's. If the very
    first forward skips the block, the check runs on the ``meta`` device instead (shapes only:
    no compute, no change to real buffers), so a block that is not shape-preserving fails at
    its first forward whatever the draw.

    In ``mode="row"``, a BatchNorm inside the block sees only the kept rows, so its batch
    statistics come from fewer samples.

    Args:
        block: the residual block, ``block(x) = x + f(x)`` with the output shaped like ``x``.
        survival_prob: probability ``p`` in ``(0, 1]`` that the block is computed.
        mode: ``"batch"`` (one decision per forward) or ``"row"`` (one per sample).
        batch_dim: the batch dimension of the input in row mode; ``None`` picks 0 (1 for a
            transformer layer with ``batch_first=False``).

    Raises:
        ValueError: if ``survival_prob`` is outside ``(0, 1]`` (NaN included), ``mode`` is
            unknown or ``batch_dim`` is negative.
        RuntimeError: during a forward, if the block is not shape-preserving.

    Example:
        >>> block = nn.Sequential(nn.Linear(4, 4))
        >>> wrapped = StochasticDepthWrapper(block, 0.8)
        >>> wrapped.eval()(torch.ones(2, 4)).shape
        torch.Size([2, 4])

    Reference:
        Huang, Sun, Liu, Sedra, Weinberger. "Deep Networks with Stochastic Depth", ECCV 2016.
        https://arxiv.org/abs/1603.09382
    """

    def __init__(
        self,
        block: nn.Module,
        survival_prob: float,
        *,
        mode: str = "batch",
        batch_dim: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(block, nn.Module):
            raise TypeError(f"`block` must be an nn.Module, got {type(block).__name__}")
        self.block = block
        self.survival_prob = check_probability("survival_prob", survival_prob, allow_zero=False)
        self.mode: str = check_choice("mode", mode, _MODES)
        auto_dim = _transformer_batch_dim(block)
        if batch_dim is None:
            batch_dim = 0 if auto_dim is None else auto_dim
        self.batch_dim = check_int("batch_dim", batch_dim, minimum=0)
        self._row_args = None if auto_dim is None else _transformer_row_args(self.batch_dim)
        #: CPU generator for the decisions (``None``: torch's global CPU RNG).
        self.generator: torch.Generator | None = None
        #: ``(l, L)``: position among the candidate blocks, set by :func:`apply_stochastic_depth`.
        self.depth_position: tuple[int, int] | None = None
        self._verified = False
        self.train(block.training)  # a new module starts in training mode; follow the block
        # The state dict keeps the unwrapped model's keys (no ``block.`` level), so checkpoints
        # load both ways: into the wrapped and into the plain model.
        hide_wrapper_level(self, "block")
        # Decisions drawn and dropped since the last reset (block-level or row-level).
        self.drawn = 0
        self.dropped = 0

    def unwrap(self) -> nn.Module:
        """The original block (the very same object)."""
        return self.block

    def reset_counts(self) -> None:
        """Zero the drawn/dropped counters (the callback does it each step)."""
        self.drawn = 0
        self.dropped = 0

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            block = self.__dict__.get("_modules", {}).get("block")
            if block is None or name.startswith("__"):
                raise
            return getattr(block, name)

    @override
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.training or self.survival_prob == 1.0:
            y = self.block(x, *args, **kwargs)
            if not self._verified:
                _check_shape(self.block, x, y)
                self._verified = True
            return y
        keep: bool | torch.Tensor
        if self.mode == "batch":
            keep = bool(sample_keep(self.survival_prob, generator=self.generator))
            n, n_kept = 1, int(keep)
        else:
            keep = sample_keep(
                self.survival_prob, x.shape[self.batch_dim], generator=self.generator
            )
            n, n_kept = keep.shape[0], int(keep.sum())  # a host tensor: no device sync
        self.drawn += n
        self.dropped += n - n_kept
        if n_kept == 0 and not self._verified:
            self._verified = _check_shape_on_meta(self.block, x, args, kwargs)
        out = stochastic_depth(
            self.block,
            x,
            keep,
            self.survival_prob,
            *args,
            batch_dim=self.batch_dim,
            row_args=self._row_args,
            **kwargs,
        )
        if n_kept:
            self._verified = True  # the block ran, and stochastic_depth checked its shape
        return out

    @override
    def extra_repr(self) -> str:
        return f"survival_prob={self.survival_prob:.4g}, mode={self.mode!r}"


def default_block_types() -> tuple[type[nn.Module], ...]:
    """The block types wrapped by default: torchvision's ``BasicBlock`` and ``Bottleneck``
    (when torchvision is installed; those with a ``downsample`` are skipped) and
    ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``."""
    types: list[type[nn.Module]] = []
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck

        types += [BasicBlock, Bottleneck]
    except ImportError:  # torchvision is optional
        pass
    return (*types, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _resolve_block_types(
    block_types: Sequence[type[nn.Module] | str] | None,
) -> tuple[type[nn.Module], ...]:
    if block_types is None:
        return default_block_types()
    if isinstance(block_types, (str, type)):
        block_types = [block_types]
    resolved: list[type[nn.Module]] = []
    for spec in block_types:
        kind: Any = spec
        if isinstance(spec, str):
            module_name, _, attr = spec.rpartition(".")
            try:
                kind = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError, ValueError) as err:
                raise ValueError(
                    f"`block_types` must hold nn.Module subclasses or their import paths "
                    f"('package.module.Class'); cannot import {spec!r}: {err}"
                ) from err
        if not (isinstance(kind, type) and issubclass(kind, nn.Module)):
            raise ValueError(
                f"`block_types` must hold nn.Module subclasses or their import paths; got {spec!r}"
            )
        resolved.append(kind)
    if not resolved:
        raise ValueError("`block_types` must name at least one block type, got an empty list")
    return tuple(resolved)


def _is_wrappable(module: nn.Module) -> bool:
    """Known-shape rule: a torchvision ResNet block is shape-preserving iff it has no
    ``downsample``. Other types are checked at their first forward."""
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
    except ImportError:
        return True
    if isinstance(module, (BasicBlock, Bottleneck)):
        return getattr(module, "downsample", None) is None
    return True


def _candidates(
    model: nn.Module, types: tuple[type[nn.Module], ...]
) -> list[tuple[str, nn.Module, bool]]:
    """Candidate blocks ``(path, module, wrappable)`` in depth (registration) order, walking
    the tree as :func:`replace_modules` does (a block that will be wrapped is not entered)."""
    found: list[tuple[str, nn.Module, bool]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, types):
                wrappable = _is_wrappable(child)
                found.append((path, child, wrappable))
                if wrappable:
                    continue
            visit(child, path)

    visit(model, "")
    return found


def apply_stochastic_depth(
    model: nn.Module,
    survival_prob_last: float = 0.5,
    *,
    block_types: Sequence[type[nn.Module] | str] | None = None,
    schedule: str = "linear",
    mode: str = "batch",
) -> list[ModuleChange]:
    """Wrap every shape-preserving block of ``model`` in a :class:`StochasticDepthWrapper`.

    Blocks are the submodules of ``block_types`` (default :func:`default_block_types`), in
    registration order, which is taken as depth order. All ``L`` of them count for the
    schedule: block ``l`` gets ``p_l = 1 - (l / L)(1 - p_L)``; a torchvision block with a
    ``downsample`` keeps its place in the count but is not wrapped (it always runs).

    Args:
        model: changed in place.
        survival_prob_last: ``p_L`` in ``(0, 1]``.
        block_types: types (or import paths such as
            ``"timm.models.vision_transformer.Block"``) of the blocks to wrap.
        schedule: ``"linear"`` (Huang et al.) or ``"uniform"``.
        mode: ``"batch"`` or ``"row"``, see :class:`StochasticDepthWrapper`.

    Returns:
        The changes made, in depth order.

    Raises:
        ValueError: for a bad ``survival_prob_last``, ``schedule``, ``mode`` or ``block_types``.
        RuntimeError: if the model is already wrapped, or has no block to wrap (the message
            lists the module types it contains).

    Example:
        >>> layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
        >>> model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        >>> [c.new_type for c in apply_stochastic_depth(model, 0.5)]
        ['StochasticDepthWrapper', 'StochasticDepthWrapper']
    """
    p_last = check_probability("survival_prob_last", survival_prob_last, allow_zero=False)
    check_choice("schedule", schedule, _SCHEDULES)
    check_choice("mode", mode, _MODES)
    types = _resolve_block_types(block_types)
    existing = [n for n, m in model.named_modules() if isinstance(m, StochasticDepthWrapper)]
    if existing:
        raise RuntimeError(
            f"The model is already wrapped for stochastic depth (at {existing[:3]}). Call "
            "remove_stochastic_depth(model) first, or do not apply it twice."
        )
    candidates = _candidates(model, types)
    if not any(wrappable for _, _, wrappable in candidates):
        present = sorted({type(m).__name__ for m in model.modules()})
        wanted = ", ".join(t.__name__ for t in types)
        skipped = f" ({len(candidates)} found, all with a downsample)" if candidates else ""
        raise RuntimeError(
            f"Stochastic depth found no shape-preserving block of type {wanted} to wrap"
            f"{skipped}. The model contains: {', '.join(present)}. Name your residual block "
            "type in `block_types`."
        )
    probs = survival_probabilities(len(candidates), p_last, schedule)
    plan = {
        id(module): (k, prob)
        for k, ((_, module, ok), prob) in enumerate(zip(candidates, probs, strict=True), 1)
        if ok
    }
    total = len(candidates)

    def wrap(module: nn.Module, path: str) -> nn.Module | None:
        if id(module) not in plan:
            return None
        k, prob = plan[id(module)]
        wrapper = StochasticDepthWrapper(module, prob, mode=mode)
        wrapper.depth_position = (k, total)
        return wrapper

    return replace_modules(
        model,
        dict.fromkeys(types, wrap),
        refuse_if_contains=(StochasticDepthWrapper,),
    )


def remove_stochastic_depth(model: nn.Module) -> list[ModuleChange]:
    """Put every wrapped block back in place of its :class:`StochasticDepthWrapper`.

    The original block objects are reinserted, so the module tree (and the state dict) is
    exactly the one before :func:`apply_stochastic_depth`.
    """
    return restore_modules(model, StochasticDepthWrapper)


def expected_depth(model: nn.Module) -> float:
    """``E[number of blocks computed] = sum_l p_l`` over the candidate blocks of ``model``
    (unwrapped candidates count 1). ``0.0`` if nothing is wrapped."""
    wrappers = [m for m in model.modules() if isinstance(m, StochasticDepthWrapper)]
    if not wrappers:
        return 0.0
    total = max((w.depth_position or (0, len(wrappers)))[1] for w in wrappers)
    return total - math.fsum(1.0 - w.survival_prob for w in wrappers)


# --------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """splitmix64 over ``values``: a fixed, platform-independent seed derivation."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state & ((1 << 63) - 1)


class StochasticDepthCallback(pl.Callback):
    """Apply stochastic depth to the LightningModule's residual blocks and drive its randomness.

    In ``setup`` (before the checkpoint restore, DDP wrapping and optimizer creation) it calls
    :func:`apply_stochastic_depth` on the LightningModule, once: a later ``validate``/``test``
    with the same module finds the wrappers and leaves them. The change table is logged once at
    rank zero.

    **Randomness and DDP.** The decisions come from the callback's own CPU generator, reseeded
    at each training batch from ``(seed, stream, batch counter)``; ``seed`` and the counter are
    in the callback's ``state_dict``, so a resumed run continues the same stream. ``seed``
    defaults to rank zero's ``torch.initial_seed()``, broadcast at setup (so it follows
    ``seed_everything``). In ``mode="batch"`` the stream is the same on every rank: all ranks
    drop the same blocks, like a single process on the global batch, and no rank idles while
    another computes a block. In ``mode="row"`` each rank has its own stream (its samples are
    different). Skipped blocks pass their parameters an exact zero gradient, so plain
    ``strategy="ddp"`` with ``find_unused_parameters=False`` neither hangs nor diverges.

    Logs (on logging steps): ``reg/stochastic_depth/blocks`` (number wrapped),
    ``reg/stochastic_depth/expected_depth`` (``sum_l p_l`` over all candidate blocks) and
    ``reg/stochastic_depth/dropped_fraction`` (dropped decisions / drawn decisions this step:
    blocks in batch mode, block-rows in row mode).

    Args:
        survival_prob_last: ``p_L`` in ``(0, 1]``.
        block_types: import paths (``"timm.models.vision_transformer.Block"``) or types of the
            blocks to wrap; ``None`` for :func:`default_block_types`.
        schedule: ``"linear"`` or ``"uniform"``.
        mode: ``"batch"`` or ``"row"``.
        seed: the base seed of the decisions; ``None`` for rank zero's ``torch.initial_seed()``.

    Raises:
        ValueError: for a bad argument (``survival_prob_last`` outside ``(0, 1]`` or NaN, an
            unknown ``schedule``/``mode``, a ``block_types`` entry that is not a module type).
        RuntimeError: at setup, if the module has nothing to wrap or was wrapped by someone
            else.

    Example:
        >>> cb = StochasticDepthCallback(0.5, block_types=["tests.helpers.models.ResidualBlock"])
        >>> # Trainer(callbacks=[cb]).fit(module)

    Reference:
        Huang, Sun, Liu, Sedra, Weinberger. "Deep Networks with Stochastic Depth", ECCV 2016.
        https://arxiv.org/abs/1603.09382
    """

    def __init__(
        self,
        survival_prob_last: float = 0.5,
        *,
        block_types: list[str] | tuple[type[nn.Module], ...] | None = None,
        schedule: str = "linear",
        mode: str = "batch",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.survival_prob_last = check_probability(
            "survival_prob_last", survival_prob_last, allow_zero=False
        )
        self.schedule: str = check_choice("schedule", schedule, _SCHEDULES)
        self.mode: str = check_choice("mode", mode, _MODES)
        self.block_types = _resolve_block_types(block_types)
        self.seed: int | None = None if seed is None else check_int("seed", seed, minimum=0)
        self.batches_seen = 0
        self.changes: list[ModuleChange] = []
        self._wrappers: list[StochasticDepthWrapper] = []
        self._generator = torch.Generator()
        self._stream = 0

    @property
    def wrappers(self) -> list[StochasticDepthWrapper]:
        """The wrappers this callback inserted, in depth order."""
        return list(self._wrappers)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_strategies(
            trainer,
            "StochasticDepthCallback",
            ALL_SHARDED,
            "skipping a dropped block's compute is verified with DDP's gradient reducer only",
        )
        present = [m for m in pl_module.modules() if isinstance(m, StochasticDepthWrapper)]
        ours = {id(w) for w in self._wrappers}
        if not (present and all(id(m) in ours for m in present)):
            # Not wrapped yet (or wrapped by someone else: apply refuses that loudly).
            self.changes = apply_stochastic_depth(
                pl_module,
                self.survival_prob_last,
                block_types=self.block_types,
                schedule=self.schedule,
                mode=self.mode,
            )
            self._wrappers = [
                m for m in pl_module.modules() if isinstance(m, StochasticDepthWrapper)
            ]
            rank_zero_info(format_changes(self.changes, "Stochastic depth"))
        if self.seed is None:
            seed = torch.initial_seed() & ((1 << 63) - 1)
            self.seed = int(trainer.strategy.broadcast(seed, src=0))
        self._stream = 0 if self.mode == "batch" else trainer.global_rank + 1
        for wrapper in self._wrappers:
            wrapper.generator = self._generator

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        assert self.seed is not None
        self._generator.manual_seed(_mix(self.seed, self._stream, self.batches_seen))
        self.batches_seen += 1
        for wrapper in self._wrappers:
            wrapper.reset_counts()

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._wrappers or not is_logging_step(trainer):
            return
        drawn = sum(w.drawn for w in self._wrappers)
        dropped = sum(w.dropped for w in self._wrappers)
        device = pl_module.device
        values = {
            f"{_LOG_PREFIX}/blocks": torch.tensor(float(len(self._wrappers)), device=device),
            f"{_LOG_PREFIX}/expected_depth": torch.tensor(expected_depth(pl_module), device=device),
        }
        if drawn:
            values[f"{_LOG_PREFIX}/dropped_fraction"] = torch.tensor(dropped / drawn, device=device)
        log_scalars(pl_module, values)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "batches_seen": self.batches_seen, "mode": self.mode}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict["seed"]
        self.batches_seen = int(state_dict["batches_seen"])
