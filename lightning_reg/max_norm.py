"""Max-norm and other weight constraints, projected after every real optimizer step.

The reference constrains each weight vector to a ball, ``‖w‖₂ ≤ r``, and projects it back when
an update leaves the ball. In PyTorch layout a *unit* is dim 0 of a weight (an output neuron or
a filter), so the unit's incoming weights are the rest of the tensor: dim 1 for ``Linear``, dims
1.. for ``Conv``; ``ConvTranspose`` weights are ``(in, out, ...)``, so their unit is dim 1.
``dim=None`` treats the whole tensor as one vector.

Projection is batched: small tensors are bucketed by (device, dtype, unit length) so that each
bucket's unit norms come from one kernel (accumulated in float32 or wider), and each bucket's
scale factors are applied with one foreach multiply. Units already inside the ball are
multiplied by exactly 1.0, so they stay unchanged bit for bit. A unit whose norm is NaN or
infinite is left alone: a constraint never turns a non-finite weight into a number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from lightning_reg.core.compat import foreach_clamp_min_, foreach_mul_
from lightning_reg.core.logging import is_logging_step, log_scalars
from lightning_reg.core.param_callback import Group, ParamCallback, resolve_params
from lightning_reg.core.params import ParamSelection, SelectedParam
from lightning_reg.core.strategies import refuse_strategies
from lightning_reg.core.validation import check_choice, check_positive

__all__ = [
    "MaxNormCallback",
    "WeightConstraintCallback",
    "max_norm_",
    "non_neg_",
    "unit_norm_",
]

Dim = str | int | tuple[int, ...] | None
Params = torch.Tensor | nn.Module | Iterable[torch.Tensor]
#: The tensors of one (device, dtype), as segments of equal unit length that share one norm
#: kernel: (tensor, permutation putting the unit dims first or None, shape of its scales).
Bucket = list[list[tuple[torch.Tensor, tuple[int, ...] | None, list[int]]]]
_CONSTRAINTS = ("max_norm", "unit_norm", "non_neg")
_CAT_NUMEL = 1 << 14  # smaller tensors share one norm kernel (through a copy), larger get their own


def _check_dim(dim: Any) -> Dim:
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    if dim is None or dim == "unit" or (all(type(d) is int for d in dims) and dims):
        return tuple(dim) if isinstance(dim, list) else dim
    raise ValueError(f"`dim` must be 'unit', None, an int or a tuple of ints, got {dim!r}")


def _plan(selected: Iterable[SelectedParam], dim: Dim) -> list[Bucket]:
    """Bucket tensors by (device, dtype); small ones of equal unit length share a segment."""
    buckets: dict[tuple, dict[tuple, list]] = {}
    for s in selected:
        t, numel = s.param, s.param.numel()
        if numel == 0:
            continue
        if dim == "unit" and s.unit_dim == 0 and t.ndim:  # the common case, without permutes
            order, shape = None, [t.shape[0]] + [1] * (t.ndim - 1)
        else:
            if dim is None or dim == "unit":
                reduce = tuple(d for d in range(t.ndim) if dim is None or d != s.unit_dim)
            else:
                dims = (dim,) if isinstance(dim, int) else dim
                reduce = tuple(sorted({d % t.ndim for d in dims}))
            order = tuple(d for d in range(t.ndim) if d not in reduce) + reduce
            order = None if order == tuple(range(t.ndim)) else order
            shape = [1 if d in reduce else n for d, n in enumerate(t.shape)]
        key = (numel // math.prod(shape), numel > _CAT_NUMEL and id(t))
        buckets.setdefault((t.device, t.dtype), {}).setdefault(key, []).append((t, order, shape))
    return [list(segments.values()) for segments in buckets.values()]


@torch.no_grad()
def _rescale_(
    plan: list[Bucket], scale_fn: Callable[[torch.Tensor], torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Multiply every unit by ``scale_fn(its norm)`` in place; return ``(norms, scales)``."""
    out = []
    for bucket in plan:
        items = [item for segment in bucket for item in segment]
        dtype = items[0][0].dtype
        acc = torch.promote_types(dtype, torch.float32)
        norms, counts = [], []
        for segment in bucket:
            length = segment[0][0].numel() // math.prod(segment[0][2])
            units = [(t if o is None else t.permute(o)).reshape(-1, length) for t, o, _ in segment]
            rows = units[0] if len(units) == 1 else torch.cat(units)
            norms.append(torch.linalg.vector_norm(rows, dim=1, dtype=acc))
            counts.extend(u.shape[0] for u in units)
        flat = norms[0] if len(norms) == 1 else torch.cat(norms)
        scale = scale_fn(flat)
        pieces = scale.to(dtype).split(counts)
        foreach_mul_([t for t, _, _ in items], [p.view(sh) for p, (_, _, sh) in zip(pieces, items)])
        out.append((flat, scale))
    return out


def _shrink_to(radius: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def shrink(norms: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.isfinite(norms) & (norms > radius), radius / norms, 1.0)

    return shrink


def _to_unit(norms: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(norms) & (norms > 0), 1.0 / norms, 1.0)


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
    params: Params,
    max_norm: float = 3.0,
    *,
    dim: Dim = "unit",
    return_stats: bool = False,
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
    shrink = _shrink_to(check_positive("max_norm", max_norm))
    done = _rescale_(_plan(resolve_params(params), _check_dim(dim)), shrink)
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
    _rescale_(_plan(resolve_params(params), _check_dim(dim)), _to_unit)


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
        self._want_stats = False
        self._stats: list[dict[str, torch.Tensor]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(constraint=self.constraint, max_norm=self.max_norm)

    @override
    def check_strategy(self, trainer: pl.Trainer) -> None:
        super().check_strategy(trainer)
        if self.dim != "unit" and self.constraint != "non_neg":
            refuse_strategies(
                trainer,
                f"{type(self).__name__}(dim={self.dim!r})",
                ("ModelParallelStrategy",),
                "norms over dims other than the dim-0 units span shards (use dim='unit')",
            )

    @override
    def prepare(self, selected: list[SelectedParam]) -> Any:
        if self.constraint == "non_neg":
            return [s.param for s in selected]
        return _plan(selected, self.dim)

    @override
    def after_step(self, groups: list[Group]) -> None:
        if self.constraint == "non_neg":
            non_neg_([t for _, tensors in groups for t in tensors])
            return
        fn = _shrink_to(self.max_norm) if self.constraint == "max_norm" else _to_unit
        done = [d for _, plan in groups for d in _rescale_(plan, fn)]
        if self._want_stats and self.constraint == "max_norm":
            self._stats.append(_stats(done))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._want_stats = is_logging_step(trainer)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._stats:
            return
        stats, self._stats = self._stats, []
        units = max(sum(float(s["units"]) for s in stats), 1.0)
        projected = torch.stack([s["projected"].float() for s in stats]).sum()
        largest = torch.stack([s["max_unit_norm"] for s in stats]).amax()
        log_scalars(pl_module, {"reg/max_norm/projected_fraction": projected / units})
        log_scalars(pl_module, {"reg/max_norm/max_unit_norm": largest})

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._stats = []


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
