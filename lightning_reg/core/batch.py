"""Read and replace inputs and targets in a training batch.

Batch-rewriting callbacks (augmentation, MixUp, label smoothing) mutate the batch object in
``on_train_batch_start``; that is the very object ``training_step`` receives. Lists and dicts
can be mutated in place; tuples cannot, so a tuple batch raises a ``RuntimeError`` that says
what to do instead.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, MutableSequence
from dataclasses import KW_ONLY, dataclass
from typing import Any

import torch

BatchKey = int | str

_TUPLE_HELP = (
    "lightning_reg rewrites the training batch in place, which a tuple or another immutable "
    "type does not allow. Return a list or a dict from your Dataset/collate_fn (for example "
    "`DataLoader(..., collate_fn=lambda b: list(default_collate(b)))`), or pass `getter=`/"
    "`setter=` functions to the callback to read and write your batch type."
)


@dataclass(eq=False)
class BatchSlot:
    """One slot (inputs or targets) of a batch, addressed by index, key or user functions.

    Args:
        key: list index or dict key of the slot.
        getter: optional ``getter(batch) -> Tensor``; overrides ``key`` for reading.
        setter: optional ``setter(batch, value) -> None`` that writes the slot in place.
        role: a word for error messages (``"input"`` or ``"target"``).

    Raises:
        TypeError: if ``key`` is neither int nor str, or a getter/setter is not callable.
    """

    key: BatchKey
    _: KW_ONLY
    getter: Callable[[Any], torch.Tensor] | None = None
    setter: Callable[[Any, torch.Tensor], None] | None = None
    role: str = "input"

    def __post_init__(self) -> None:
        if isinstance(self.key, bool) or not isinstance(self.key, (int, str)):
            raise TypeError(f"`{self.role}_key` must be an int index or str key, got {self.key!r}")
        for name, fn in (("getter", self.getter), ("setter", self.setter)):
            if fn is not None and not callable(fn):
                raise TypeError(f"`{name}` must be callable, got {fn!r}")

    def _check_container(self, batch: Any) -> None:
        if not isinstance(batch, (MutableSequence, MutableMapping)):  # a tuple is not mutable
            raise RuntimeError(f"The training batch is a {type(batch).__name__}. {_TUPLE_HELP}")

    def get(self, batch: Any) -> torch.Tensor:
        """Return the slot's tensor.

        Raises:
            RuntimeError: for tuple batches, missing keys, or a non-tensor slot.
        """
        if self.getter is not None:
            return self.getter(batch)
        self._check_container(batch)
        try:
            value = batch[self.key]
        except (KeyError, IndexError) as err:
            keys = list(batch.keys()) if isinstance(batch, MutableMapping) else range(len(batch))
            raise RuntimeError(
                f"The training batch has no {self.role} at {self.role}_key={self.key!r}; "
                f"available: {list(keys)}. Set `{self.role}_key` on the callback."
            ) from err
        if not isinstance(value, torch.Tensor):
            raise RuntimeError(
                f"The batch {self.role} at {self.role}_key={self.key!r} is a "
                f"{type(value).__name__}, not a tensor. Set `{self.role}_key` on the callback."
            )
        return value

    def set(self, batch: Any, value: torch.Tensor) -> None:
        """Replace the slot's tensor in place.

        Raises:
            RuntimeError: for tuple batches or containers that cannot be written.
        """
        if self.setter is not None:
            self.setter(batch, value)
            return
        if self.getter is not None:
            raise RuntimeError(
                "A custom `getter` was given without a `setter`: pass `setter=` too so the "
                "callback can write the new value back into your batch."
            )
        self._check_container(batch)
        batch[self.key] = value
