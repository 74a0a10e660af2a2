"""Which distributed strategies a technique supports, and a clear error for the others.

DDP (any number of GPUs and nodes, through Lightning) is supported by every technique. Sharded
strategies change what a parameter is on each rank:

* ``FSDPStrategy`` (FSDP1) flattens parameters into 1-D shards, so per-tensor rules (weights vs
  biases, unit norms) cannot be applied to them;
* ``ModelParallelStrategy`` (FSDP2) shards each parameter along dim 0 as a ``DTensor``: per-element
  rules (L1/L2/elastic net, non-negativity) and per-unit norms (a unit is a dim-0 row, never
  split) stay exact; whole-tensor norms would need an all-reduce;
* ``DeepSpeedStrategy`` partitions parameters and owns the optimizer step.

Techniques call :func:`refuse_strategies` in ``setup`` with the strategies they cannot support,
so the user gets an error naming the strategy before any work is done.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: Strategies whose parameters are flattened or partitioned (no per-tensor view).
FLAT_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "XLAFSDPStrategy")
#: Every sharded strategy.
ALL_SHARDED = (*FLAT_SHARDED, "ModelParallelStrategy")


def refuse_strategies(trainer: Any, who: str, refused: Iterable[str], reason: str) -> None:
    """Raise ``RuntimeError`` if ``trainer.strategy`` is one of ``refused``.

    Raises:
        RuntimeError: naming the strategy, the technique, the reason and what works instead.
    """
    strategy = trainer.strategy
    if {cls.__name__ for cls in type(strategy).__mro__} & set(refused):  # subclasses match too
        raise RuntimeError(
            f"{who} does not support {type(strategy).__name__}: {reason}. Use "
            "strategy='ddp' (any number of GPUs and nodes), or see docs/distributed.md for "
            "what each technique supports."
        )
