"""Model surgery: replace submodules by explicit, type-keyed policies, and undo it.

A *policy* maps module types to a function ``fn(module, path) -> nn.Module | None``. The first
type in the policy that a module is an instance of decides; ``None`` keeps the module. Surgery
never rebinds ``forward`` and never looks modules up by string: it swaps child modules in their
parent, so ``state_dict`` paths stay stable where the replacement keeps its child's names.

Replacements that wrap the original module subclass :class:`SurgeryWrapper`, which knows how to
give the original back; :func:`restore_modules` undoes any surgery built on it.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from lightning_reg.core.compat import state_dict_metadata


@contextlib.contextmanager
def training_flags_restored(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Context: change ``training`` flags freely inside; every module's flag is restored after.

    Yields the list of ``model``'s modules. ``model.train()``/``.eval()`` flip whole subtrees; this
    puts back each module's own flag, so a partly frozen model (a BatchNorm kept in eval) stays so.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).eval()
        >>> with training_flags_restored(net):
        ...     _ = net.train()
        >>> net[1].training
        False
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield [m for m, _ in flags]
    finally:
        for module, flag in flags:
            module.training = flag


StateDict = dict[str, Any]
Policy = Mapping[type[nn.Module], Callable[[nn.Module, str], nn.Module | None]]


@dataclass(frozen=True)
class ModuleChange:
    """One module swapped by surgery: where, and from which type to which."""

    path: str
    old_type: str
    new_type: str


class SurgeryWrapper(nn.Module):
    """Base class of modules inserted by surgery. Subclasses implement :meth:`unwrap`."""

    def unwrap(self) -> nn.Module:  # pragma: no cover - abstract
        """Return the module this one replaced, in an equivalent state."""
        raise NotImplementedError


def _strip_level(_: nn.Module, state_dict: StateDict, prefix: str, *__: Any, child: str) -> None:
    # "<prefix><child>.rest" becomes "<prefix>rest"; the child's own metadata key
    # "<prefix><child>" becomes the wrapper's, "<prefix>" without its trailing dot.
    inner = f"{prefix}{child}."
    for keys in (state_dict, state_dict_metadata(state_dict) or {}):
        for key in [k for k in keys if f"{k}.".startswith(inner)]:
            keys[(prefix + key[len(inner) :]).rstrip(".")] = keys.pop(key)


def _add_level(wrapper: nn.Module, state_dict: StateDict, prefix: str, *_: Any, child: str) -> None:
    own = {name for name, _ in wrapper.named_children()}
    own |= {name for name, _ in wrapper.named_parameters(recurse=False)}
    own |= {name for name, _ in wrapper.named_buffers(recurse=False)}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if key[len(prefix) :].split(".", 1)[0] not in own:
            state_dict[f"{prefix}{child}.{key[len(prefix) :]}"] = state_dict.pop(key)


def hide_wrapper_level(wrapper: nn.Module, child: str) -> None:
    """Give ``wrapper``'s ``state_dict`` the keys of its wrapped child ``child``.

    Without this, wrapping moves keys from ``path.weight`` to ``path.<child>.weight``. A
    state-dict hook strips the ``<child>.`` level and a load pre-hook accepts both spellings,
    so checkpoints load both ways (original model into wrapped, and back). Keys of the
    wrapper's other children keep their ``path.<name>.`` prefix. ``named_parameters()`` still
    shows the real module tree.
    """
    wrapper.register_state_dict_post_hook(functools.partial(_strip_level, child=child))
    wrapper.register_load_state_dict_pre_hook(functools.partial(_add_level, child=child))


class TransparentWrapper(SurgeryWrapper):
    """A wrapper around the child ``module`` whose ``state_dict`` keys are the child's own
    (see :func:`hide_wrapper_level`); :meth:`unwrap` returns the child.

    Example:
        >>> wrapper = TransparentWrapper(nn.Linear(2, 2))
        >>> sorted(wrapper.state_dict())
        ['bias', 'weight']
    """

    module: nn.Module

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        hide_wrapper_level(self, "module")

    def unwrap(self) -> nn.Module:
        return self.module


def replace_modules(
    model: nn.Module,
    policy: Policy,
    *,
    refuse_if_contains: tuple[type[nn.Module], ...] = (),
) -> list[ModuleChange]:
    """Replace every submodule that ``policy`` returns a replacement for.

    The walk is top-down in registration order; a replaced module's children are not visited
    (so a wrapper is never wrapped again by the same pass).

    Args:
        model: the model to change in place. The root itself is never replaced.
        policy: module type -> ``fn(module, path)`` returning the replacement or ``None``.
        refuse_if_contains: wrapper types whose presence means the model is already wrapped.

    Returns:
        The list of changes, in walk order.

    Raises:
        RuntimeError: if ``model`` already contains a module of a ``refuse_if_contains`` type.
        TypeError: if a policy function returns something that is not an ``nn.Module``.

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> replace_modules(m, {nn.ReLU: lambda mod, path: nn.GELU()})
        [ModuleChange(path='1', old_type='ReLU', new_type='GELU')]
    """
    found = [n for n, m in model.named_modules() if isinstance(m, refuse_if_contains)]
    if found:
        raise RuntimeError(
            f"The model is already wrapped ({type(model.get_submodule(found[0])).__name__} at "
            f"{found[:3]}{'...' if len(found) > 3 else ''}). Remove the earlier surgery first, "
            "or do not apply it twice."
        )
    changes: list[ModuleChange] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in list(module.named_children()):
            path = f"{prefix}.{name}" if prefix else name
            fn = next((fn for kind, fn in policy.items() if isinstance(child, kind)), None)
            replacement = None if fn is None else fn(child, path)
            if replacement is None:
                visit(child, path)
                continue
            if not isinstance(replacement, nn.Module):
                raise TypeError(
                    f"A surgery policy returned {type(replacement).__name__} for {path!r}; "
                    "it must return an nn.Module or None."
                )
            setattr(module, name, replacement)
            changes.append(ModuleChange(path, type(child).__name__, type(replacement).__name__))

    visit(model, "")
    return changes


def restore_modules(
    model: nn.Module, wrapper_type: type[SurgeryWrapper] = SurgeryWrapper
) -> list[ModuleChange]:
    """Replace every ``wrapper_type`` module by what its :meth:`~SurgeryWrapper.unwrap` returns.

    Returns:
        The list of changes made.
    """
    changes: list[ModuleChange] = []
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, wrapper_type) and n]
    # Deepest first, so nested wrappers unwind correctly.
    for path, wrapper in sorted(targets, key=lambda item: -item[0].count(".")):
        original = wrapper.unwrap()
        model.set_submodule(path, original)
        changes.append(ModuleChange(path, type(wrapper).__name__, type(original).__name__))
    return changes


def format_changes(changes: list[ModuleChange], title: str) -> str:
    """A short text table of ``changes``, for logging once at rank zero."""
    if not changes:
        return f"{title}: no module changed"
    counts = Counter((change.old_type, change.new_type) for change in changes)
    width = max(len(old) for old, _ in counts)
    rows = [f"  {old:<{width}} -> {new}  x{n}" for (old, new), n in counts.items()]
    return f"{title}: {len(changes)} module(s) changed\n" + "\n".join(rows)
