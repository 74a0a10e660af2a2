"""Max-norm and other weight constraints, projected after every real optimizer step.

The reference constrains each weight vector to a ball, ``‖w‖₂ ≤ r``, and projects it back when
an update leaves the ball. In PyTorch layout a *unit* is dim 0 of a weight (an output neuron or
a filter), so the unit's incoming weights are the rest of the tensor: dim 1 for ``Linear``, dims
1.. for ``Conv``. ``dim=None`` treats the whole tensor as one vector.

Projection is batched: unit norms are read straight from each parameter, every scale factor is
computed in one flat tensor and applied with one ``torch._foreach_mul_``; the units outside
the ball are scaled by ``r/‖w‖``. Units already inside the ball are
multiplied by exactly 1.0, so they stay unchanged bit for bit. A unit whose norm is NaN or
infinite is left alone: a constraint never turns a non-finite weight into a number.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_reg.core.hooks import OptimizerStepHooks, real_optimizers
from lightning_reg.core.logging import is_logging_step, log_scalars
from lightning_reg.core.params import ParamSelection, groups_by_optimizer
from lightning_reg.core.strategies import FLAT_SHARDED, refuse_strategies
from lightning_reg.core.validation import check_choice, check_positive

__all__ = [
    "MaxNormCallback",
    "WeightConstraintCallback",
    "max_norm_",
    "non_neg_",
    "unit_norm_",
]

Dim = str | int | tuple[int, ...] | None
_CONSTRAINTS = ("max_norm", "unit_norm", "non_neg")


def _check_dim(dim: Any) -> Dim:
    if dim is None or dim == "unit":
        return dim
    if isinstance(dim, int) and not isinstance(dim, bool):
        return dim
    if (
        isinstance(dim, (tuple, list))
        and dim
        and all(isinstance(d, int) and not isinstance(d, bool) for d in dim)
    ):
        return tuple(dim)
    raise ValueError(f"`dim` must be 'unit', None, an int or a tuple of ints, got {dim!r}")


def _reduce_dims(ndim: int, dim: Dim) -> tuple[int, ...]:
    """The dims of a tensor that a unit norm reduces over (empty: each element is a unit)."""
    if dim is None:
        return tuple(range(ndim))
    if dim == "unit":
        return tuple(range(1, ndim))
    dims = (dim,) if isinstance(dim, int) else dim
    return tuple(d % ndim for d in dims)


def _unit_scales(
    params: Iterable[torch.Tensor], dim: Dim, scale_fn: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Rescale every unit of ``params`` by ``scale_fn(norms)``, in place and batched.

    Norms are read per tensor straight from the parameter (no copy); all scale factors of a
    (device, dtype) bucket are computed in one flat tensor and applied with one foreach
    multiply. Yields ``(flat_norms, flat_scale)`` per bucket for diagnostics.
    """
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        buckets.setdefault((p.device, p.dtype), []).append(p.detach())
    for tensors in buckets.values():
        norms = []
        for t in tensors:
            dims = _reduce_dims(t.ndim, dim)
            if dims:
                norms.append(
                    torch.linalg.vector_norm(t, dim=dims, keepdim=True, dtype=torch.float32)
                )
            else:
                norms.append(t.abs().float())
        flat = torch.cat([n.reshape(-1) for n in norms])
        scale = scale_fn(flat)
        pieces = scale.to(tensors[0].dtype).split([n.numel() for n in norms])
        torch._foreach_mul_(tensors, [s.view(n.shape) for s, n in zip(pieces, norms)])
        yield flat, scale


def max_norm_(
    params: Iterable[torch.Tensor],
    max_norm: float = 3.0,
    *,
    dim: Dim = "unit",
    return_stats: bool = False,
) -> dict[str, torch.Tensor] | None:
    """Project each unit of each tensor into the ball ``‖w‖₂ ≤ max_norm``, in place.

    Args:
        params: tensors (parameters) to constrain.
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
        >>> _ = max_norm_([w], 1.0)
        >>> w
        tensor([[0.6000, 0.8000],
                [0.3000, 0.4000]])

    Reference:
        Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from Overfitting",
        JMLR 2014, section 5.1.
    """
    radius = check_positive("max_norm", max_norm)
    dim = _check_dim(dim)
    units = 0
    projected: list[torch.Tensor] = []
    largest: list[torch.Tensor] = []

    def shrink(norms: torch.Tensor) -> torch.Tensor:
        outside = torch.isfinite(norms) & (norms > radius)
        return torch.where(outside, radius / norms, 1.0)

    for flat, scale in _unit_scales(params, dim, shrink):
        if return_stats:
            units += flat.numel()
            projected.append((scale != 1).sum())
            largest.append(torch.where(torch.isfinite(flat), flat, 0.0).amax())
    if not return_stats:
        return None
    if not projected:
        zero = torch.zeros(())
        return {"units": zero, "projected": zero, "max_unit_norm": zero}
    return {
        "units": torch.tensor(float(units)),
        "projected": torch.stack(projected).sum(),
        "max_unit_norm": torch.stack(largest).amax(),
    }


def unit_norm_(params: Iterable[torch.Tensor], *, dim: Dim = "unit") -> None:
    """Rescale each unit to norm 1, in place. Zero and non-finite units are left unchanged.

    Example:
        >>> w = torch.tensor([[3.0, 4.0]]); unit_norm_([w]); w
        tensor([[0.6000, 0.8000]])
    """
    dim = _check_dim(dim)

    def to_unit(norms: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.isfinite(norms) & (norms > 0), 1.0 / norms, 1.0)

    for _ in _unit_scales(params, dim, to_unit):
        pass


def non_neg_(params: Iterable[torch.Tensor]) -> None:
    """Clamp every weight to ``>= 0``, in place (NaN stays NaN).

    Example:
        >>> w = torch.tensor([-1.0, 2.0]); non_neg_([w]); w
        tensor([0., 2.])
    """
    tensors = [p.detach() for p in params]
    if tensors:
        torch._foreach_clamp_min_(tensors, 0.0)


class WeightConstraintCallback(Callback):
    """Project the selected parameters onto a constraint set after every real optimizer step.

    The projection runs in an optimizer step post-hook, so it happens once per real step (not
    per micro-batch under gradient accumulation) and never on a step that AMP's ``GradScaler``
    skipped for inf/NaN gradients.

    Args:
        constraint: ``"max_norm"``, ``"unit_norm"`` or ``"non_neg"``.
        max_norm: the radius r > 0 for ``"max_norm"``.
        dim: ``"unit"``, ``None`` or explicit dims (see :func:`max_norm_`).
        params: ``"weights"`` (default), ``"all"`` or a ``ParamSelection``.

    Raises:
        ValueError: for an unknown constraint, ``max_norm <= 0`` (or NaN/inf), a bad ``dim`` or
            an unknown selector.
        RuntimeError: at fit start, if the selection matches no parameter.

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
        super().__init__()
        self.constraint = check_choice("constraint", constraint, _CONSTRAINTS)
        self.max_norm = check_positive("max_norm", max_norm)
        self.dim = _check_dim(dim)
        self.selection = ParamSelection.coerce(params)
        self._params: list[torch.Tensor] = []
        self._owned: dict[int, list[torch.Tensor]] = {}
        self._want_stats = False
        self._stats: list[dict[str, torch.Tensor]] = []
        self._hooks = OptimizerStepHooks(after_step=self._project)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(constraint=self.constraint, max_norm=self.max_norm)

    def project(
        self, tensors: Sequence[torch.Tensor], *, return_stats: bool = False
    ) -> dict[str, torch.Tensor] | None:
        """Apply the constraint to ``tensors`` now; with ``return_stats``, max-norm diagnostics."""
        if self.constraint == "max_norm":
            return max_norm_(tensors, self.max_norm, dim=self.dim, return_stats=return_stats)
        if self.constraint == "unit_norm":
            unit_norm_(tensors, dim=self.dim)
        else:
            non_neg_(tensors)
        return None

    def _project(self, optimizer: torch.optim.Optimizer) -> None:
        tensors = self._owned.get(id(optimizer), [])
        stats = self.project(tensors, return_stats=self._want_stats)
        if stats is not None:
            self._stats.append(stats)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_strategies(
            trainer,
            type(self).__name__,
            FLAT_SHARDED,
            "it needs each parameter with its own shape, and this strategy flattens or "
            "partitions them (ModelParallelStrategy/FSDP2 is supported with dim='unit')",
        )
        if self.dim != "unit" and self.constraint != "non_neg":
            refuse_strategies(
                trainer,
                f"{type(self).__name__}(dim={self.dim!r})",
                ("ModelParallelStrategy",),
                "norms over dims other than the dim-0 units span shards (use dim='unit')",
            )
        self._params = self.selection.parameters(pl_module)
        grouped = groups_by_optimizer(
            self._params, real_optimizers(trainer.optimizers), type(self).__name__
        )
        self._owned = {key: [p for _, ps in groups for p in ps] for key, groups in grouped.items()}
        self._hooks.attach(trainer.optimizers)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._want_stats = self.constraint == "max_norm" and is_logging_step(trainer)

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
        units = sum(float(s["units"]) for s in self._stats)
        projected = torch.stack([s["projected"].float() for s in self._stats]).sum()
        largest = torch.stack([s["max_unit_norm"] for s in self._stats]).amax()
        self._stats = []
        log_scalars(
            pl_module,
            {
                "reg/max_norm/projected_fraction": projected.float() / max(units, 1.0),
                "reg/max_norm/max_unit_norm": largest,
            },
        )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._hooks.detach()
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
