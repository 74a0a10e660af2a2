"""Deprecated: ``lightning_reg.batch_norm`` was split after 0.1.0; the alias goes next release.

Import from ``lightning_reg`` (or ``lightning_reg.ghost_batch_norm``,
``lightning_reg.precise_batch_norm``, ``lightning_reg.batch_norm_surgery``).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_MODULES = ("ghost_batch_norm", "precise_batch_norm", "batch_norm_surgery")


def __getattr__(name: str) -> Any:
    for where in _MODULES:
        module = importlib.import_module(f"lightning_reg.{where}")
        if name in module.__all__:  # the public names moved; private ones are gone
            warnings.warn(
                f"lightning_reg.batch_norm.{name} is deprecated; import it from lightning_reg."
                f"{where} (public names also from lightning_reg). The alias goes next release.",
                DeprecationWarning,
                stacklevel=2,
            )
            return getattr(module, name)
    raise AttributeError(f"module 'lightning_reg.batch_norm' has no attribute {name!r}")
