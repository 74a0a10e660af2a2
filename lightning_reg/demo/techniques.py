"""The technique registry of the ablation: name → description, class, formula, paper, factory.

Each factory imports its technique *lazily*, inside the function, and returns a
:class:`Recipe`: the callbacks to add to the Trainer, optionally a LightningModule subclass
(for mixins such as the Jacobian penalty) and model surgery to run before training. So the
command works with whichever technique modules are installed; :func:`available` says which.

The hyperparameters are fixed per technique (one sensible value each, chosen for the default
``digits`` setting: 300 training images, SGD with Nesterov momentum 0.9 at lr 0.05, batch 64,
20 epochs); the ablation
is a demonstration, not a tuned benchmark.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.callbacks import Callback
from torch import nn

__all__ = [
    "COMBINED",
    "TECHNIQUES",
    "Recipe",
    "Technique",
    "TechniqueContext",
    "available",
    "build_recipe",
]


@dataclass(frozen=True)
class TechniqueContext:
    """What a factory may need to know about the run."""

    num_classes: int
    kind: str  # "image" or "tabular"
    input_shape: tuple[int, ...]
    batch_size: int
    steps_per_epoch: int
    epochs: int
    val_every: int


@dataclass
class Recipe:
    """How to apply one or several techniques to a run.

    Attributes:
        callbacks: Trainer callbacks.
        module_class: a ``DemoClassifier`` subclass to train instead (mixins), or ``None``.
        module_attrs: attributes set on the LightningModule after construction.
        surgery: functions ``fn(module)`` run on the LightningModule before training.
    """

    callbacks: list[Callback] = field(default_factory=list)
    module_class: type | None = None
    module_attrs: dict[str, Any] = field(default_factory=dict)
    surgery: list[Callable[[nn.Module], Any]] = field(default_factory=list)

    def merge(self, other: Recipe) -> Recipe:
        """Both recipes at once (at most one of them may bring a module class)."""
        if self.module_class is not None and other.module_class is not None:
            raise ValueError("cannot combine two techniques that both need a module class")
        return Recipe(
            callbacks=[*self.callbacks, *other.callbacks],
            module_class=self.module_class or other.module_class,
            module_attrs={**self.module_attrs, **other.module_attrs},
            surgery=[*self.surgery, *other.surgery],
        )


@dataclass(frozen=True)
class Technique:
    """One row of the registry."""

    name: str
    description: str
    classes: str
    module: str  # the lightning_reg module it needs ("" for none)
    formula: str
    paper: str
    factory: Callable[[TechniqueContext], Recipe]
    kinds: tuple[str, ...] = ("image", "tabular")


# --------------------------------------------------------------------------- factories
#: Strengths of the penalty runs (SGD lr 0.05: the proximal threshold per step is lr·λ).
L2_STRENGTH = 5e-3
L1_STRENGTH = 0.05


def _baseline(ctx: TechniqueContext) -> Recipe:
    return Recipe()


def _l2(ctx: TechniqueContext) -> Recipe:
    from lightning_reg.penalties import L2Callback

    return Recipe([L2Callback(L2_STRENGTH)])


def _l1(ctx: TechniqueContext) -> Recipe:
    from lightning_reg.penalties import L1Callback

    # Proximal: soft-threshold by lr·λ after each step (exact zeros).
    return Recipe([L1Callback(L1_STRENGTH, proximal=True)])


def _elastic_net(ctx: TechniqueContext) -> Recipe:
    from lightning_reg.penalties import ElasticNetCallback

    return Recipe([ElasticNetCallback(L1_STRENGTH / 2, L2_STRENGTH, proximal=True)])


def _max_norm(ctx: TechniqueContext) -> Recipe:
    from lightning_reg.max_norm import MaxNormCallback

    return Recipe([MaxNormCallback(MAX_NORM_RADIUS)])


#: The radius of the max-norm run (the report checks every unit against it).
MAX_NORM_RADIUS = 1.0


def _dropout(ctx: TechniqueContext) -> Recipe:
    from lightning_reg.dropout import DropoutCallback, add_dropout

    p = 0.3
    # Images: dropout on the pooled features before the head (as in ResNets); tabular: after
    # every activation.
    after: tuple[type[nn.Module], ...] = (nn.Flatten,) if ctx.kind == "image" else (nn.ReLU,)
    return Recipe(
        [DropoutCallback(p)],
        surgery=[lambda module: add_dropout(module, p, after=after)],
    )


def _augmentation(ctx: TechniqueContext) -> Recipe:
    from lightning_reg.augmentation import (
        Compose,
        DataAugmentationCallback,
        GaussianNoise,
        RandomResizedCrop,
    )

    if ctx.kind == "image":
        size = (ctx.input_shape[1], ctx.input_shape[2])
        transform: Any = Compose(
            [RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.85, 1.15)), GaussianNoise(0.1)]
        )
    else:
        transform = GaussianNoise(0.2)
    return Recipe([DataAugmentationCallback(transform)])


def _mixup(ctx: TechniqueContext) -> Recipe:
    from lightning_reg.mixing import MixUpCallback

    return Recipe([MixUpCallback(0.2, num_classes=ctx.num_classes)])


def _cutmix(ctx: TechniqueContext) -> Recipe:
    from lightning_reg.mixing import CutMixCallback

    return Recipe([CutMixCallback(1.0, num_classes=ctx.num_classes)])


def _early_stopping(ctx: TechniqueContext) -> Recipe:
    from lightning_reg.early_stopping import EarlyStoppingCallback

    return Recipe([EarlyStoppingCallback("val_loss", patience=2, restore_best_weights=True)])


def _ghost_bn(ctx: TechniqueContext) -> Recipe:
    from lightning_reg.batch_norm import GhostBatchNormCallback

    return Recipe([GhostBatchNormCallback(max(2, ctx.batch_size // 4))])


def _precise_bn(ctx: TechniqueContext) -> Recipe:
    from lightning_reg.batch_norm import PreciseBatchNormCallback

    return Recipe([PreciseBatchNormCallback(ctx.steps_per_epoch)])


def _label_smoothing(ctx: TechniqueContext) -> Recipe:
    from lightning_reg.label_smoothing import LabelSmoothingCallback

    return Recipe([LabelSmoothingCallback(0.1, num_classes=ctx.num_classes)])


def _stochastic_depth(ctx: TechniqueContext) -> Recipe:
    from lightning_reg.demo.model import ResidualBlock
    from lightning_reg.stochastic_depth import StochasticDepthCallback

    return Recipe([StochasticDepthCallback(0.5, block_types=(ResidualBlock,))])


#: The Jacobian weight λ of the ablation run.
JACOBIAN_WEIGHT = 0.01


def _jacobian(ctx: TechniqueContext) -> Recipe:
    from lightning_reg.demo.model import jacobian_classifier

    return Recipe(
        module_class=jacobian_classifier(),
        module_attrs={"jacobian_weight": JACOBIAN_WEIGHT, "jacobian_projections": 1},
    )


TECHNIQUES: dict[str, Technique] = {
    t.name: t
    for t in [
        Technique(
            "baseline",
            "no regularization",
            "-",
            "",
            "-",
            "-",
            _baseline,
        ),
        Technique(
            "l2",
            f"L2 penalty λ={L2_STRENGTH:g} (= SGD weight decay)",
            "L2Callback",
            "penalties",
            "L + λ/2·Σw², grad += λ·w",
            "Krogh & Hertz 1992",
            _l2,
        ),
        Technique(
            "l1_proximal",
            f"proximal L1 λ={L1_STRENGTH:g}: soft-thresholding, exact zeros",
            "L1Callback(proximal=True)",
            "penalties",
            "w ← sign(w)·max(|w| − lr·λ, 0)",
            "Tibshirani 1996; Duchi & Singer 2009",
            _l1,
        ),
        Technique(
            "elastic_net",
            f"proximal elastic net λ1={L1_STRENGTH / 2:g}, λ2={L2_STRENGTH:g}",
            "ElasticNetCallback(proximal=True)",
            "penalties",
            "λ1·Σ|w| + λ2/2·Σw²",
            "Zou & Hastie 2005",
            _elastic_net,
        ),
        Technique(
            "max_norm",
            f"max-norm r={MAX_NORM_RADIUS:g} on every unit's incoming weights",
            "MaxNormCallback",
            "max_norm",
            "w_u ← w_u·min(1, r/‖w_u‖₂)",
            "Srivastava et al. 2014",
            _max_norm,
        ),
        Technique(
            "dropout",
            "dropout p=0.3 (before the head / after each activation)",
            "add_dropout + DropoutCallback",
            "dropout",
            "h̃ = h·z/(1−p), z ~ Bernoulli(1−p)",
            "Srivastava et al. 2014",
            _dropout,
        ),
        Technique(
            "augmentation",
            "random resized crop + Gaussian noise (tabular: noise)",
            "DataAugmentationCallback",
            "augmentation",
            "x̃ = T(x), T random per sample",
            "Simard et al. 2003; Krizhevsky et al. 2012",
            _augmentation,
        ),
        Technique(
            "mixup",
            "MixUp α=0.2",
            "MixUpCallback",
            "mixing",
            "x̃ = λx_i + (1−λ)x_j, ỹ = λy_i + (1−λ)y_j, λ ~ Beta(α, α)",
            "Zhang et al. 2018",
            _mixup,
        ),
        Technique(
            "cutmix",
            "CutMix α=1.0",
            "CutMixCallback",
            "mixing",
            "paste a box of x_j into x_i; λ = kept area",
            "Yun et al. 2019",
            _cutmix,
            kinds=("image",),
        ),
        Technique(
            "early_stopping",
            "stop when val_loss stalls 2 checks, restore best weights",
            "EarlyStoppingCallback",
            "early_stopping",
            "stop at t if min_{s≤t} L_val(s) not improved for k checks",
            "Prechelt 1998",
            _early_stopping,
        ),
        Technique(
            "ghost_bn",
            "ghost batch norm, virtual batch = batch/4",
            "GhostBatchNormCallback",
            "batch_norm",
            "BN statistics per virtual batch of size v",
            "Hoffer, Hubara & Soudry 2017",
            _ghost_bn,
        ),
        Technique(
            "precise_bn",
            "exact BN population statistics before each validation",
            "PreciseBatchNormCallback",
            "batch_norm",
            "μ, σ² ← mean/var over N training batches",
            "Wu & Johnson 2021",
            _precise_bn,
        ),
        Technique(
            "label_smoothing",
            "label smoothing α=0.1",
            "LabelSmoothingCallback",
            "label_smoothing",
            "ỹ = (1−α)·onehot(y) + α/K",
            "Szegedy et al. 2016",
            _label_smoothing,
        ),
        Technique(
            "stochastic_depth",
            "stochastic depth, p_L=0.5, linear decay",
            "StochasticDepthCallback",
            "stochastic_depth",
            "block l kept with p_l = 1 − (l/L)(1 − p_L)",
            "Huang et al. 2016",
            _stochastic_depth,
        ),
        Technique(
            "jacobian",
            f"Jacobian penalty λ={JACOBIAN_WEIGHT:g}, 1 random projection",
            "JacobianPenaltyMixin",
            "jacobian",
            "L + λ·(1/B)Σ_b ‖∂f(x_b)/∂x_b‖_F²",
            "Hoffman, Roberts & Yaida 2019",
            _jacobian,
        ),
    ]
}

#: The combined recipe: a common modern stack of techniques that compose.
COMBINED: tuple[str, ...] = ("l2", "dropout", "augmentation", "label_smoothing")
COMBINED_NAME = "combined"


def available(name: str) -> tuple[bool, str]:
    """Whether a technique (or ``"combined"``) can run here, and why not if it cannot."""
    names = COMBINED if name == COMBINED_NAME else (name,)
    for n in names:
        module = TECHNIQUES[n].module
        if not module:
            continue
        try:
            importlib.import_module(f"lightning_reg.{module}")
        except ImportError as err:
            return False, f"lightning_reg.{module} is not installed ({err})"
    return True, ""


def all_names() -> list[str]:
    """Every technique name, then ``"combined"``."""
    return [*TECHNIQUES, COMBINED_NAME]


def applies_to(name: str, kind: str) -> bool:
    """Whether the technique makes sense for ``kind`` data (``"combined"``: always)."""
    return name == COMBINED_NAME or kind in TECHNIQUES[name].kinds


def build_recipe(name: str, ctx: TechniqueContext) -> Recipe:
    """Call the factory (or factories, for ``"combined"``) of ``name``."""
    if name == COMBINED_NAME:
        recipe = Recipe()
        for n in COMBINED:
            if applies_to(n, ctx.kind):
                recipe = recipe.merge(TECHNIQUES[n].factory(ctx))
        return recipe
    return TECHNIQUES[name].factory(ctx)


def describe(name: str) -> Technique:
    """The registry row of ``name`` (a synthetic one for ``"combined"``)."""
    if name == COMBINED_NAME:
        return Technique(
            COMBINED_NAME,
            "combined recipe: " + " + ".join(COMBINED),
            " + ".join(TECHNIQUES[n].classes for n in COMBINED),
            "",
            "all of the above at once",
            "-",
            lambda ctx: build_recipe(COMBINED_NAME, ctx),
        )
    return TECHNIQUES[name]
