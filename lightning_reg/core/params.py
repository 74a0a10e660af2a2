"""Which parameters a technique touches: :class:`ParamSelection`.

``ParamSelection("weights")`` (the default everywhere) is the library's own no-decay rule, the
union of what the model zoos declare:

* timm: no 1-D parameters, no ``.bias``, nothing the model (or any submodule, names prefixed)
  lists in ``no_weight_decay()`` (names or globs) or ``no_weight_decay_keywords()``
  (substrings);
* Hugging Face's Trainer: no parameter of a normalization layer, no name matching ``bias``,
  ``layernorm``, ``rmsnorm`` or a ``norm`` component;
* positional embeddings and class/distillation tokens (``pos_embed``, ``position_embeddings``,
  ``cls_token``, ``class_token``, ``dist_token``), whatever library declares them.

``"all"`` selects every trainable parameter. Name globs and module types refine either preset.
Each selected parameter also carries its *unit dim*, the dim that indexes its units: 0 in
PyTorch layout, 1 for ``ConvTranspose`` weights, which are ``(in, out, ...)``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from lightning_reg.core.compat import NormBase
from lightning_reg.core.validation import check_choice

__all__ = ["NORM_LAYER_TYPES", "ParamSelection", "SelectedParam", "split_by_device_dtype"]

#: Module types whose parameters are never "weights" (plus any class named ``*Norm``/``*Norm2d``).
NORM_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    NormBase,  # batch, instance and sync batch norm, lazy or not
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *([nn.RMSNorm] if hasattr(nn, "RMSNorm") else []),  # torch >= 2.4
)
_NORM_CLASS = re.compile(r"Norm(\dd)?$")
# Hugging Face Trainer's forbidden name patterns, plus positional embeddings and class tokens.
_NO_DECAY_NAME = re.compile(
    r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)"
    r"|pos(?:ition)?_?embed|(?:cls|class|dist)_token"
)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class SelectedParam(NamedTuple):
    """A parameter picked by a :class:`ParamSelection`: qualified name, tensor and unit dim."""

    name: str
    param: nn.Parameter
    unit_dim: int = 0


def _matches(name: str, globs: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


@dataclass(frozen=True)
class ParamSelection:
    """A rule that picks the parameters a regularizer acts on.

    ``ParamSelection("weights").select(model)`` is the library's public no-decay rule (see the
    module docstring); every parameter callback and the penalty functions use it by default.

    Args:
        preset: ``"weights"`` (the no-decay rule above) or ``"all"``.
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

    Reference:
        timm ``timm.optim.param_groups_weight_decay``; Hugging Face
        ``Trainer.get_decay_parameter_names``.
    """

    preset: str = "weights"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    include_types: tuple[type[nn.Module], ...] = ()
    exclude_types: tuple[type[nn.Module], ...] = ()
    trainable_only: bool = True

    def __post_init__(self) -> None:
        check_choice("params", self.preset, ("weights", "all"))
        for arg in ("include", "exclude", "include_types", "exclude_types"):
            value = getattr(self, arg)
            value = (value,) if isinstance(value, (str, type)) else tuple(value)
            kind, what = (type, "nn.Module subclasses") if "types" in arg else (str, "name globs")
            if not all(
                isinstance(v, kind) and (kind is str or issubclass(v, nn.Module)) for v in value
            ):
                raise TypeError(f"`{arg}` must be a sequence of {what}, got {value!r}")
            object.__setattr__(self, arg, value)

    @classmethod
    def coerce(cls, spec: str | ParamSelection | None) -> ParamSelection:
        """Turn ``"weights"``, ``"all"``, ``None`` or a selection into a :class:`ParamSelection`.

        Raises:
            ValueError: for an unknown preset name.
            TypeError: for anything else.
        """
        if spec is None or isinstance(spec, ParamSelection):
            return spec or cls()
        if isinstance(spec, str):
            return cls(spec)  # __post_init__ checks the preset
        raise TypeError(f"`params` must be 'weights', 'all' or a ParamSelection, got {spec!r}")

    def select(self, model: nn.Module, *, allow_empty: bool = False) -> list[SelectedParam]:
        """Return the selected parameters of ``model`` in registration order, without duplicates.

        Raises:
            RuntimeError: if nothing matches and ``allow_empty`` is False.
        """
        weights = self.preset == "weights"
        # timm's declarations, qualified by the declaring module's path. A module comes before
        # its descendants in named_modules(), so its declarations are read before they apply.
        names: set[str] = set()
        keywords: list[tuple[str, str]] = []
        chosen: dict[int, SelectedParam] = {}  # by id: a shared parameter counts once
        for module_name, module in model.named_modules():
            dot = f"{module_name}." if module_name else ""
            if weights and callable(getattr(module, "no_weight_decay", None)):
                names.update(dot + n for n in module.no_weight_decay())
            if weights and callable(getattr(module, "no_weight_decay_keywords", None)):
                keywords.extend((dot, k) for k in module.no_weight_decay_keywords())
            for param_name, param in module.named_parameters(recurse=False):
                name = dot + param_name
                if id(param) in chosen or (self.trainable_only and not param.requires_grad):
                    continue
                no_decay = weights and (
                    param.ndim < 2
                    or isinstance(module, NORM_LAYER_TYPES)
                    or _NORM_CLASS.search(type(module).__name__)
                    or _NO_DECAY_NAME.search(name.lower())
                    or _matches(name, names)
                    or any(name.startswith(p) and k in name[len(p) :] for p, k in keywords)
                )
                if (
                    not no_decay
                    and (not self.include or _matches(name, self.include))
                    and not _matches(name, self.exclude)
                    and (not self.include_types or isinstance(module, self.include_types))
                    and not (self.exclude_types and isinstance(module, self.exclude_types))
                ):
                    unit_dim = int(isinstance(module, _TRANSPOSED))
                    chosen[id(param)] = SelectedParam(name, param, unit_dim)
        if not chosen and not allow_empty:
            raise RuntimeError(
                f"The parameter selection {self!r} matched no parameter of "
                f"{type(model).__name__}. Use params='all', loosen `include`/`exclude`, or check "
                "that the model has trainable parameters with ndim >= 2."
            )
        return list(chosen.values())

    def parameters(self, model: nn.Module, *, allow_empty: bool = False) -> list[nn.Parameter]:
        """Shorthand for the parameter tensors of :meth:`select`."""
        return [s.param for s in self.select(model, allow_empty=allow_empty)]


def split_by_device_dtype(tensors: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Group tensors by ``(device, dtype)``, as the multi-tensor (foreach) kernels require."""
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    return list(buckets.values())
