"""L1, L2 and elastic-net weight penalties.

The reference defines the penalised loss as

    L_total = L + λ1·Σ|w| + λ2/2·Σw²

The pure functions at the top compute the penalty (for users who add it to their own loss) and
apply its gradient or proximal step to many tensors at once with ``torch._foreach_*`` kernels.
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

from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from lightning_reg.core.hooks import OptimizerStepHooks, real_optimizers
from lightning_reg.core.logging import is_logging_step, log_scalars
from lightning_reg.core.params import ParamSelection, groups_by_optimizer
from lightning_reg.core.strategies import FLAT_SHARDED, refuse_strategies
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

Params = nn.Module | Iterable[torch.Tensor]


def _tensors(params: Params) -> list[torch.Tensor]:
    if isinstance(params, nn.Module):
        return ParamSelection("weights").parameters(params)
    if isinstance(params, torch.Tensor):
        return [params]
    return list(params)


def _norm_sum(tensors: Sequence[torch.Tensor], ord: float) -> torch.Tensor:
    """Σ over tensors of ‖t‖_ord^ord (‖t‖_0: non-zero count), as one fp32 scalar, from one
    foreach kernel per dtype."""
    if not tensors:
        return torch.zeros(())
    total = torch.zeros((), device=tensors[0].device, dtype=torch.float32)
    for dtype in {t.dtype for t in tensors}:
        group = [t for t in tensors if t.dtype == dtype]
        norms = torch.stack(torch._foreach_norm(group, ord)).float()
        total = total + (norms.pow(2).sum() if ord == 2 else norms.sum())
    return total


def l1_penalty(params: Params, strength: float = 1.0) -> torch.Tensor:
    """``strength · Σ|w|`` over ``params`` (differentiable).

    Args:
        params: tensors, or a module (then its "weights": ndim >= 2, no norm layers).
        strength: λ1 >= 0.

    Example:
        >>> l1_penalty([torch.tensor([1.0, -2.0])], 0.5)
        tensor(1.5000)
    """
    check_non_negative("strength", strength)
    return strength * _norm_sum(_tensors(params), 1)


def l2_penalty(params: Params, strength: float = 1.0) -> torch.Tensor:
    """``strength/2 · Σw²`` over ``params`` (differentiable); its gradient is ``strength·w``.

    Example:
        >>> l2_penalty([torch.tensor([1.0, -2.0])], 1.0)
        tensor(2.5000)
    """
    check_non_negative("strength", strength)
    return 0.5 * strength * _norm_sum(_tensors(params), 2)


def elastic_net_penalty(params: Params, l1: float, l2: float) -> torch.Tensor:
    """``l1·Σ|w| + l2/2·Σw²`` over ``params`` (Zou & Hastie 2005)."""
    tensors = _tensors(params)
    return l1_penalty(tensors, l1) + l2_penalty(tensors, l2)


def add_penalty_grad_(params: Sequence[torch.Tensor], l1: float = 0.0, l2: float = 0.0) -> None:
    """In place, ``p.grad += l2·p + l1·sign(p)`` for every ``p`` that has a gradient.

    ``sign(0) = 0``. Uses one foreach kernel per (device, dtype) group.
    """
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return
    for dtype in {p.dtype for p in with_grad}:
        ps = [p.detach() for p in with_grad if p.dtype == dtype]
        grads = [p.grad for p in with_grad if p.dtype == dtype]
        if l2:
            torch._foreach_add_(grads, ps, alpha=l2)
        if l1:
            torch._foreach_add_(grads, torch._foreach_sign(ps), alpha=l1)


def decay_weights_(params: Sequence[torch.Tensor], factor: float | torch.Tensor) -> None:
    """In place, ``p ← p · factor`` (decoupled weight decay uses ``factor = 1 − lr·λ``)."""
    if params:
        torch._foreach_mul_([p.detach() for p in params], factor)


def soft_threshold_(params: Sequence[torch.Tensor], threshold: float | torch.Tensor) -> None:
    """In place, ``p ← sign(p)·max(|p| − threshold, 0)``, the proximal step of ``threshold·|p|``.

    Computed as ``p − clamp(p, −t, t)``: weights inside ``[−t, t]`` become exactly zero and NaN
    stays NaN.
    """
    if not params:
        return
    if isinstance(threshold, torch.Tensor):  # capturable optimizers keep lr as a tensor
        threshold = float(threshold)
    ps = [p.detach() for p in params]
    clipped = torch._foreach_clamp_min(ps, -threshold)
    torch._foreach_clamp_max_(clipped, threshold)
    torch._foreach_sub_(ps, clipped)


class WeightPenaltyCallback(Callback):
    """Elastic-net family weight penalty: ``λ1·Σ|w| + λ2/2·Σw²`` on the selected parameters.

    Args:
        l1: λ1 >= 0, the L1 strength.
        l2: λ2 >= 0, the L2 strength.
        proximal: apply the L1 part as soft-thresholding after each real step (exact zeros)
            instead of adding ``λ1·sign(w)`` to the gradient.
        decoupled: apply the L2 part as ``w ← w·(1 − lr·λ2)`` before each update (AdamW style)
            instead of adding ``λ2·w`` to the gradient.
        params: ``"weights"`` (ndim >= 2, no norm layers), ``"all"`` or a ``ParamSelection``.
        name: the technique name in logged keys ``reg/<name>/...``.

    Raises:
        ValueError: for negative, NaN or infinite strengths, or an unknown ``params`` preset.
        RuntimeError: at fit start, if the selection matches no parameter.

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
        super().__init__()
        self.l1 = check_non_negative("l1", l1)
        self.l2 = check_non_negative("l2", l2)
        if proximal and not self.l1:
            raise ValueError("`proximal=True` needs an L1 strength `l1` > 0, got l1=0")
        if decoupled and not self.l2:
            raise ValueError("`decoupled=True` needs an L2 strength `l2` > 0, got l2=0")
        self.proximal = bool(proximal)
        self.decoupled = bool(decoupled)
        self.selection = ParamSelection.coerce(params)
        self.name = name
        self._params: list[nn.Parameter] = []
        self._by_optimizer: dict[int, list[tuple[dict, list[torch.Tensor]]]] = {}
        self._hooks = OptimizerStepHooks(
            before_step=self._decay_before_step if self.decoupled else None,
            after_step=self._prox_after_step if self.proximal else None,
        )

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            l1=self.l1, l2=self.l2, proximal=self.proximal, decoupled=self.decoupled
        )

    # -- what happens at each real step ---------------------------------------------------

    def _groups(self, optimizer: torch.optim.Optimizer) -> list[tuple[dict, list[torch.Tensor]]]:
        return self._by_optimizer.get(id(optimizer), [])

    def _decay_before_step(self, optimizer: torch.optim.Optimizer) -> None:
        for group, tensors in self._groups(optimizer):
            with_grad = [p for p in tensors if p.grad is not None]
            decay_weights_(with_grad, 1.0 - group["lr"] * self.l2)

    def _prox_after_step(self, optimizer: torch.optim.Optimizer) -> None:
        for group, tensors in self._groups(optimizer):
            soft_threshold_(tensors, group["lr"] * self.l1)

    # -- Lightning hooks ------------------------------------------------------------------

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_strategies(
            trainer,
            type(self).__name__,
            FLAT_SHARDED,
            "it needs each parameter with its own shape, and this strategy flattens or "
            "partitions them (ModelParallelStrategy/FSDP2 is supported)",
        )
        self._params = self.selection.parameters(pl_module)
        self._by_optimizer = groups_by_optimizer(
            self._params, real_optimizers(trainer.optimizers), type(self).__name__
        )
        self._hooks.attach(trainer.optimizers)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        l1 = 0.0 if self.proximal else self.l1
        l2 = 0.0 if self.decoupled else self.l2
        if not (l1 or l2):
            return
        (opt,) = real_optimizers([optimizer])
        for _, tensors in self._groups(opt):
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
        if not is_logging_step(trainer) or not self._params:
            return
        with torch.no_grad():
            tensors = [p.detach() for p in self._params]
            values: dict[str, torch.Tensor] = {
                f"reg/{self.name}/penalty": elastic_net_penalty(tensors, self.l1, self.l2)
            }
            if self.l1:
                numel = sum(t.numel() for t in tensors)
                nonzero = _norm_sum(tensors, 0)  # ‖t‖_0 counts the non-zero entries
                values[f"reg/{self.name}/zero_fraction"] = 1.0 - nonzero / numel
        log_scalars(pl_module, values)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._hooks.detach()
        self._by_optimizer = {}


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
        self,
        strength: float,
        *,
        decoupled: bool = False,
        params: str | ParamSelection = "weights",
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
        self,
        strength: float,
        *,
        proximal: bool = False,
        params: str | ParamSelection = "weights",
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
        check_non_negative("l1", l1)
        super().__init__(l1=l1, l2=l2, proximal=proximal and l1 > 0, params=params)
