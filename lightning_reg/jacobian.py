"""Jacobian regularization and double backpropagation.

The pure functions at the top compute the penalties with ``torch.autograd.grad``:

* :func:`jacobian_penalty` estimates ``(1/B)·Σ_b ‖∂f(x_b)/∂x_b‖_F²`` for outputs ``f(x)`` of shape
  ``(B, C)``. With ``v`` uniform on the unit sphere of ``R^C``, ``E[v vᵀ] = I/C``, so
  ``C·E[‖vᵀJ‖²] = ‖J‖_F²``: ``C/n · Σ_i ‖v_iᵀJ‖²`` over ``n`` random projections is unbiased
  (Hoffman, Roberts & Yaida 2019), and each projection costs one vector-Jacobian product.
  ``n_projections="exact"`` does one vjp per output dimension (``v = e_c``) instead.
* :func:`input_gradient_penalty` is Drucker & LeCun's (1992) double-backpropagation term
  ``‖∂L/∂x‖²``: one vjp, whatever the number of classes.

Both build the graph of the gradient (``create_graph=True``), so the penalty is trainable.
Under fp16 AMP, pass the ``GradScaler``'s scale as ``grad_scale``: as in PyTorch's AMP
gradient-penalty recipe, the vjp runs on scaled ``grad_outputs`` and the gradients are unscaled
afterwards, so small input gradients do not underflow in fp16.

The LightningModule mixins below (:class:`JacobianPenaltyMixin`, :class:`InputGradientPenaltyMixin`)
decide only the weight, the scaler and the logging, then call the functions.

A note on batch coupling: the per-sample Jacobian is read off one vjp through the whole batch,
which is exact only if sample ``b``'s outputs do not depend on other samples' inputs. BatchNorm in
training mode couples samples (slightly, for large batches); the estimate then also contains
the cross-sample terms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_reg.core import compat
from lightning_reg.core.logging import is_logging_step, log_scalars
from lightning_reg.core.validation import check_choice, check_int, check_non_negative

__all__ = [
    "InputGradientPenaltyMixin",
    "JacobianPenaltyMixin",
    "input_gradient_penalty",
    "jacobian_penalty",
    "random_unit_projections",
]

_HOW_TO_FIX = (
    "make the inputs a leaf that requires grad *before* the forward pass, e.g. "
    "`x = x.detach().requires_grad_(True)` (or `self.jacobian_inputs(x)` in a LightningModule), "
    "then compute `outputs = model(x)` from that `x`"
)


def _check_projections(name: str, n_projections: Any) -> int | str:
    if isinstance(n_projections, str):
        return check_choice(name, n_projections, ("exact",))
    return check_int(name, n_projections, 1)


def _leaf(x: Tensor) -> Tensor:
    """``x.detach().requires_grad_(True)``: a leaf to differentiate the outputs against.

    Raises:
        TypeError: for integer inputs (token ids): pass the embedding output instead.
    """
    return _check_float(x).detach().requires_grad_(True)


def _check_float(inputs: Tensor) -> Tensor:
    if not (inputs.is_floating_point() or inputs.is_complex()):
        raise TypeError(
            f"`inputs` are integers ({inputs.dtype}), e.g. token ids; gradients w.r.t. them do "
            "not exist. Differentiate w.r.t. the embedding output instead, e.g. "
            "`x = self.embed(ids); x = self.jacobian_inputs(x)`, and feed `x` to the rest of the "
            "model."
        )
    return inputs


def _check_graph(inputs: Tensor, outputs: Tensor, what: str) -> None:
    if not isinstance(inputs, Tensor) or not isinstance(outputs, Tensor):
        raise TypeError(f"`inputs` and `{what}` must be tensors")
    _check_float(inputs)
    if not inputs.requires_grad:
        raise RuntimeError(
            f"`inputs` does not require grad, so ∂{what}/∂inputs is undefined: {_HOW_TO_FIX}."
        )
    if not torch.is_grad_enabled():
        raise RuntimeError(
            "gradients are disabled (torch.no_grad / inference mode), so the penalty cannot be "
            "computed. Call it in `training_step`, or wrap the forward and the penalty in "
            "`torch.enable_grad()` (for validation, also `Trainer(inference_mode=False)`)."
        )
    if not outputs.requires_grad:
        raise RuntimeError(
            f"`{what}` was not computed from `inputs` with gradients enabled: {_HOW_TO_FIX}."
        )


def _vjp_sq(y: Tensor, x: Tensor, v: Tensor, graph: bool, scale: Tensor | float | None) -> Tensor:
    """``‖vᵀ·∂y/∂x‖²`` in float32 or wider; under fp16 AMP on ``v·scale``, then unscaled."""
    v = (v if scale is None else v * scale).reshape(y.shape).to(y.dtype)
    (grad,) = torch.autograd.grad(y, x, v, retain_graph=True, create_graph=graph, allow_unused=True)
    if grad is None:
        raise RuntimeError(
            f"`outputs` were not computed from `inputs` (no autograd path): {_HOW_TO_FIX}."
        )
    grad = grad.to(torch.promote_types(grad.dtype, torch.float32))
    return (grad if scale is None else grad * (1.0 / scale)).pow(2).sum()


def random_unit_projections(
    batch: int,
    dim: int,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``batch`` float32 vectors uniform on the unit sphere of ``R^dim`` (normalised Gaussians)."""
    v = torch.randn(batch, dim, device=device, generator=generator, dtype=torch.float32)
    return v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def jacobian_penalty(
    inputs: Tensor,
    outputs: Tensor,
    *,
    n_projections: int | str = 1,
    create_graph: bool = True,
    generator: torch.Generator | None = None,
    grad_scale: Tensor | float | None = None,
) -> Tensor:
    """Estimate ``(1/B)·Σ_b ‖∂f(x_b)/∂x_b‖_F²``, the mean squared Frobenius norm of the Jacobian.

    Args:
        inputs: ``(B, ...)`` tensor that requires grad, from which ``outputs`` were computed.
        outputs: ``(B, C)`` (or ``(B, ...)``, flattened to ``C`` per sample) model outputs.
        n_projections: the number ``n >= 1`` of random unit projections per sample (the estimate
            ``C/n·Σ_i ‖v_iᵀJ‖²`` is unbiased), or ``"exact"`` for one vjp per output dimension.
        create_graph: build the graph of the gradients so the result can be backpropagated.
        generator: the ``torch.Generator`` (on ``outputs.device``) for the projections; the
            global RNG if ``None``.
        grad_scale: fp16 AMP loss scale (a float or a tensor, e.g. ``GradScaler``'s scale); the
            vjps run on ``grad_outputs·scale`` and the gradients are divided by it afterwards.

    Returns:
        A float32 (or float64) scalar tensor.

    Raises:
        ValueError: if ``n_projections`` is not an integer >= 1 or ``"exact"``, or shapes differ.
        RuntimeError: if ``inputs`` does not require grad, gradients are disabled, or
            ``outputs`` were not computed from ``inputs``; the message says how to fix it.

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> x = torch.randn(8, 4).requires_grad_(True)
        >>> exact = jacobian_penalty(x, model(x), n_projections="exact")
        >>> bool(torch.isclose(exact, model.weight.pow(2).sum()))
        True

    Reference:
        J. Hoffman, D. A. Roberts, S. Yaida, "Robust Learning with Jacobian Regularization",
        arXiv:1908.02729, 2019.
    """
    n = _check_projections("n_projections", n_projections)
    _check_graph(inputs, outputs, "outputs")
    if outputs.ndim < 1 or inputs.ndim < 1 or outputs.shape[0] != inputs.shape[0]:
        raise ValueError(
            "`outputs` must be (B, C) and `inputs` (B, ...) with the same batch size B; got "
            f"outputs {tuple(outputs.shape)} and inputs {tuple(inputs.shape)}"
        )
    if not outputs.numel():
        return outputs.new_zeros((), dtype=torch.float32)
    batch, dim, device = outputs.shape[0], outputs[0].numel(), outputs.device
    if n == "exact":  # v = e_c for each output dimension c: the sum below is exact with n = C
        n, projections = dim, torch.eye(dim, device=device)[:, None].expand(dim, batch, dim)
    else:  # n random unit vectors per sample
        v = random_unit_projections(int(n) * batch, dim, device=device, generator=generator)
        projections = v.view(int(n), batch, dim)
    squares = sum(_vjp_sq(outputs, inputs, v, create_graph, grad_scale) for v in projections)
    return squares * (dim / int(n) / batch)


def input_gradient_penalty(
    inputs: Tensor,
    loss: Tensor,
    *,
    create_graph: bool = True,
    grad_scale: Tensor | float | None = None,
) -> Tensor:
    """Double backpropagation: ``‖∂loss/∂inputs‖²``, summed over every element of ``inputs``.

    With a batch-mean loss ``L = (1/B)·Σ_b ℓ_b`` this is ``(1/B²)·Σ_b ‖∂ℓ_b/∂x_b‖²``.

    Args:
        inputs: tensor that requires grad, from which ``loss`` was computed.
        loss: a scalar loss.
        create_graph: build the graph of the gradient so the result is trainable.
        grad_scale: fp16 AMP loss scale, as for :func:`jacobian_penalty`.

    Raises:
        ValueError: if ``loss`` is not a scalar.
        RuntimeError: if ``inputs`` does not require grad or ``loss`` does not depend on it.

    Example:
        >>> x = torch.randn(4, 3).requires_grad_(True)
        >>> float(input_gradient_penalty(x, (2 * x).sum()))
        48.0

    Reference:
        H. Drucker, Y. LeCun, "Improving generalization performance using double
        backpropagation", IEEE Transactions on Neural Networks 3(6), 1992.
    """
    _check_graph(inputs, loss, "loss")
    if loss.numel() != 1:
        raise ValueError(f"`loss` must be a scalar, got shape {tuple(loss.shape)}")
    return _vjp_sq(loss, inputs, torch.ones((), device=loss.device), create_graph, grad_scale)


# --------------------------------------------------------------------------- Lightning mixins


def _weighted(
    module: Any, weight: float, key: str, penalty: Callable[..., Tensor], *args: Tensor, **kw: Any
) -> Tensor:
    """``weight · penalty(*args, grad_scale=..., **kw)``, logged unweighted as ``key``.

    ``grad_scale`` is the fp16 ``GradScaler``'s current scale (a tensor: no host sync), or
    ``None`` without one.
    """
    if weight == 0.0:
        return args[-1].new_zeros((), dtype=torch.float32)
    trainer = compat.attached_trainer(module)
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    scale = None
    if scaler is not None and scaler.is_enabled():
        scale = compat.grad_scaler_scale(scaler)
        # before the first `scaler.scale(loss)` there is no scale tensor yet: the initial scale
        scale = float(scaler.get_scale()) if scale is None else scale.detach().float()
    value = penalty(*args, grad_scale=scale, **kw)
    if getattr(trainer, "training", False) and is_logging_step(trainer):
        log_scalars(module, {key: value})
    return weight * value


def _checked(name: str, check: Callable[[str, Any], Any], default: Any) -> Any:
    """A property named ``name``, validated on assignment by ``check(name, value)``."""

    def set_value(obj: Any, value: Any) -> None:
        obj.__dict__[name] = check(name, value)

    return property(lambda obj: obj.__dict__.get(name, default), set_value)


class JacobianPenaltyMixin:
    """LightningModule mixin: ``self.jacobian_penalty(inputs, outputs)`` = weight · ‖J‖_F² estimate.

    Put it before ``LightningModule`` in the bases. In ``training_step``, make the inputs require
    grad *before* the forward, add the penalty to the loss, and return the sum::

        class Net(JacobianPenaltyMixin, pl.LightningModule):
            def __init__(self, jacobian_weight: float = 0.01):
                super().__init__()
                self.model = ...
                self.jacobian_weight = jacobian_weight

            def training_step(self, batch, batch_idx):
                x, y = batch
                x = self.jacobian_inputs(x)           # x.detach().requires_grad_(True)
                logits = self.model(x)
                loss = F.cross_entropy(logits, y)
                return loss + self.jacobian_penalty(x, logits)

    ``jacobian_inputs`` detaches, so nothing flows back into whatever produced ``x`` (data
    augmentation); it does not change the dtype: under AMP, autocast casts inside the model and
    the input gradients come back in the input's dtype. Under DDP, the penalty is part of the loss
    that DDP's backward all-reduces, so its parameter gradients are averaged over ranks like any
    loss term's (plain ``strategy="ddp"`` works: ``autograd.grad`` w.r.t. the inputs does not
    touch DDP's parameter hooks, and the final ``backward`` fires each of them once).

    Under ``precision="16-mixed"`` the GradScaler's current scale is read from
    ``self.trainer.precision_plugin.scaler`` and passed as ``grad_scale`` (PyTorch's AMP
    gradient-penalty recipe); under ``bf16-mixed`` and full precision nothing is scaled. The
    projections come from the global torch RNG on the outputs' device (seeded by
    ``seed_everything``). On logging steps of training it logs the unweighted estimate as
    ``reg/jacobian/frobenius_sq``.

    Attributes:
        jacobian_weight: the weight λ (>= 0; default 0.01). With 0 nothing is computed.
        jacobian_projections: projections per sample (>= 1) or ``"exact"`` (default 1).

    Raises:
        ValueError: when a negative weight or invalid projection count is assigned.
        RuntimeError: from :meth:`jacobian_penalty` if ``inputs`` does not require grad.

    Example:
        >>> import lightning.pytorch as pl
        >>> class Net(JacobianPenaltyMixin, pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = torch.nn.Linear(4, 3)
        ...         self.jacobian_weight = 0.1
        >>> net = Net()
        >>> x = net.jacobian_inputs(torch.randn(2, 4))
        >>> penalty = net.jacobian_penalty(x, net.layer(x), n_projections="exact")

    Reference:
        J. Hoffman, D. A. Roberts, S. Yaida, "Robust Learning with Jacobian Regularization",
        arXiv:1908.02729, 2019.
    """

    jacobian_weight = _checked("jacobian_weight", check_non_negative, 0.01)
    jacobian_projections = _checked("jacobian_projections", _check_projections, 1)

    jacobian_inputs = staticmethod(_leaf)

    def jacobian_penalty(
        self,
        inputs: Tensor,
        outputs: Tensor,
        *,
        weight: float | None = None,
        n_projections: int | str | None = None,
    ) -> Tensor:
        """``weight · jacobian_penalty(inputs, outputs)`` (defaults from the attributes)."""
        w = self.jacobian_weight if weight is None else check_non_negative("weight", weight)
        n = self.jacobian_projections if n_projections is None else n_projections
        key = "reg/jacobian/frobenius_sq"
        return _weighted(self, w, key, jacobian_penalty, inputs, outputs, n_projections=n)


class InputGradientPenaltyMixin:
    """LightningModule mixin: ``self.input_gradient_penalty(inputs, loss)`` = weight · ‖∂L/∂x‖².

    The cheaper double-backpropagation penalty (one vjp, independent of the number of classes);
    see :func:`input_gradient_penalty`. Same conventions as :class:`JacobianPenaltyMixin`
    (``self.input_gradient_inputs(x)`` before the forward; fp16 scaling from the Trainer's
    GradScaler). It logs the unweighted value as ``reg/input_gradient/norm_sq``.

    Attributes:
        input_gradient_weight: the weight λ (>= 0; default 0.01). With 0 nothing is computed.

    Raises:
        ValueError: when a negative weight is assigned.
        RuntimeError: if ``inputs`` does not require grad.

    Example:
        >>> import lightning.pytorch as pl
        >>> class Net(InputGradientPenaltyMixin, pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = torch.nn.Linear(4, 3)
        >>> net = Net()
        >>> x = net.input_gradient_inputs(torch.randn(2, 4))
        >>> penalty = net.input_gradient_penalty(x, net.layer(x).logsumexp(1).mean())

    Reference:
        H. Drucker, Y. LeCun, "Improving generalization performance using double
        backpropagation", IEEE Transactions on Neural Networks 3(6), 1992.
    """

    input_gradient_weight = _checked("input_gradient_weight", check_non_negative, 0.01)

    input_gradient_inputs = staticmethod(_leaf)

    def input_gradient_penalty(
        self, inputs: Tensor, loss: Tensor, *, weight: float | None = None
    ) -> Tensor:
        """``weight · input_gradient_penalty(inputs, loss)``."""
        w = self.input_gradient_weight if weight is None else check_non_negative("weight", weight)
        key = "reg/input_gradient/norm_sq"
        return _weighted(self, w, key, input_gradient_penalty, inputs, loss)
