"""Which parameters a technique touches.

``ParamSelection("weights")`` (the default everywhere) selects parameters with ``ndim >= 2``
that do not belong to a normalization layer: no biases, no norm affine parameters. This is the
rule timm and most recipes use for weight decay. ``"all"`` selects every trainable parameter.
Name globs and module types refine either preset.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_reg.core.validation import check_choice

__all__ = ["NORM_LAYER_TYPES", "ParamSelection", "SelectedParam"]

#: Module types whose parameters are never "weights".
NORM_LAYER_TYPES: tuple[type[nn.Module], ...] = tuple(
    t
    for t in (
        nn.modules.batchnorm._NormBase,
        nn.LayerNorm,
        nn.GroupNorm,
        nn.LocalResponseNorm,
        getattr(nn, "RMSNorm", None),
    )
    if t is not None
)

_PRESETS = ("weights", "all")


@dataclass(frozen=True)
class SelectedParam:
    """A parameter picked by a :class:`ParamSelection`, with its qualified name."""

    name: str
    param: nn.Parameter


@dataclass(frozen=True)
class ParamSelection:
    """A rule that picks the parameters a regularizer acts on.

    Args:
        preset: ``"weights"`` (ndim >= 2, outside normalization layers) or ``"all"``.
        include: name globs (``fnmatch``) a parameter must match at least one of, if given.
        exclude: name globs that remove a parameter.
        include_types: module types a parameter's owner must be an instance of, if given.
        exclude_types: module types whose parameters are removed.
        trainable_only: skip parameters with ``requires_grad=False``.

    Raises:
        ValueError: if ``preset`` is not ``"weights"`` or ``"all"``.
        TypeError: if a glob is not a string or a type is not an ``nn.Module`` subclass.

    Example:
        >>> sel = ParamSelection("weights", exclude=("*embed*",))
        >>> names = [p.name for p in sel.select(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)))]
        >>> names
        ['0.weight']
    """

    preset: str = "weights"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    include_types: tuple[type[nn.Module], ...] = ()
    exclude_types: tuple[type[nn.Module], ...] = ()
    trainable_only: bool = True

    def __post_init__(self) -> None:
        check_choice("params", self.preset, _PRESETS)
        for arg in ("include", "exclude"):
            value = getattr(self, arg)
            if isinstance(value, str):
                object.__setattr__(self, arg, (value,))
            elif not all(isinstance(v, str) for v in getattr(self, arg)):
                raise TypeError(f"`{arg}` must be a sequence of name globs, got {value!r}")
            object.__setattr__(self, arg, tuple(getattr(self, arg)))
        for arg in ("include_types", "exclude_types"):
            value = getattr(self, arg)
            if isinstance(value, type):
                value = (value,)
            value = tuple(value)
            if not all(isinstance(v, type) and issubclass(v, nn.Module) for v in value):
                raise TypeError(
                    f"`{arg}` must be a sequence of nn.Module subclasses, got {value!r}"
                )
            object.__setattr__(self, arg, value)

    @classmethod
    def coerce(cls, spec: str | ParamSelection | None) -> ParamSelection:
        """Turn ``"weights"``, ``"all"``, ``None`` or a selection into a :class:`ParamSelection`.

        Raises:
            ValueError: for an unknown preset name.
            TypeError: for anything else.
        """
        if spec is None:
            return cls()
        if isinstance(spec, ParamSelection):
            return spec
        if isinstance(spec, str):
            return cls(check_choice("params", spec, _PRESETS))
        raise TypeError(
            f"`params` must be 'weights', 'all' or a ParamSelection, got {spec!r} "
            f"({type(spec).__name__})"
        )

    def _keep(self, name: str, param: nn.Parameter, owner: nn.Module) -> bool:
        if self.trainable_only and not param.requires_grad:
            return False
        if self.preset == "weights" and (param.ndim < 2 or isinstance(owner, NORM_LAYER_TYPES)):
            return False
        if self.include and not any(fnmatch.fnmatchcase(name, g) for g in self.include):
            return False
        if any(fnmatch.fnmatchcase(name, g) for g in self.exclude):
            return False
        if self.include_types and not isinstance(owner, self.include_types):
            return False
        return not (self.exclude_types and isinstance(owner, self.exclude_types))

    def select(self, model: nn.Module, *, allow_empty: bool = False) -> list[SelectedParam]:
        """Return the selected parameters of ``model`` in registration order, without duplicates.

        Raises:
            RuntimeError: if nothing matches and ``allow_empty`` is False.
        """
        chosen: list[SelectedParam] = []
        seen: set[int] = set()
        for module_name, module in model.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                if id(param) in seen:
                    continue
                name = f"{module_name}.{param_name}" if module_name else param_name
                if self._keep(name, param, module):
                    seen.add(id(param))
                    chosen.append(SelectedParam(name, param))
        if not chosen and not allow_empty:
            raise RuntimeError(
                f"The parameter selection {self!r} matched no parameter of "
                f"{type(model).__name__}. Use params='all', loosen `include`/`exclude`, or check "
                "that the model has trainable parameters with ndim >= 2."
            )
        return chosen

    def parameters(self, model: nn.Module, *, allow_empty: bool = False) -> list[nn.Parameter]:
        """Shorthand for the parameter tensors of :meth:`select`."""
        return [s.param for s in self.select(model, allow_empty=allow_empty)]


def group_by_optimizer_group(
    params: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer
) -> list[tuple[dict, list[torch.Tensor]]]:
    """Split ``params`` by the optimizer param group that owns them.

    Returns a list of ``(param_group, tensors)`` pairs, skipping groups with no selected tensor.
    Parameters not owned by ``optimizer`` are left out.
    """
    wanted = {id(p) for p in params}
    groups: list[tuple[dict, list[torch.Tensor]]] = []
    for group in optimizer.param_groups:
        tensors = [p for p in group["params"] if id(p) in wanted]
        if tensors:
            groups.append((group, tensors))
    return groups


def groups_by_optimizer(
    params: Sequence[torch.Tensor], optimizers: Iterable[torch.optim.Optimizer], who: str
) -> dict[int, list[tuple[dict, list[torch.Tensor]]]]:
    """:func:`group_by_optimizer_group` for every optimizer, keyed by ``id(optimizer)``.

    Raises:
        RuntimeError: if no optimizer holds any of ``params`` (``who`` would do nothing).
    """
    grouped = {id(opt): group_by_optimizer_group(params, opt) for opt in optimizers}
    if not any(grouped.values()):
        raise RuntimeError(
            f"{who}: none of the {len(params)} selected parameters is in an optimizer, so it "
            "would do nothing. Check configure_optimizers, or the `params` selection."
        )
    return grouped


def split_by_device_dtype(
    tensors: Sequence[torch.Tensor],
) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    """Group tensors by ``(device, dtype)``, as the ``torch._foreach_*`` kernels require."""
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    return buckets
