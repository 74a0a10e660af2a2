"""Shared machinery: parameter selection, batch access, surgery, schedules, validation, hooks."""

from lightning_reg.core.batch import BatchSlot
from lightning_reg.core.hooks import OptimizerStepHooks
from lightning_reg.core.param_callback import ParamCallback
from lightning_reg.core.params import ParamSelection
from lightning_reg.core.schedules import (
    CallableSchedule,
    ConstantSchedule,
    CosineSchedule,
    LinearSchedule,
    Schedule,
    StepSchedule,
    as_schedule,
)
from lightning_reg.core.surgery import (
    ModuleChange,
    SurgeryWrapper,
    replace_modules,
    restore_modules,
)

__all__ = [
    "BatchSlot",
    "CallableSchedule",
    "ConstantSchedule",
    "CosineSchedule",
    "LinearSchedule",
    "ModuleChange",
    "OptimizerStepHooks",
    "ParamCallback",
    "ParamSelection",
    "Schedule",
    "StepSchedule",
    "SurgeryWrapper",
    "as_schedule",
    "replace_modules",
    "restore_modules",
]
