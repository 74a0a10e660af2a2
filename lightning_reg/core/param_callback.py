"""The lifecycle every parameter-based callback shares, owned by one base class.

:class:`ParamCallback` refuses the strategies it cannot support, resolves its
:class:`~lightning_reg.core.params.ParamSelection`, groups the selected parameters by optimizer
param group (for each group's ``lr``), attaches and detaches the optimizer step hooks, and
resolves the selection again whenever what is trainable changes: a parameter's
``requires_grad`` flips, or a param group is added (Lightning's ``BackboneFinetuning`` does
both). The checks are cheap, so they run at each step: the ``requires_grad`` flags of the
model's parameters (kept in a list, so the model is not walked), a process-wide count of
parameter and submodule registrations (torch's global registration hooks), and a signature of
the optimizer's parameters; the selection is recomputed only when one changes. Subclasses say
only what happens at a step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook as _on_module
from torch.nn.modules.module import register_module_parameter_registration_hook as _on_param
from typing_extensions import override

from lightning_reg.core.hooks import OptimizerStepHooks, real_optimizers
from lightning_reg.core.params import ParamSelection, SelectedParam
from lightning_reg.core.strategies import FLAT_SHARDED, refuse_strategies

__all__ = ["Group", "ParamCallback", "Params", "resolve_params"]

#: An optimizer param group (for its ``lr``) and what :meth:`ParamCallback.prepare` made of
#: the selected parameters in it.
Group = tuple[dict[str, Any], Any]


#: What the pure functions accept: a tensor, an iterable of tensors, or a module.
Params = torch.Tensor | nn.Module | Iterable[torch.Tensor]


def resolve_params(params: Params) -> list[SelectedParam]:
    """What a pure function acts on: a tensor, an iterable of tensors, or a module's "weights"."""
    if isinstance(params, nn.Module):
        return ParamSelection("weights").select(params, allow_empty=True)
    if isinstance(params, torch.Tensor):
        params = [params]
    return [SelectedParam("", p) for p in params]


#: How many parameters and submodules were registered while a ParamCallback was fitting
#: (assigning one as an attribute registers it): a model whose parameter set changed mid-fit
#: has a new count. The global hooks that count live from fit start to teardown only.
_registrations = [0]


def _count_registration(*_: Any) -> None:
    _registrations[0] += 1


class ParamCallback(Callback):
    """Base of the callbacks that act on selected parameters around real optimizer steps.

    Subclasses override :meth:`prepare` (turn the selected parameters of one param group into
    what a step needs), and :meth:`before_step` / :meth:`after_step` (run once the step's
    gradients exist and before the update / after the update; enable them with the
    ``before_step`` / ``after_step`` arguments). :meth:`groups` gives the prepared groups of an
    optimizer at any time (coupled penalties call it in ``on_before_optimizer_step``) and
    :meth:`selected` the current selection of the model.

    Args:
        params: ``"weights"`` (the library's no-decay rule), ``"all"`` or a ``ParamSelection``.
        before_step: attach :meth:`before_step` to every optimizer.
        after_step: attach :meth:`after_step` to every optimizer.

    Raises:
        ValueError: for an unknown ``params`` preset.
        RuntimeError: at fit start, for a refused strategy, or when the selection matches no
            parameter that an optimizer holds.

    Example:
        >>> class Clamp(ParamCallback):
        ...     def after_step(self, groups):
        ...         with torch.no_grad():
        ...             for _, tensors in groups:
        ...                 for t in tensors:
        ...                     t.clamp_(-1.0, 1.0)
        >>> trainer = pl.Trainer(callbacks=[Clamp("weights", after_step=True)])

    Reference:
        Lightning's ``BaseFinetuning``, a base class that owns a callback's lifecycle.
    """

    #: Strategies refused at fit start (class names, subclasses match too).
    refused: tuple[str, ...] = FLAT_SHARDED
    refusal_reason = (
        "it needs each parameter with its own shape, and this strategy flattens or partitions "
        "them (ModelParallelStrategy/FSDP2 is supported)"
    )
    #: Whether fit start fails when no optimizer holds a selected parameter.
    needs_optimizer = True

    def __init__(
        self,
        params: str | ParamSelection = "weights",
        *,
        before_step: bool = False,
        after_step: bool = False,
    ) -> None:
        super().__init__()
        self.selection = ParamSelection.coerce(params)
        self._registration_hooks: list[Any] = []
        self._reset(None)
        self._hooks = OptimizerStepHooks(
            before_step=(lambda opt: self.before_step(self.groups(opt))) if before_step else None,
            after_step=(lambda opt: self.after_step(self.groups(opt))) if after_step else None,
        )

    def _reset(self, module: nn.Module | None) -> None:
        for handle in self._registration_hooks:
            handle.remove()
        self._registration_hooks = (
            [] if module is None else [h(_count_registration) for h in (_on_param, _on_module)]
        )
        self._module = module
        self._selected: tuple = (None, [], [], [])  # key, parameters, flags, selection
        self._groups: dict[int, tuple[list, list[Group]]] = {}

    # -- what subclasses override ----------------------------------------------------------

    def check_strategy(self, trainer: pl.Trainer) -> None:
        """Raise ``RuntimeError`` for a strategy this callback cannot support."""
        refuse_strategies(trainer, type(self).__name__, self.refused, self.refusal_reason)

    def prepare(self, selected: list[SelectedParam]) -> Any:
        """What a step needs of the selected parameters of one param group (default: tensors)."""
        return [s.param for s in selected]

    def before_step(self, groups: list[Group]) -> None:
        """Run after the gradients of a real step exist and before the update."""

    def after_step(self, groups: list[Group]) -> None:
        """Run after the update of a real step (never on a step AMP skipped)."""

    # -- the shared machinery --------------------------------------------------------------

    def selected(self, pl_module: nn.Module) -> list[SelectedParam]:
        """The selection of ``pl_module`` now, recomputed only when its parameters changed."""
        key, params, flags, selected = self._selected
        if key != (pl_module, _registrations[0]) or flags != [p.requires_grad for p in params]:
            params = list(pl_module.parameters())
            flags = [p.requires_grad for p in params]
            selected = self.selection.select(pl_module, allow_empty=True)
            self._selected = ((pl_module, _registrations[0]), params, flags, selected)
        return selected

    def groups(self, optimizer: Any) -> list[Group]:
        """The prepared, selected parameters of ``optimizer``, one entry per param group."""
        (optimizer,) = real_optimizers([optimizer])
        # What decides the groups: which tensors each group holds, and which are trainable.
        key = [[(id(p), p.requires_grad) for p in g["params"]] for g in optimizer.param_groups]
        cached = self._groups.get(id(optimizer))
        if cached is None or cached[0] != key:
            assert self._module is not None, "groups() is only available during fit"
            chosen = {id(s.param): s for s in self.selected(self._module)}
            found = []
            for group in optimizer.param_groups:
                if mine := [chosen[id(p)] for p in group["params"] if id(p) in chosen]:
                    found.append((group, self.prepare(mine)))
            cached = self._groups[id(optimizer)] = (key, found)
        return cached[1]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check_strategy(trainer)
        self._reset(pl_module)
        selected = self.selected(pl_module)
        if not self.needs_optimizer:
            return
        if not selected:
            self.selection.select(pl_module)  # raises, naming the selection and the model
        if not any([self.groups(opt) for opt in trainer.optimizers]):
            raise RuntimeError(
                f"{type(self).__name__}: no optimizer holds any of the {len(selected)} selected "
                "parameters, so it would do nothing. Check configure_optimizers or `params`."
            )
        self._hooks.attach(trainer.optimizers)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._hooks.detach()
        self._reset(None)
