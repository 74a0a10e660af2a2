"""Max-norm and other weight constraints, projected after every real optimizer step.

The reference constrains each weight vector to a ball, ``‖w‖₂ ≤ r``, and projects it back when
an update leaves the ball. In PyTorch layout a *unit* is dim 0 of a weight (an output neuron or
a filter), so the unit's incoming weights are the rest of the tensor: dim 1 for ``Linear``, dims
1.. for ``Conv``; ``ConvTranspose`` weights are ``(in, out, ...)``, so their unit is dim 1.
``dim=None`` treats the whole tensor as one vector.

Projection is batched per (device, dtype): each tensor's unit norms (accumulated in float32 or
wider) land in one flat buffer, the scale factors come from one kernel over it, and one foreach
multiply applies them. The plan (buffers and their per-tensor views) is built once: by the
callback per param group, and by the functions for the last tensors they were given. Units
already inside the ball are multiplied by exactly 1.0, so they stay unchanged bit for bit. A
unit whose norm is NaN or infinite is left alone: a constraint never turns a non-finite weight
into a number.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from lightning_reg.core.compat import attached_trainer, foreach_clamp_min_, foreach_mul_
from lightning_reg.core.logging import is_logging_step, log_scalars
from lightning_reg.core.param_callback import Group, ParamCallback, Params, resolve_params
from lightning_reg.core.params import ParamSelection, SelectedParam, split_by_device_dtype
from lightning_reg.core.strategies import refuse_strategies
from lightning_reg.core.validation import check_choice, check_positive

__all__ = ["MaxNormCallback", "WeightConstraintCallback", "max_norm_", "non_neg_", "unit_norm_"]

Dim = str | int | tuple[int, ...] | None
_CONSTRAINTS = ("max_norm", "unit_norm", "non_neg")


def _check_dim(dim: Any) -> Dim:
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    if dim is None or dim == "unit" or (all(type(d) is int for d in dims) and dims):
        return tuple(dim) if isinstance(dim, list) else dim
    raise ValueError(f"`dim` must be 'unit', None, an int or a tuple of ints, got {dim!r}")


class _Bucket:
    """Tensors of one (device, dtype), the dims each reduces over, and two flat buffers (unit norms
    in float32 or wider, scales in the tensors' dtype) whose slices view each tensor's units.

    Tensor subclasses (``DTensor`` shards under FSDP2) get no buffers: their norms are
    concatenated and their scales split at each step instead. A bucket holds weak references, so
    a cached plan keeps no tensor alive.
    """

    def __init__(self, items: list[tuple[torch.Tensor, tuple[int, ...]]]) -> None:
        self.refs = [weakref.ref(t) for t, _ in items]
        self.dims = [dims for _, dims in items]
        self.shapes = [[1 if d in dims else n for d, n in enumerate(t.shape)] for t, dims in items]
        self.sizes = [math.prod(shape) for shape in self.shapes]
        t = items[0][0]
        self.dtype, self.acc = t.dtype, torch.promote_types(t.dtype, torch.float32)
        self.norm_views: list[torch.Tensor | None] = [None] * len(items)
        self.scale_views: list[torch.Tensor] = []
        if all(type(t) in (torch.Tensor, nn.Parameter) for t, _ in items):
            self.norms = torch.empty(sum(self.sizes), device=t.device, dtype=self.acc)
            self.scales = torch.empty(sum(self.sizes), device=t.device, dtype=t.dtype)
            self.norm_views = self._views(self.norms)
            self.scale_views = self._views(self.scales)

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [v.view(s) for v, s in zip(flat.split(self.sizes), self.shapes)]

    @torch.no_grad()
    def rescale_(self, radius: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale each unit whose finite norm exceeds ``radius`` onto it (``None``: each finite
        non-zero unit to norm 1), in place; return ``(norms, scales)``."""
        tensors = [ref() for ref in self.refs]
        norms = [
            # no dims: each element is its own unit
            torch.linalg.vector_norm(
                t if d else t.unsqueeze(-1), dim=d or -1, keepdim=bool(d), dtype=self.acc, out=out
            )
            for t, d, out in zip(tensors, self.dims, self.norm_views)
        ]
        flat = self.norms if self.scale_views else torch.cat([n.reshape(-1) for n in norms])
        outside = torch.isfinite(flat) & (flat > (radius or 0.0))
        scales = torch.where(outside, (radius or 1.0) / flat, 1.0)
        if self.scale_views:
            self.scales.copy_(scales)
        foreach_mul_(tensors, self.scale_views or self._views(scales.to(self.dtype)))
        return flat, scales


def _plan(selected: Iterable[SelectedParam], dim: Dim) -> list[_Bucket]:
    """Bucket the non-empty tensors by (device, dtype), each with the dims it reduces over."""
    dims: dict[torch.Tensor, tuple[int, ...]] = {}
    for _, t, unit_dim in selected:
        if dim is None or dim == "unit":
            dims[t] = tuple(d for d in range(t.ndim) if dim is None or d != unit_dim)
        else:
            dims[t] = tuple(sorted({d % t.ndim for d in ((dim,) if isinstance(dim, int) else dim)}))
    groups = split_by_device_dtype(t for t in dims if t.numel())
    return [_Bucket([(t, dims[t]) for t in group]) for group in groups]


_PLANS: dict[tuple, list[_Bucket]] = {}


def _cached_plan(params: Params, dim: Dim) -> list[_Bucket]:
    """The last call's plan, reused while it gets the same live tensors (shape, dtype, device)."""
    selected = resolve_params(params)
    key = (dim, *[(id(t), t.shape, t.dtype, t.device, u) for _, t, u in selected])
    plan = _PLANS.get(key)
    if plan is None or any(ref() is None for bucket in plan for ref in bucket.refs):
        _PLANS.clear()
        plan = _PLANS[key] = _plan(selected, dim)
    return plan


def _stats(done: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if not done:
        zero = torch.zeros(())
        return {"units": zero, "projected": zero, "max_unit_norm": zero}
    norms = torch.cat([n.float() for n, _ in done])
    return {
        "units": torch.tensor(float(norms.numel())),
        "projected": torch.cat([s != 1 for _, s in done]).sum(),
        "max_unit_norm": torch.where(torch.isfinite(norms), norms, 0.0).amax(),
    }


def max_norm_(
    params: Params, max_norm: float = 3.0, *, dim: Dim = "unit", return_stats: bool = False
) -> dict[str, torch.Tensor] | None:
    """Project each unit of each tensor into the ball ``‖w‖₂ ≤ max_norm``, in place.

    Args:
        params: a tensor, an iterable of tensors, or a module (then its ``"weights"``, each
            with its layer's unit dim, e.g. dim 1 for ``ConvTranspose``), as
            ``torch.nn.utils.clip_grad_norm_`` accepts.
        max_norm: the radius r > 0.
        dim: ``"unit"`` (dim 0 is the unit, the norm runs over the other dims), ``None`` (the
            whole tensor is one vector), or the dim(s) to reduce over explicitly.
        return_stats: also return diagnostics.

    Returns:
        ``None``, or with ``return_stats`` tensors (no host sync): ``units`` and ``projected``
        (counts) and ``max_unit_norm`` (largest norm before projection, non-finite ignored).

    Raises:
        ValueError: for ``max_norm <= 0``, NaN or inf, or a bad ``dim``.

    Example:
        >>> w = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
        >>> _ = max_norm_(w, 1.0)
        >>> w
        tensor([[0.6000, 0.8000],
                [0.3000, 0.4000]])

    Reference:
        Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from Overfitting",
        JMLR 2014, section 5.1.
    """
    radius = check_positive("max_norm", max_norm)
    done = [bucket.rescale_(radius) for bucket in _cached_plan(params, _check_dim(dim))]
    return _stats(done) if return_stats else None


def unit_norm_(params: Params, *, dim: Dim = "unit") -> None:
    """Rescale each unit to norm 1, in place. Zero and non-finite units are left unchanged.

    Args:
        params: as in :func:`max_norm_`.
        dim: as in :func:`max_norm_`.

    Raises:
        ValueError: for a bad ``dim``.

    Example:
        >>> w = torch.tensor([[3.0, 4.0]]); unit_norm_(w); w
        tensor([[0.6000, 0.8000]])
    """
    for bucket in _cached_plan(params, _check_dim(dim)):
        bucket.rescale_(None)


@torch.no_grad()
def non_neg_(params: Params) -> None:
    """Clamp every weight to ``>= 0``, in place (NaN stays NaN).

    Args:
        params: as in :func:`max_norm_`.

    Example:
        >>> w = torch.tensor([-1.0, 2.0]); non_neg_(w); w
        tensor([0., 2.])
    """
    tensors = [s.param for s in resolve_params(params)]
    if tensors:
        foreach_clamp_min_(tensors, 0.0)


class WeightConstraintCallback(ParamCallback):
    """Project the selected parameters onto a constraint set after every real optimizer step.

    The projection runs in an optimizer step post-hook, so it happens once per real step (not
    per micro-batch under gradient accumulation) and never on a step that AMP's ``GradScaler``
    skipped for inf/NaN gradients. Parameters that become trainable later (``BackboneFinetuning``,
    ``optimizer.add_param_group``) are constrained from that step on.

    Args:
        constraint: ``"max_norm"``, ``"unit_norm"`` or ``"non_neg"``.
        max_norm: the radius r > 0 for ``"max_norm"``.
        dim: ``"unit"``, ``None`` or explicit dims (see :func:`max_norm_`).
        params: ``"weights"`` (default), ``"all"`` or a ``ParamSelection``.

    Raises:
        ValueError: for an unknown constraint, ``max_norm <= 0`` (or NaN/inf), a bad ``dim`` or
            an unknown selector.
        RuntimeError: at fit start, if the selection matches no parameter of an optimizer.

    Example:
        >>> trainer = pl.Trainer(callbacks=[WeightConstraintCallback("non_neg")])

    Reference:
        Srivastava et al. 2014 (max-norm); Keras ``keras.constraints``.
    """

    def __init__(
        self,
        constraint: str = "max_norm",
        *,
        max_norm: float = 3.0,
        dim: str | int | tuple[int, ...] | None = "unit",
        params: str | ParamSelection = "weights",
    ) -> None:
        self.constraint = check_choice("constraint", constraint, _CONSTRAINTS)
        self.max_norm = check_positive("max_norm", max_norm)
        self.dim = _check_dim(dim)
        super().__init__(params, after_step=True)
        self._done: list[tuple[torch.Tensor, torch.Tensor]] = []  # (norms, scales) to log

    @override
    def check_strategy(self, trainer: pl.Trainer) -> None:
        super().check_strategy(trainer)
        if self.dim != "unit" and self.constraint != "non_neg":
            name = f"{type(self).__name__}(dim={self.dim!r})"
            why = "norms over dims other than the dim-0 units span shards (use dim='unit')"
            refuse_strategies(trainer, name, ("ModelParallelStrategy",), why)

    @override
    def prepare(self, selected: list[SelectedParam]) -> Any:
        return (
            super().prepare(selected) if self.constraint == "non_neg" else _plan(selected, self.dim)
        )

    @override
    def after_step(self, groups: list[Group]) -> None:
        if self.constraint == "non_neg":
            non_neg_([t for _, tensors in groups for t in tensors])
            return
        radius = self.max_norm if self.constraint == "max_norm" else None
        done = [bucket.rescale_(radius) for _, plan in groups for bucket in plan]
        # on logging steps, keep the stats for `on_train_batch_end` (the buffers are reused: copy)
        trainer = attached_trainer(self._module)
        if self.constraint == "max_norm" and trainer is not None and is_logging_step(trainer):
            self._done += [(norms.clone(), scales) for norms, scales in done]

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        if self._done:
            stats, self._done = _stats(self._done), []
            fraction = stats["projected"] / stats["units"]
            log_scalars(pl_module, {"reg/max_norm/projected_fraction": fraction})
            log_scalars(pl_module, {"reg/max_norm/max_unit_norm": stats["max_unit_norm"]})


class MaxNormCallback(WeightConstraintCallback):
    """Max-norm constraint: after every real step, each unit's incoming weights satisfy
    ``‖w‖₂ ≤ max_norm``.

    Logs ``reg/max_norm/projected_fraction`` (units projected at the step) and
    ``reg/max_norm/max_unit_norm`` (largest unit norm before projection) on logging steps.

    Args:
        max_norm: the radius r > 0 (Srivastava et al. used 3-4 with dropout).
        dim: ``"unit"`` (dim 0 is the unit; Keras' default ``axis=0`` on its (in, out) kernels),
            ``None`` for the whole tensor, or explicit dims to reduce over.
        params: ``"weights"`` (default), ``"all"`` or a ``ParamSelection``.

    Raises:
        ValueError: for ``max_norm <= 0``, NaN or inf, a bad ``dim`` or an unknown selector.
        RuntimeError: at fit start, if the selection matches no parameter.

    Example:
        >>> trainer = pl.Trainer(callbacks=[MaxNormCallback(3.0)])

    Reference:
        Srivastava, Hinton, Krizhevsky, Sutskever & Salakhutdinov, "Dropout: A Simple Way to
        Prevent Neural Networks from Overfitting", JMLR 2014.
    """

    def __init__(
        self,
        max_norm: float = 3.0,
        *,
        dim: str | int | tuple[int, ...] | None = "unit",
        params: str | ParamSelection = "weights",
    ) -> None:
        super().__init__("max_norm", max_norm=max_norm, dim=dim, params=params)
