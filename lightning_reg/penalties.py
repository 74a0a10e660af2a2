"""L1, L2 and elastic-net weight penalties.

The reference defines the penalised loss as

    L_total = L + λ1·Σ|w| + λ2/2·Σw²

The pure functions at the top compute the penalty (for users who add it to their own loss) and
apply its gradient or proximal step to many tensors at once with foreach kernels.
The callbacks below decide *when* they run:

* coupled (default): ``grad += λ2·w + λ1·sign(w)`` in ``on_before_optimizer_step``, which sees
  unscaled (AMP), accumulated gradients once per real step and runs before gradient clipping,
  exactly where a loss term's gradient would be;
* decoupled L2 (``decoupled=True``): ``w ← w·(1 − lr·λ2)`` right before the update, with the lr of
  the parameter's group, as AdamW does;
* proximal L1 (``proximal=True``): after each real step, soft-thresholding
  ``w ← sign(w)·max(|w| − lr·λ1, 0)``, which produces exact zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_reg.core import compat
from lightning_reg.core.logging import is_logging_step, log_scalars
from lightning_reg.core.param_callback import Group, ParamCallback, Params, resolve_params
from lightning_reg.core.params import ParamSelection, split_by_device_dtype
from lightning_reg.core.validation import check_non_negative

__all__ = [
    "ElasticNetCallback",
    "L1Callback",
    "L2Callback",
    "WeightPenaltyCallback",
    "add_penalty_grad_",
    "decay_weights_",
    "elastic_net_penalty",
    "l1_penalty",
    "l2_penalty",
    "soft_threshold_",
]


def _norm_sum(params: Params, ord: float) -> torch.Tensor:
    """Σ over the tensors ``t`` of ``params`` of ‖t‖_ord^ord (‖t‖_0: non-zero count),
    accumulated in float32 or wider (float64 stays float64), one foreach kernel per
    (device, dtype)."""
    total = torch.zeros(())
    for group in split_by_device_dtype(s.param for s in resolve_params(params)):
        acc = torch.promote_types(group[0].dtype, torch.float32)
        norms = torch.stack(compat.foreach_norm(group, ord, dtype=acc))
        part = norms.square().sum() if ord == 2 else norms.sum()
        total = part + total.to(part.device, torch.promote_types(total.dtype, acc))
    return total


def l1_penalty(params: Params, strength: float = 1.0) -> torch.Tensor:
    """``strength · Σ|w|`` over ``params`` (differentiable), accumulated in float32 or wider.

    Args:
        params: a tensor, an iterable of tensors, or a module (then its ``"weights"``, see
            :class:`~lightning_reg.core.ParamSelection`).
        strength: λ1 >= 0.

    Raises:
        ValueError: for a negative, NaN or infinite ``strength``.

    Example:
        >>> l1_penalty([torch.tensor([1.0, -2.0])], 0.5)
        tensor(1.5000)
    """
    return check_non_negative("strength", strength) * _norm_sum(params, 1)


def l2_penalty(params: Params, strength: float = 1.0) -> torch.Tensor:
    """``strength/2 · Σw²`` over ``params`` (differentiable); its gradient is ``strength·w``.

    Args:
        params: as in :func:`l1_penalty`.
        strength: λ2 >= 0.

    Raises:
        ValueError: for a negative, NaN or infinite ``strength``.

    Example:
        >>> l2_penalty([torch.tensor([1.0, -2.0])], 1.0)
        tensor(2.5000)
    """
    return 0.5 * check_non_negative("strength", strength) * _norm_sum(params, 2)


def elastic_net_penalty(params: Params, l1: float, l2: float) -> torch.Tensor:
    """``l1·Σ|w| + l2/2·Σw²`` over ``params`` (as in :func:`l1_penalty`).

    Raises:
        ValueError: for a negative, NaN or infinite strength.

    Example:
        >>> elastic_net_penalty([torch.tensor([1.0, -2.0])], 1.0, 1.0)
        tensor(5.5000)

    Reference:
        Zou & Hastie, "Regularization and Variable Selection via the Elastic Net", 2005.
    """
    tensors = [s.param for s in resolve_params(params)]
    return l1_penalty(tensors, l1) + l2_penalty(tensors, l2)


@torch.no_grad()
def add_penalty_grad_(params: Sequence[torch.Tensor], l1: float = 0.0, l2: float = 0.0) -> None:
    """In place, ``p.grad += l2·p + l1·sign(p)`` for every ``p`` that has a gradient.

    ``sign(0) = 0``. Uses one foreach kernel per (device, dtype) group.

    Example:
        >>> p = torch.nn.Parameter(torch.tensor([2.0, 0.0])); p.grad = torch.zeros(2)
        >>> add_penalty_grad_([p], l1=1.0, l2=0.5); p.grad
        tensor([2., 0.])
    """
    for ps in split_by_device_dtype(p for p in params if p.grad is not None):
        if l2:
            compat.foreach_add_([p.grad for p in ps], ps, alpha=l2)
        if l1:
            compat.foreach_add_([p.grad for p in ps], compat.foreach_sign(ps), alpha=l1)


@torch.no_grad()
def decay_weights_(params: Sequence[torch.Tensor], factor: float | torch.Tensor) -> None:
    """In place, ``p ← p · factor`` (decoupled weight decay uses ``factor = 1 − lr·λ``).

    Example:
        >>> w = torch.ones(2); decay_weights_([w], 0.5); w
        tensor([0.5000, 0.5000])
    """
    if params:
        compat.foreach_mul_(list(params), factor)


@torch.no_grad()
def soft_threshold_(params: Sequence[torch.Tensor], threshold: float | torch.Tensor) -> None:
    """In place, ``p ← sign(p)·max(|p| − threshold, 0)``, the proximal step of ``threshold·|p|``.

    Computed as ``p − clamp(p, −t, t)``: weights inside ``[−t, t]`` become exactly zero and NaN
    stays NaN.

    Example:
        >>> w = torch.tensor([0.5, -2.0]); soft_threshold_([w], 1.0); w
        tensor([ 0., -1.])
    """
    threshold, ps = float(threshold), list(params)  # capturable optimizers keep lr as a tensor
    if ps:
        clipped = compat.foreach_clamp_min(ps, -threshold)
        compat.foreach_clamp_max_(clipped, threshold)
        compat.foreach_sub_(ps, clipped)


class WeightPenaltyCallback(ParamCallback):
    """Elastic-net family weight penalty: ``λ1·Σ|w| + λ2/2·Σw²`` on the selected parameters.

    The selection is resolved again whenever what is trainable changes (``BackboneFinetuning``,
    ``optimizer.add_param_group``), so newly trainable weights are penalized from that step.

    Args:
        l1: λ1 >= 0, the L1 strength.
        l2: λ2 >= 0, the L2 strength.
        proximal: apply the L1 part as soft-thresholding after each real step (exact zeros)
            instead of adding ``λ1·sign(w)`` to the gradient.
        decoupled: apply the L2 part as ``w ← w·(1 − lr·λ2)`` before each update (AdamW style)
            instead of adding ``λ2·w`` to the gradient.
        params: ``"weights"`` (the library's no-decay rule), ``"all"`` or a ``ParamSelection``.
        name: the technique name in logged keys ``reg/<name>/...``.

    Raises:
        ValueError: for negative, NaN or infinite strengths, or an unknown ``params`` preset.
        RuntimeError: at fit start, if the selection matches no parameter of an optimizer.

    Example:
        >>> trainer = pl.Trainer(callbacks=[WeightPenaltyCallback(l1=1e-5, l2=1e-4)])

    Reference:
        Krogh & Hertz, "A Simple Weight Decay Can Improve Generalization", NeurIPS 1991;
        Tibshirani, "Regression Shrinkage and Selection via the Lasso", 1996;
        Zou & Hastie, "Regularization and Variable Selection via the Elastic Net", 2005;
        Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
    """

    def __init__(
        self,
        l1: float = 0.0,
        l2: float = 0.0,
        *,
        proximal: bool = False,
        decoupled: bool = False,
        params: str | ParamSelection = "weights",
        name: str = "elastic_net",
    ) -> None:
        self.l1 = check_non_negative("l1", l1)
        self.l2 = check_non_negative("l2", l2)
        if proximal and not self.l1:
            raise ValueError("`proximal=True` needs an L1 strength `l1` > 0, got l1=0")
        if decoupled and not self.l2:
            raise ValueError("`decoupled=True` needs an L2 strength `l2` > 0, got l2=0")
        self.proximal = bool(proximal)
        self.decoupled = bool(decoupled)
        self.name = name
        super().__init__(params, before_step=self.decoupled, after_step=self.proximal)

    @override
    def before_step(self, groups: list[Group]) -> None:
        for group, tensors in groups:
            decay_weights_([p for p in tensors if p.grad is not None], 1.0 - group["lr"] * self.l2)

    @override
    def after_step(self, groups: list[Group]) -> None:
        for group, tensors in groups:
            soft_threshold_(tensors, group["lr"] * self.l1)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        l1, l2 = 0.0 if self.proximal else self.l1, 0.0 if self.decoupled else self.l2
        if l1 or l2:  # the parts not applied as a proximal or decoupled step
            for _, tensors in self.groups(optimizer):
                add_penalty_grad_(tensors, l1=l1, l2=l2)

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
        tensors = [s.param.detach() for s in self.selected(pl_module)]
        values = {f"reg/{self.name}/penalty": elastic_net_penalty(tensors, self.l1, self.l2)}
        if self.l1 and tensors:  # ‖t‖_0 counts the non-zero entries
            numel = sum(t.numel() for t in tensors)
            values[f"reg/{self.name}/zero_fraction"] = 1.0 - _norm_sum(tensors, 0) / numel
        log_scalars(pl_module, values)


class L2Callback(WeightPenaltyCallback):
    """L2 regularization / weight decay: ``λ/2·Σw²``, gradient ``λ·w``.

    ``SGD + L2Callback(λ, params="all")`` equals ``SGD(weight_decay=λ)``;
    ``Adam + L2Callback(λ, decoupled=True, params="all")`` equals ``AdamW(weight_decay=λ)``.

    Args:
        strength: λ >= 0.
        decoupled: AdamW-style ``w ← w·(1 − lr·λ)`` before each update instead of a gradient term.
        params: ``"weights"`` (default: no biases, no norm parameters), ``"all"`` or a
            ``ParamSelection``.

    Raises:
        ValueError: for a negative, NaN or infinite ``strength`` or an unknown selector.

    Example:
        >>> trainer = pl.Trainer(callbacks=[L2Callback(1e-4)])

    Reference:
        Krogh & Hertz 1991; Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019.
    """

    def __init__(
        self, strength: float, *, decoupled: bool = False, params: str | ParamSelection = "weights"
    ) -> None:
        check_non_negative("strength", strength)
        super().__init__(
            l2=strength, decoupled=decoupled and strength > 0, params=params, name="l2"
        )
        self.strength = self.l2


class L1Callback(WeightPenaltyCallback):
    """L1 regularization (lasso): ``λ·Σ|w|``, gradient ``λ·sign(w)``.

    Only ``proximal=True`` (soft-thresholding after each step) gives exact zeros; the coupled
    subgradient makes weights oscillate around zero. Logs ``reg/l1/zero_fraction``.

    Args:
        strength: λ >= 0.
        proximal: soft-threshold ``w ← sign(w)·max(|w| − lr·λ, 0)`` after each real step.
        params: ``"weights"``, ``"all"`` or a ``ParamSelection``.

    Raises:
        ValueError: for a negative, NaN or infinite ``strength`` or an unknown selector.

    Example:
        >>> trainer = pl.Trainer(callbacks=[L1Callback(1e-4, proximal=True)])

    Reference:
        Tibshirani 1996; Duchi & Singer, "Efficient Online and Batch Learning Using Forward
        Backward Splitting", JMLR 2009.
    """

    def __init__(
        self, strength: float, *, proximal: bool = False, params: str | ParamSelection = "weights"
    ) -> None:
        check_non_negative("strength", strength)
        super().__init__(l1=strength, proximal=proximal and strength > 0, params=params, name="l1")
        self.strength = self.l1


class ElasticNetCallback(WeightPenaltyCallback):
    """Elastic net: ``λ1·Σ|w| + λ2/2·Σw²``.

    Args:
        l1: λ1 >= 0.
        l2: λ2 >= 0.
        proximal: apply the L1 part by soft-thresholding after each real step.
        params: ``"weights"``, ``"all"`` or a ``ParamSelection``.

    Raises:
        ValueError: for negative, NaN or infinite strengths or an unknown selector.

    Example:
        >>> trainer = pl.Trainer(callbacks=[ElasticNetCallback(1e-5, 1e-4)])

    Reference:
        Zou & Hastie, "Regularization and Variable Selection via the Elastic Net", 2005.
    """

    def __init__(
        self,
        l1: float,
        l2: float,
        *,
        proximal: bool = False,
        params: str | ParamSelection = "weights",
    ) -> None:
        super().__init__(l1=l1, l2=l2, proximal=proximal and l1 > 0, params=params)
