"""Shared machinery: parameter selection, batch access, surgery, schedules, validation, hooks.

The package re-exports the names that ``lightning_reg`` makes public (and ``ParamCallback``);
everything else is imported from its submodule, e.g. ``lightning_reg.core.batch.BatchSlot``.
"""

from lightning_reg.core.param_callback import ParamCallback
from lightning_reg.core.params import ParamSelection
from lightning_reg.core.schedules import (
    CallableSchedule,
    ConstantSchedule,
    CosineSchedule,
    LinearSchedule,
    Schedule,
    StepSchedule,
)
from lightning_reg.core.surgery import replace_modules, restore_modules

__all__ = [
    "CallableSchedule",
    "ConstantSchedule",
    "CosineSchedule",
    "LinearSchedule",
    "ParamCallback",
    "ParamSelection",
    "Schedule",
    "StepSchedule",
    "replace_modules",
    "restore_modules",
]
