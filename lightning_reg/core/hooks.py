"""Run code around *real* optimizer steps.

Lightning has no after-step callback hook, and ``on_train_batch_end`` also fires on
micro-batches and on steps that AMP's ``GradScaler`` skipped. The reliable place is the
optimizer itself: ``Optimizer.register_step_pre_hook`` / ``register_step_post_hook``.
``GradScaler.step`` does not call ``optimizer.step()`` on a skipped step, so neither hook runs.

One trap: without AMP, Lightning calls ``optimizer.step(closure=...)`` and the forward and
backward run *inside* that call, so a plain pre-hook runs before the gradients exist.
:class:`OptimizerStepHooks` therefore wraps the closure: its ``before_step`` callback runs after
the closure has produced the gradients and before the update, with or without a closure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

StepFn = Callable[[torch.optim.Optimizer], None]


def real_optimizers(optimizers: Iterable[Any]) -> list[torch.optim.Optimizer]:
    """Unwrap ``LightningOptimizer`` objects to the ``torch.optim.Optimizer`` inside."""
    return [
        opt if isinstance(opt, torch.optim.Optimizer) else getattr(opt, "optimizer", opt)
        for opt in optimizers
    ]


class OptimizerStepHooks:
    """Attach ``before_step`` / ``after_step`` callbacks to optimizers' real steps.

    ``before_step(optimizer)`` runs once the gradients of this step exist (after the closure,
    if Lightning passed one) and before the parameters change. ``after_step(optimizer)`` runs
    after the update. Neither runs on a step that ``GradScaler`` skipped.

    Args:
        before_step: callback run between the gradients and the update, or ``None``.
        after_step: callback run after the update, or ``None``.

    Example:
        >>> hooks = OptimizerStepHooks(after_step=lambda opt: None)
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
        >>> hooks.attach([opt]); hooks.detach()
    """

    def __init__(self, before_step: StepFn | None = None, after_step: StepFn | None = None) -> None:
        self.before_step = before_step
        self.after_step = after_step
        self._handles: list[RemovableHandle] = []

    def attach(self, optimizers: Iterable[Any]) -> None:
        """Register the hooks on each optimizer (``LightningOptimizer`` is unwrapped)."""
        self.detach()
        for optimizer in real_optimizers(optimizers):
            if self.before_step is not None:
                self._handles.append(optimizer.register_step_pre_hook(self._pre_hook))
            if self.after_step is not None:
                self._handles.append(optimizer.register_step_post_hook(self._post_hook))

    def detach(self) -> None:
        """Remove every hook this object registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre_hook(
        self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict] | None:
        before_step: StepFn = self.before_step  # type: ignore[assignment]
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0]: optimizer
        if closure is None:
            before_step(optimizer)
            return None

        def closure_then_hook() -> Any:
            with torch.enable_grad():
                loss = closure()
            before_step(optimizer)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_hook}
        return (args[0], closure_then_hook, *args[2:]), kwargs

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self.after_step(optimizer)  # type: ignore[misc]
