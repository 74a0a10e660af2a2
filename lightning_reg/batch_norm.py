"""Deprecated: ``lightning_reg.batch_norm`` was split after 0.1.0; the alias goes next release.

Import from ``lightning_reg`` (or ``lightning_reg.ghost_batch_norm``,
``lightning_reg.precise_batch_norm``, ``lightning_reg.batch_norm_surgery``).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_MOVED = {
    "lightning_reg.ghost_batch_norm": (
        "GhostBatchNorm", "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d",
        "GhostBatchNormCallback", "GhostSyncBatchNorm", "apply_ghost_batch_norm",
        "ghost_batch_norm", "remove_ghost_batch_norm", "virtual_batch_sizes",
    ),
    "lightning_reg.precise_batch_norm": (
        "PreciseBatchNormCallback", "batch_norm_layers", "merge_moments",
        "recompute_batch_norm_stats",
    ),
    "lightning_reg.batch_norm_surgery": (
        "BatchNormAfter", "BatchNormFreezeCallback", "add_batch_norm", "remove_batch_norm",
    ),
}  # fmt: skip
_WHERE = {name: module for module, names in _MOVED.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_reg.batch_norm' has no attribute {name!r}")
    warnings.warn(
        f"lightning_reg.batch_norm.{name} is deprecated; import it from {module} (public "
        "names also from lightning_reg). The alias goes in the next release.",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(module), name)
