"""lightning_reg: regularization techniques for PyTorch Lightning.

Every technique is a Lightning ``Callback``, a ``LightningModule`` mixin or a model-surgery
function; see the README for the table of techniques, formulas and papers.
"""

from lightning_reg.augmentation import (
    BatchTransform,
    ColorJitter,
    Compose,
    DataAugmentationCallback,
    FrequencyMasking,
    GaussianNoise,
    RandomAffineCrop,
    RandomErasing,
    RandomHorizontalFlip,
    RandomResizedCrop,
    RandomRotation,
    TimeMasking,
    TokenMasking,
)
from lightning_reg.batch_norm_surgery import BatchNormFreezeCallback, add_batch_norm
from lightning_reg.core import (
    CallableSchedule,
    ConstantSchedule,
    CosineSchedule,
    LinearSchedule,
    ParamSelection,
    Schedule,
    StepSchedule,
    replace_modules,
    restore_modules,
)
from lightning_reg.dropout import (
    CurriculumDropoutSchedule,
    DropoutCallback,
    EarlyDropoutSchedule,
    MCDropoutMixin,
    MCDropoutResult,
    add_dropout,
    add_input_dropout,
    mc_dropout_predict,
    remove_dropout,
)
from lightning_reg.early_stopping import (
    EarlyStoppingCallback,
)
from lightning_reg.ghost_batch_norm import (
    GhostBatchNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    GhostBatchNormCallback,
    GhostSyncBatchNorm,
    apply_ghost_batch_norm,
    remove_ghost_batch_norm,
)
from lightning_reg.jacobian import (
    InputGradientPenaltyMixin,
    JacobianPenaltyMixin,
    input_gradient_penalty,
    jacobian_penalty,
)
from lightning_reg.label_smoothing import (
    LabelSmoothingCallback,
    smooth_labels,
)
from lightning_reg.max_norm import (
    MaxNormCallback,
    WeightConstraintCallback,
    max_norm_,
    non_neg_,
    unit_norm_,
)
from lightning_reg.mixing import (
    CutMixCallback,
    MixUpCallback,
    MixUpCutMixCallback,
    cutmix,
    mixup,
)
from lightning_reg.monitor import (
    RegularizationMonitorCallback,
)
from lightning_reg.penalties import (
    ElasticNetCallback,
    L1Callback,
    L2Callback,
    WeightPenaltyCallback,
    elastic_net_penalty,
    l1_penalty,
    l2_penalty,
)
from lightning_reg.precise_batch_norm import PreciseBatchNormCallback
from lightning_reg.stochastic_depth import (
    StochasticDepthCallback,
    StochasticDepthWrapper,
    apply_stochastic_depth,
    remove_stochastic_depth,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNormFreezeCallback",
    "BatchTransform",
    "CallableSchedule",
    "ColorJitter",
    "Compose",
    "ConstantSchedule",
    "CosineSchedule",
    "CurriculumDropoutSchedule",
    "CutMixCallback",
    "DataAugmentationCallback",
    "DropoutCallback",
    "EarlyDropoutSchedule",
    "EarlyStoppingCallback",
    "ElasticNetCallback",
    "FrequencyMasking",
    "GaussianNoise",
    "GhostBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GhostBatchNormCallback",
    "GhostSyncBatchNorm",
    "InputGradientPenaltyMixin",
    "JacobianPenaltyMixin",
    "L1Callback",
    "L2Callback",
    "LabelSmoothingCallback",
    "LinearSchedule",
    "MCDropoutMixin",
    "MCDropoutResult",
    "MaxNormCallback",
    "MixUpCallback",
    "MixUpCutMixCallback",
    "ParamSelection",
    "PreciseBatchNormCallback",
    "RandomAffineCrop",
    "RandomErasing",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "RandomRotation",
    "RegularizationMonitorCallback",
    "Schedule",
    "StepSchedule",
    "StochasticDepthCallback",
    "StochasticDepthWrapper",
    "TimeMasking",
    "TokenMasking",
    "WeightConstraintCallback",
    "WeightPenaltyCallback",
    "__version__",
    "add_batch_norm",
    "add_dropout",
    "add_input_dropout",
    "apply_ghost_batch_norm",
    "apply_stochastic_depth",
    "cutmix",
    "elastic_net_penalty",
    "input_gradient_penalty",
    "jacobian_penalty",
    "l1_penalty",
    "l2_penalty",
    "max_norm_",
    "mc_dropout_predict",
    "mixup",
    "non_neg_",
    "remove_dropout",
    "remove_ghost_batch_norm",
    "remove_stochastic_depth",
    "replace_modules",
    "restore_modules",
    "smooth_labels",
    "unit_norm_",
]
