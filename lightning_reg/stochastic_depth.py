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
autograd function that gives the block's parameters an exact zero gradient, so every parameter
is in the graph on every rank (the same zero gradient that mask-multiply produces).
:class:`StochasticDepthCallback` draws the batch-mode decisions from a stream that is identical
on all ranks, so all ranks skip the same blocks and none waits for another.
See ``docs/stochastic-depth.md``.

The pure functions come first (no Lightning needed); :class:`StochasticDepthCallback` is below.
"""

from __future__ import annotations

import math
import pydoc
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_reg.core.compat import BatchNormBase
from lightning_reg.core.logging import is_logging_step, log_scalars
from lightning_reg.core.random import CallbackRNG
from lightning_reg.core.strategies import ALL_SHARDED, refuse_strategies
from lightning_reg.core.surgery import (
    ModuleChange,
    SurgeryWrapper,
    format_changes,
    hide_wrapper_level,
    replace_modules,
    restore_modules,
    training_flags_restored,
)
from lightning_reg.core.validation import check_choice, check_int, check_probability

__all__ = [
    "StochasticDepthCallback",
    "StochasticDepthWrapper",
    "apply_stochastic_depth",
    "default_block_types",
    "expected_depth",
    "is_residual_block",
    "remove_stochastic_depth",
    "sample_keep",
    "stochastic_depth",
    "survival_probabilities",
]

_MODES = ("batch", "row")
_SCHEDULES = ("linear", "uniform")
_LOG_PREFIX = "reg/stochastic_depth"
_TORCH_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
#: Names of the layer stacks of Hugging Face and timm models (``encoder.layer``, ``h``, ...).
_LAYER_STACKS = ("layer", "layers", "h", "blocks", "block")
#: torch transformer masks of shape ``(L, S)``: one for the whole batch, never sliced.
_SHARED_MASKS = ("src_mask", "tgt_mask", "memory_mask")
#: Uniform draws taken ahead from each decision generator (see ``_uniform``); cleared by
#: ``StochasticDepthWrapper.reset_counts``, which the callback calls after each reseed.
_UNIFORMS: weakref.WeakKeyDictionary[torch.Generator, list[float]] = weakref.WeakKeyDictionary()


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

    Example:
        >>> sample_keep(1.0, 3)
        tensor([True, True, True])
    """
    shape = () if batch_size is None else (batch_size,)
    return torch.rand(shape, generator=generator) < survival_prob


class _TouchParams(torch.autograd.Function):
    """``x -> copy of x`` whose backward passes the gradient through and gives each parameter an
    exact zero gradient, without computing anything. It keeps a skipped block's parameters in
    the autograd graph, so DDP's reducer (``find_unused_parameters=False``) sees all of them."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*params)
        # A copy, not a view: autograd forbids in-place ops on views returned by a Function,
        # and the next layer may well do ``relu_()`` on it.
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (grad, *(torch.zeros_like(p) for p in ctx.saved_tensors))


def _skip(x: torch.Tensor, block: Any) -> torch.Tensor:
    """The output of a dropped block: ``x``, with the block's trainable parameters kept in the
    autograd graph at no compute (they get an exact zero gradient)."""
    if not torch.is_grad_enabled() or not isinstance(block, nn.Module):
        return x
    params = [p for p in block.parameters() if p.requires_grad]
    return _TouchParams.apply(x, *params) if params else x


def _hidden(block: Any, x: torch.Tensor, y: Any) -> torch.Tensor:
    """The hidden state of a block's output ``y`` (a tensor, or the first item of the tuple that
    some Hugging Face versions return), checked to have the shape of ``x``."""
    h = y[0] if isinstance(y, (tuple, list)) and y else y
    if not isinstance(h, torch.Tensor) or h.shape != x.shape:
        got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
        raise RuntimeError(
            f"Stochastic depth only wraps shape-preserving blocks, but {type(block).__name__} "
            f"maps an input of shape {tuple(x.shape)} to {got}. Do not wrap it: leave its type "
            "out of `block_types` (a block with a `downsample` is skipped for you)."
        )
    return h


def _with_hidden(y: Any, h: torch.Tensor) -> Any:
    """``y`` with its hidden state replaced by ``h``; the other outputs pass through."""
    return (h, *y[1:]) if isinstance(y, (tuple, list)) else h


def _lerp(x: torch.Tensor, h: torch.Tensor, survival_prob: float) -> torch.Tensor:
    """``x + (h - x) / p`` in one ``lerp`` kernel (in the promoted dtype if the dtypes differ)."""
    if h.dtype != x.dtype:
        dtype = torch.promote_types(x.dtype, h.dtype)
        x, h = x.to(dtype), h.to(dtype)
    return torch.lerp(x, h, 1.0 / survival_prob)


def _rows(value: Any, idx: torch.Tensor, dim: int, size: int, name: str = "") -> Any:
    """``value`` restricted to the kept rows if it is batch-shaped (``size`` along the batch
    dim; a ``*padding_mask`` is batch-first), else unchanged (a broadcast mask, an int)."""
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, idx, dim, size) for v in value)
    if not isinstance(value, torch.Tensor) or name in _SHARED_MASKS:
        return value
    d = 0 if name.endswith("padding_mask") or value.dim() <= dim else dim
    return value.index_select(d, idx) if value.shape[d] == size else value


def _uniform(generator: torch.Generator | None) -> float:
    """One ``U(0, 1)`` draw without a tensor per call: a generator's draws are taken 64 at a time
    and handed out in order (the values 64 single draws would give). ``None``: one draw from
    torch's global CPU RNG per call, so that ``torch.manual_seed`` replays it."""
    if generator is None:
        return float(torch.rand(()))
    pool = _UNIFORMS.get(generator)
    if not pool:
        pool = _UNIFORMS[generator] = torch.rand(64, generator=generator).tolist()[::-1]
    return pool.pop()


def stochastic_depth(
    block: Any,
    x: torch.Tensor,
    keep: torch.Tensor | bool,
    survival_prob: float,
    *args: Any,
    batch_dim: int = 0,
    **kwargs: Any,
) -> Any:
    """Apply one stochastic-depth step to ``block`` with fixed decisions ``keep``.

    In row mode the extra arguments that are batch-shaped (same size as ``x`` along
    ``batch_dim``; attention masks, position ids, encoder states, given by position or keyword,
    also inside tuples) are sliced to the kept rows with ``x``. A block with a BatchNorm in
    training mode that keeps exactly one row is computed on the whole batch (a BatchNorm cannot
    normalise a single row) and only the kept row is used, which gives the same unbiased output.

    Args:
        block: a shape-preserving callable ``block(x, *args, **kwargs)``; if it is an
            ``nn.Module``, its parameters are kept in the autograd graph when it is skipped. It
            may return a tensor or a tuple whose first item is the hidden state.
        x: the block input (the residual is on this argument).
        keep: ``True``/``False`` or a 0-d bool tensor (whole batch), or a bool tensor of shape
            ``(B,)`` with one decision per sample along ``batch_dim`` (row mode).
        survival_prob: ``p`` in ``(0, 1]``, used for the inverted scaling.
        batch_dim: the batch dimension of ``x`` (row mode).

    Returns:
        ``x`` where dropped, ``x + (block(x) - x) / p`` where kept (as the hidden state of the
        block's tuple output if it returns one).

    Raises:
        RuntimeError: if the block's output shape differs from its input's, or ``keep`` does
            not match the batch size.

    Example:
        >>> stochastic_depth(nn.Identity(), torch.ones(2), False, 0.5)
        tensor([1., 1.])
    """
    size = x.shape[batch_dim]
    keep = torch.as_tensor(keep).cpu()  # a host tensor in practice: no device sync
    if keep.dim() == 0:  # one decision for the whole batch
        keep = keep.expand(size)
    if tuple(keep.shape) != (size,):
        raise RuntimeError(
            f"Row-mode keep decisions must have shape ({size},) (the batch size along dim "
            f"{batch_dim}), got {tuple(keep.shape)}."
        )
    kept_idx = keep.nonzero().squeeze(1)
    if kept_idx.numel() == 0:
        return _skip(x, block)
    if kept_idx.numel() == size:
        y = block(x, *args, **kwargs)
        return _with_hidden(y, _lerp(x, _hidden(block, x, y), survival_prob))
    idx = kept_idx.to(x.device, non_blocking=True)
    x_kept = x.index_select(batch_dim, idx)
    modules = block.modules() if isinstance(block, nn.Module) else ()
    if kept_idx.numel() == 1 and any(isinstance(m, BatchNormBase) and m.training for m in modules):
        y = block(x, *args, **kwargs)  # BatchNorm needs more than one row: compute them all
        h = _hidden(block, x, y).index_select(batch_dim, idx)
    else:
        args = _rows(args, idx, batch_dim, size)
        kwargs = {k: _rows(v, idx, batch_dim, size, k) for k, v in kwargs.items()}
        y = block(x_kept, *args, **kwargs)
        h = _hidden(block, x_kept, y)
    # ``index_put`` with unique indices saves only the indices for backward (``index_add``
    # would also save its source rows).
    rows = _lerp(x_kept, h, survival_prob)
    out = x.to(rows.dtype).movedim(batch_dim, 0).index_put((idx,), rows.movedim(batch_dim, 0))
    return _with_hidden(y, out.movedim(0, batch_dim))


# --------------------------------------------------------------------------------------------
# The wrapper and the surgery
# --------------------------------------------------------------------------------------------


class StochasticDepthWrapper(SurgeryWrapper):
    """Wrap a shape-preserving residual block so that training drops it at random.

    Dropped, the wrapper returns ``x`` without computing the block. Kept, it returns
    ``x + (block(x) - x) / p``. In eval mode it returns ``block(x)`` exactly. Extra positional and
    keyword arguments go to the block (sliced to the kept rows in row mode, see
    :func:`stochastic_depth`); the residual is on the first argument (so a
    ``TransformerDecoderLayer(tgt, memory)`` works). A block that returns a tuple (some Hugging
    Face versions) has its first item dropped or scaled and the rest passed through; dropped, it
    returns ``None`` for the rest. The state dict has the block's own keys (no extra ``block.``
    level), so checkpoints of the wrapped and of the plain model load into each other, and
    attributes the wrapper does not have are read from the block (``wrapper.self_attn``).

    The output shape is checked against the input's whenever a training forward computes the
    block, and at the first eval forward. The first time a training forward drops a block not yet
    checked, the block runs once in eval mode without gradients to check it (no change to
    BatchNorm statistics), so a block that is not shape-preserving fails at its first forward
    whatever the draw.

    In ``mode="row"``, a BatchNorm inside the block sees only the kept rows, so its batch
    statistics come from fewer samples (from the whole batch when a single row is kept).

    Args:
        block: the residual block, ``block(x) = x + f(x)`` with the output shaped like ``x``.
        survival_prob: probability ``p`` in ``(0, 1]`` that the block is computed.
        mode: ``"batch"`` (one decision per forward) or ``"row"`` (one per sample).
        batch_dim: the batch dimension of the input in row mode; ``None`` picks 0 (1 for a
            torch transformer layer with ``batch_first=False``).

    Raises:
        ValueError: if ``survival_prob`` is outside ``(0, 1]`` (NaN included), ``mode`` is
            unknown or ``batch_dim`` is negative.
        TypeError: if ``block`` is not an ``nn.Module``.
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
        if batch_dim is None:  # torch transformer layers default to (S, B, E)
            batch_dim = int(isinstance(block, _TORCH_LAYERS) and not block.self_attn.batch_first)
        self.batch_dim = check_int("batch_dim", batch_dim, minimum=0)
        #: CPU generator for the decisions (``None``: torch's global CPU RNG). Batch mode takes its
        #: draws 64 at a time: after reseeding it by hand, call :meth:`reset_counts`.
        self.generator: torch.Generator | None = None
        #: ``(l, L)``: position among the candidate blocks, set by :func:`apply_stochastic_depth`.
        self.depth_position: tuple[int, int] | None = None
        #: Decisions drawn and dropped since the last :meth:`reset_counts` (blocks or rows).
        self.drawn = self.dropped = 0
        #: Length of the block's tuple output (0: a tensor), set once the output is checked.
        self._arity: int | None = None
        self.training = block.training  # follow the block (``train()`` would reset its subtree)
        hide_wrapper_level(self, "block")

    def unwrap(self) -> nn.Module:
        """The original block (the very same object)."""
        return self.block

    def __getattr__(self, name: str) -> Any:
        # Attribute reads fall through to the block: torch's TransformerEncoder reads
        # ``layers[0].self_attn.batch_first`` on every forward (and HF/timm code reads layers).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "block":
                raise
            return getattr(self.block, name)

    def reset_counts(self) -> None:
        """Zero the drawn/dropped counters and discard the batch-mode draws taken ahead from
        ``generator`` (the callback does both at each step, after reseeding the generator)."""
        self.drawn = self.dropped = 0
        if self.generator is not None:
            _UNIFORMS.pop(self.generator, None)

    def _checked(self, x: torch.Tensor, y: Any) -> Any:
        """``y``, the block's output; the first one is checked and its tuple length kept."""
        if self._arity is None:
            _hidden(self.block, x, y)
            self._arity = len(y) if isinstance(y, (tuple, list)) else 0
        return y

    def _drop(self, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._arity is None:  # check the shape once, without touching BN statistics
            with torch.no_grad(), training_flags_restored(self.block):
                self._checked(x, self.block.eval()(x, *args, **kwargs))
        out = _skip(x, self.block)
        return (out, *[None] * (self._arity - 1)) if self._arity else out

    @override
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        block, p = self.block, self.survival_prob
        if not self.training or p == 1.0:
            return self._checked(x, block(x, *args, **kwargs))
        if self.mode == "batch":
            self.drawn += 1
            if _uniform(self.generator) < p:  # kept: ``_hidden`` checks the output shape
                y = block(x, *args, **kwargs)
                return _with_hidden(y, _lerp(x, _hidden(block, x, y), p))
            self.dropped += 1
            return self._drop(x, args, kwargs)
        keep = sample_keep(p, x.shape[self.batch_dim], generator=self.generator)
        n_kept = int(keep.sum())  # a host tensor: no device sync
        self.drawn += keep.shape[0]
        self.dropped += keep.shape[0] - n_kept
        if n_kept == 0:
            return self._drop(x, args, kwargs)
        return stochastic_depth(block, x, keep, p, *args, batch_dim=self.batch_dim, **kwargs)

    @override
    def extra_repr(self) -> str:
        return f"survival_prob={self.survival_prob:.4g}, mode={self.mode!r}"


def is_residual_block(
    module: nn.Module, stack: nn.Module | None = None, stack_name: str = ""
) -> bool:
    """Whether stochastic depth wraps ``module`` by default, judged by its structure.

    A block is a candidate if it is a torch transformer layer, or an element of an
    ``nn.Sequential``/``nn.ModuleList`` ``stack`` (the attribute ``stack_name`` of its parent)
    that looks like a residual block:

    * it has a ``downsample`` attribute (torchvision's and timm's ResNet blocks) or a
      ``drop_path*`` attribute (timm puts ``DropPath`` on residual branches only: ViT ``Block``,
      ``ConvNeXtBlock``, ...);
    * or it holds an attention module and sits in a layer stack named ``layer``, ``layers``,
      ``h``, ``blocks`` or ``block`` (Hugging Face Bert/ViT/GPT-2/Llama/T5 layers, timm blocks).

    Whether a candidate is then *wrapped* is decided by :func:`apply_stochastic_depth` (a
    non-``None`` ``downsample`` means a shape change: not wrapped).

    Example:
        >>> layers = nn.ModuleList([nn.TransformerEncoderLayer(8, 2, 16)])
        >>> is_residual_block(layers[0], layers, "layers")
        True
    """
    if isinstance(module, _TORCH_LAYERS):
        return True
    if not isinstance(stack, (nn.Sequential, nn.ModuleList)):
        return False
    attrs = set(vars(module)) | set(dict(module.named_children()))
    if "downsample" in attrs or any(a.startswith("drop_path") for a in attrs):
        return True
    return stack_name in _LAYER_STACKS and any(
        "attention" in type(m).__name__.lower() for m in module.modules() if m is not module
    )


def default_block_types() -> tuple[type[nn.Module], ...]:
    """Deprecated (removed in the next release): blocks are recognised by structure now, see
    :func:`is_residual_block`. Returns the types the old default wrapped."""
    why = "apply_stochastic_depth recognises residual blocks by structure (is_residual_block)"
    warnings.warn(f"default_block_types() is deprecated: {why}.", DeprecationWarning, stacklevel=2)
    from torchvision.models.resnet import BasicBlock, Bottleneck

    return (BasicBlock, Bottleneck, *_TORCH_LAYERS)


def _resolve_block_types(
    block_types: Sequence[type[nn.Module] | str] | None,
) -> tuple[type[nn.Module], ...] | None:
    if block_types is None:
        return None
    specs = [block_types] if isinstance(block_types, (str, type)) else list(block_types)
    if not specs:
        raise ValueError("`block_types` must name at least one block type, got an empty list")
    resolved = [pydoc.locate(s) if isinstance(s, str) else s for s in specs]
    for spec, kind in zip(specs, resolved):
        if not (isinstance(kind, type) and issubclass(kind, nn.Module)):
            raise ValueError(
                "`block_types` must hold nn.Module subclasses or their import paths "
                f"('package.module.Class'); cannot import {spec!r} as one"
            )
    return tuple(resolved)


def apply_stochastic_depth(
    model: nn.Module,
    survival_prob_last: float = 0.5,
    *,
    block_types: Sequence[type[nn.Module] | str] | None = None,
    schedule: str = "linear",
    mode: str = "batch",
) -> list[ModuleChange]:
    """Wrap every shape-preserving residual block of ``model`` in a
    :class:`StochasticDepthWrapper`.

    Blocks are found by structure (:func:`is_residual_block`: torchvision and timm ResNet
    blocks, timm ViT/ConvNeXt blocks, Hugging Face transformer layers, torch transformer layers),
    or are the submodules of ``block_types``, in registration order, which is taken as depth
    order. All ``L`` of them count for the schedule: block ``l`` gets ``p_l = 1 - (l / L)(1 -
    p_L)``; a block with a ``downsample`` keeps its place in the count but is not wrapped (it
    always runs). Blocks inside a wrapped block are not wrapped again.

    Args:
        model: changed in place.
        survival_prob_last: ``p_L`` in ``(0, 1]``.
        block_types: types (or import paths such as ``"mypackage.models.ResBlock"``) of the
            blocks to wrap; ``None`` recognises residual blocks by structure.
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
    check_choice("mode", mode, _MODES)
    types = _resolve_block_types(block_types)
    is_candidate = is_residual_block if types is None else lambda m, *_: isinstance(m, types)
    candidates: list[tuple[nn.Module, bool]] = []  # (block, wrappable), in depth order

    def visit(parent: nn.Module, parent_name: str) -> None:
        # A block with a ``downsample`` changes the shape: not wrappable, but it counts in ``L``
        # unless it holds candidates itself (then it is a stage, such as timm's ConvNeXtStage).
        for name, child in parent.named_children():
            candidate = is_candidate(child, parent, parent_name)
            if candidate and getattr(child, "downsample", None) is None:
                candidates.append((child, True))
                continue
            before = len(candidates)
            visit(child, name)
            if candidate and len(candidates) == before:
                candidates.append((child, False))

    visit(model, "")
    total = len(candidates)  # survival_probabilities validates survival_prob_last and schedule
    probs = survival_probabilities(max(total, 1), survival_prob_last, schedule)
    wrappers: dict[int, StochasticDepthWrapper] = {}
    for k, ((block, wrappable), p) in enumerate(zip(candidates, probs), 1):
        if wrappable:
            wrappers[id(block)] = StochasticDepthWrapper(block, p, mode=mode)
            wrappers[id(block)].depth_position = (k, total)
    policy = {nn.Module: lambda module, path: wrappers.get(id(module))}
    changes = replace_modules(model, policy, refuse_if_contains=(StochasticDepthWrapper,))
    if not changes:
        present = ", ".join(sorted({type(m).__name__ for m in model.modules()}))
        wanted = "residual" if types is None else ", ".join(t.__name__ for t in types)
        skipped = f", {total} found, all with a downsample" if candidates else ""
        raise RuntimeError(
            f"Stochastic depth found no shape-preserving block to wrap (type: {wanted}{skipped})."
            f" The model contains: {present}. Name your residual block type in `block_types`."
        )
    return changes


def remove_stochastic_depth(model: nn.Module) -> list[ModuleChange]:
    """Put every wrapped block back in place of its :class:`StochasticDepthWrapper`.

    The original block objects are reinserted, so the module tree (and the state dict) is
    exactly the one before :func:`apply_stochastic_depth`.

    Example:
        >>> model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), 2)
        >>> _ = apply_stochastic_depth(model)
        >>> len(remove_stochastic_depth(model))
        2
    """
    return restore_modules(model, StochasticDepthWrapper)


def expected_depth(model: nn.Module) -> float:
    """``E[number of blocks computed] = sum_l p_l`` over the candidate blocks of ``model``
    (unwrapped candidates count 1). ``0.0`` if nothing is wrapped."""
    wrappers = [m for m in model.modules() if isinstance(m, StochasticDepthWrapper)]
    total = max(((w.depth_position or (0, len(wrappers)))[1] for w in wrappers), default=0)
    return total - math.fsum(1.0 - w.survival_prob for w in wrappers)


# --------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------


class StochasticDepthCallback(pl.Callback):
    """Apply stochastic depth to the LightningModule's residual blocks and drive its randomness.

    In ``setup`` (before the checkpoint restore, DDP wrapping and optimizer creation) it calls
    :func:`apply_stochastic_depth` on the LightningModule, once: a later ``validate``/``test``
    with the same module finds the wrappers and leaves them. The change table is logged once at
    rank zero.

    **Randomness and DDP.** The decisions come from a
    :class:`~lightning_reg.core.random.CallbackRNG` stream: one CPU generator reseeded at each
    training batch from ``(seed, batch counter)``, both in the callback's ``state_dict``, so a
    resumed run continues the same stream. ``seed`` defaults to ``torch.initial_seed()`` (so it
    follows ``seed_everything``). In ``mode="batch"`` the stream is rank zero's on every rank:
    all ranks drop the same blocks, like a single process on the global batch, and no rank idles
    while another computes a block. In ``mode="row"`` each rank has its own stream (its samples
    are different). Skipped blocks pass their parameters an exact zero gradient, so plain
    ``strategy="ddp"`` with ``find_unused_parameters=False`` neither hangs nor diverges.

    Logs (on logging steps): ``reg/stochastic_depth/blocks`` (number wrapped),
    ``reg/stochastic_depth/expected_depth`` (``sum_l p_l`` over all candidate blocks) and
    ``reg/stochastic_depth/dropped_fraction`` (dropped decisions / drawn decisions this step:
    blocks in batch mode, block-rows in row mode).

    Args:
        survival_prob_last: ``p_L`` in ``(0, 1]``.
        block_types: import paths (``"timm.models.vision_transformer.Block"``) or types of the
            blocks to wrap; ``None`` recognises residual blocks (:func:`is_residual_block`).
        schedule: ``"linear"`` or ``"uniform"``.
        mode: ``"batch"`` or ``"row"``.
        seed: the base seed of the decisions; ``None`` for ``torch.initial_seed()``.

    Raises:
        ValueError: for a bad argument (``survival_prob_last`` outside ``(0, 1]`` or NaN, an
            unknown ``schedule``/``mode``, a ``block_types`` entry that is not a module type,
            a negative ``seed``).
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
        seed = None if seed is None else check_int("seed", seed, minimum=0)
        self.rng = CallbackRNG(seed, salt=0x5D, per_rank=self.mode == "row")
        self.changes: list[ModuleChange] = []
        #: The wrappers this callback inserted, in depth order.
        self.wrappers: list[StochasticDepthWrapper] = []

    @property
    def seed(self) -> int | None:
        """The base seed of the decisions (set at ``setup`` when not given)."""
        return self.rng.seed

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        why = "skipping a dropped block's compute is verified with DDP's gradient reducer only"
        refuse_strategies(trainer, "StochasticDepthCallback", ALL_SHARDED, why)
        ours = {id(w) for w in self.wrappers}
        if not any(id(m) in ours for m in pl_module.modules()):
            # Not wrapped yet (or wrapped by someone else: apply refuses that loudly).
            self.changes = apply_stochastic_depth(
                pl_module,
                self.survival_prob_last,
                block_types=self.block_types,
                schedule=self.schedule,
                mode=self.mode,
            )
            self.wrappers = [pl_module.get_submodule(c.path) for c in self.changes]
            rank_zero_info(format_changes(self.changes, "Stochastic depth"))
        self.rng.setup(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        generator, _ = self.rng.next(torch.device("cpu"))
        for wrapper in self.wrappers:
            wrapper.generator = generator
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
        if not is_logging_step(trainer):
            return
        drawn = sum(w.drawn for w in self.wrappers)
        dropped = sum(w.dropped for w in self.wrappers)
        values = {
            f"{_LOG_PREFIX}/blocks": float(len(self.wrappers)),
            f"{_LOG_PREFIX}/expected_depth": expected_depth(pl_module),
        }
        if drawn:
            values[f"{_LOG_PREFIX}/dropped_fraction"] = dropped / drawn
        log_scalars(pl_module, values)

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.rng.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rng.load_state_dict(state_dict)
