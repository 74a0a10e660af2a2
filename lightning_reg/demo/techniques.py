"""The technique registry of the main job: name → class, formula, paper, strength grid, factory.

Each technique has a small grid of strengths (3 or 4 values; ``--search`` runs them all and
keeps the one with the best mean validation accuracy) and a ``default``: the strength that the
committed search run (``docs/ablation.md``) chose on MNIST-1D with the MLP. A factory turns
``(context, strength)`` into a :class:`Recipe`: Trainer callbacks, optionally a LightningModule
class (mixins) and model surgery. :func:`skip_reason` says why a technique cannot act on a
model (no BatchNorm for ghost BN, no residual block for stochastic depth, a loss that rejects
soft targets for MixUp/CutMix/label smoothing, no mixin for the Jacobian penalty).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_reg import (
    Compose,
    CutMixCallback,
    DataAugmentationCallback,
    DropoutCallback,
    EarlyStoppingCallback,
    ElasticNetCallback,
    GaussianNoise,
    GhostBatchNormCallback,
    JacobianPenaltyMixin,
    L1Callback,
    L2Callback,
    LabelSmoothingCallback,
    MaxNormCallback,
    MixUpCallback,
    PreciseBatchNormCallback,
    RandomResizedCrop,
    StochasticDepthCallback,
    add_dropout,
    apply_stochastic_depth,
)

__all__ = [
    "ARCHITECTURE",
    "COMBINED",
    "COMBINED_NAME",
    "TECHNIQUES",
    "Recipe",
    "Technique",
    "TechniqueContext",
    "all_names",
    "build_recipe",
    "describe",
    "skip_reason",
]


@dataclass(frozen=True)
class TechniqueContext:
    """What a factory may need to know about the run.

    Attributes:
        num_classes: number of classes.
        kind: ``"sequence"``, ``"image"``, ``"tabular"`` or ``"config"`` (the user's model).
        input_shape: shape of one input.
        batch_size: training batch size.
        steps_per_epoch: training batches per epoch.
        model: a freshly built model to inspect (never trained).
        monitor: the metric early stopping watches, and its mode.
        soft_targets: whether the training loss accepts soft ``(B, K)`` targets (a probe).
        soft_targets_error: the probe's error when it does not.
    """

    num_classes: int
    kind: str
    input_shape: tuple[int, ...]
    batch_size: int
    steps_per_epoch: int
    model: nn.Module
    monitor: tuple[str, str] = ("val_acc", "max")
    soft_targets: bool = True
    soft_targets_error: str = ""


@dataclass
class Recipe:
    """How to apply one or several techniques to a run.

    Attributes:
        callbacks: Trainer callbacks.
        module_class: a ``DemoClassifier`` subclass to train instead (mixins), or ``None``.
        module_attrs: attributes set on the LightningModule after construction.
        surgery: functions ``fn(module)`` run on the LightningModule before training.
        arch: the demo network to build instead of the default (``"cnn"``), or ``None``.
    """

    callbacks: list[Callback] = field(default_factory=list)
    module_class: type | None = None
    module_attrs: dict[str, Any] = field(default_factory=dict)
    surgery: list[Callable[[nn.Module], Any]] = field(default_factory=list)
    arch: str | None = None

    def merge(self, other: Recipe) -> Recipe:
        """Both recipes at once (at most one of them may bring a module class)."""
        if self.module_class is not None and other.module_class is not None:
            raise ValueError("cannot combine two techniques that both need a module class")
        return Recipe(
            callbacks=[*self.callbacks, *other.callbacks],
            module_class=self.module_class or other.module_class,
            module_attrs={**self.module_attrs, **other.module_attrs},
            surgery=[*self.surgery, *other.surgery],
            arch=self.arch or other.arch,
        )


@dataclass(frozen=True)
class Technique:
    """One row of the registry.

    Attributes:
        grid: the strengths ``--search`` tries (empty: the technique has no strength).
        default: the strength of a run without ``--search``.
        knob: the name of the strength, e.g. ``"λ"``.
    """

    name: str
    description: str
    classes: str
    formula: str
    paper: str
    factory: Callable[[TechniqueContext, Any], Recipe]
    grid: tuple[Any, ...] = ()
    default: Any = None
    knob: str = ""


# --------------------------------------------------------------------------- factories
def _has(model: nn.Module, types: tuple[type[nn.Module], ...]) -> bool:
    return any(isinstance(m, types) for m in model.modules())


def _dropout_after(ctx: TechniqueContext) -> tuple[type[nn.Module], ...]:
    # Networks with a pooled head get dropout before the head (as in ResNets); the plain MLP and
    # the user's models get it after every activation.
    if _has(ctx.model, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        return (nn.Flatten,)
    return (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh)


def _dropout(ctx: TechniqueContext, p: float) -> Recipe:
    after = _dropout_after(ctx)
    return Recipe(
        [DropoutCallback(p)], surgery=[lambda module: add_dropout(module, p, after=after)]
    )


def _augmentation(ctx: TechniqueContext, std: float) -> Recipe:
    if ctx.kind == "image":
        size = (ctx.input_shape[1], ctx.input_shape[2])
        transform: Any = Compose(
            [RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.85, 1.15)), GaussianNoise(std)]
        )
    else:
        transform = GaussianNoise(std)
    return Recipe([DataAugmentationCallback(transform)])


def _early_stopping(ctx: TechniqueContext, patience: int) -> Recipe:
    monitor, mode = ctx.monitor
    return Recipe(
        [EarlyStoppingCallback(monitor, mode=mode, patience=patience, restore_best_weights=True)]
    )


def _block_types(model: nn.Module) -> tuple[type[nn.Module], ...] | None:
    from lightning_reg.demo.model import ResidualBlock

    return (ResidualBlock,) if _has(model, (ResidualBlock,)) else None


def _stochastic_depth(ctx: TechniqueContext, p_last: float) -> Recipe:
    return Recipe([StochasticDepthCallback(p_last, block_types=_block_types(ctx.model))])


def _jacobian(ctx: TechniqueContext, weight: float) -> Recipe:
    from lightning_reg.demo.model import JacobianDemoClassifier

    attrs = {"jacobian_weight": weight, "jacobian_projections": 1}
    if ctx.kind == "config":  # the user's module already has the mixin (see skip_reason)
        return Recipe(module_attrs=attrs)
    return Recipe(module_class=JacobianDemoClassifier, module_attrs=attrs)


def _ghost_bn(ctx: TechniqueContext, virtual: int) -> Recipe:
    return Recipe([GhostBatchNormCallback(min(virtual, ctx.batch_size))])


def _s(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


T = Technique
TECHNIQUES: dict[str, Technique] = {
    t.name: t
    for t in [
        T("baseline", "no regularization", "-", "-", "-", lambda ctx, s: Recipe()),
        T(
            "l2",
            "L2 penalty (coupled: grad += λ·w)",
            "L2Callback",
            "L + λ/2·Σw², grad += λ·w",
            "Krogh & Hertz 1992",
            lambda ctx, s: Recipe([L2Callback(s)]),
            (1e-4, 1e-3, 1e-2),
            1e-4,
            "λ",
        ),
        T(
            "l1_proximal",
            "proximal L1: soft-thresholding after each step, exact zeros",
            "L1Callback(proximal=True)",
            "w ← sign(w)·max(|w| − lr·λ, 0)",
            "Tibshirani 1996; Duchi & Singer 2009",
            lambda ctx, s: Recipe([L1Callback(s, proximal=True)]),
            (1e-3, 1e-2, 1e-1),
            1e-2,
            "λ",
        ),
        T(
            "elastic_net",
            "proximal elastic net, λ1 = λ2 = λ",
            "ElasticNetCallback(proximal=True)",
            "λ1·Σ|w| + λ2/2·Σw²",
            "Zou & Hastie 2005",
            lambda ctx, s: Recipe([ElasticNetCallback(s, s, proximal=True)]),
            (1e-3, 1e-2, 1e-1),
            1e-3,
            "λ",
        ),
        T(
            "max_norm",
            "max-norm on every unit's incoming weights",
            "MaxNormCallback",
            "w_u ← w_u·min(1, r/‖w_u‖₂)",
            "Srivastava et al. 2014",
            lambda ctx, s: Recipe([MaxNormCallback(s)]),
            (0.5, 1.0, 2.0, 3.0),
            2.0,
            "r",
        ),
        T(
            "dropout",
            "dropout after each activation (CNNs: before the head)",
            "add_dropout + DropoutCallback",
            "h̃ = h·z/(1−p), z ~ Bernoulli(1−p)",
            "Srivastava et al. 2014",
            _dropout,
            (0.1, 0.3, 0.5),
            0.1,
            "p",
        ),
        T(
            "augmentation",
            "Gaussian input noise (images: plus random resized crop)",
            "DataAugmentationCallback",
            "x̃ = x + ε, ε ~ N(0, σ²)",
            "Bishop 1995; Simard et al. 2003",
            _augmentation,
            (0.1, 0.2, 0.4),
            0.1,
            "σ",
        ),
        T(
            "mixup",
            "MixUp",
            "MixUpCallback",
            "x̃ = λx_i + (1−λ)x_j, ỹ = λy_i + (1−λ)y_j, λ ~ Beta(α, α)",
            "Zhang et al. 2018",
            lambda ctx, s: Recipe([MixUpCallback(s, num_classes=ctx.num_classes)]),
            (0.1, 0.2, 0.4),
            0.1,
            "α",
        ),
        T(
            "cutmix",
            "CutMix",
            "CutMixCallback",
            "paste a box of x_j into x_i; λ = kept area",
            "Yun et al. 2019",
            lambda ctx, s: Recipe([CutMixCallback(s, num_classes=ctx.num_classes)]),
            (0.25, 0.5, 1.0),
            1.0,
            "α",
        ),
        T(
            "early_stopping",
            "patience on the validation metric, restore the best weights",
            "EarlyStoppingCallback",
            "stop when the best validation value is k checks old; restore it",
            "Prechelt 1998",
            _early_stopping,
            (2, 5, 10),
            5,
            "patience",
        ),
        T(
            "ghost_bn",
            "ghost batch norm (BN statistics per virtual batch)",
            "GhostBatchNormCallback",
            "BN statistics per virtual batch of size v",
            "Hoffer, Hubara & Soudry 2017",
            _ghost_bn,
            (16, 32, 64),
            32,
            "v",
        ),
        T(
            "precise_bn",
            "exact BN population statistics before each validation",
            "PreciseBatchNormCallback",
            "μ, σ² ← mean/var over the training batches",
            "Wu & Johnson 2021",
            lambda ctx, s: Recipe([PreciseBatchNormCallback(ctx.steps_per_epoch)]),
        ),
        T(
            "label_smoothing",
            "label smoothing",
            "LabelSmoothingCallback",
            "ỹ = (1−α)·onehot(y) + α/K",
            "Szegedy et al. 2016",
            lambda ctx, s: Recipe([LabelSmoothingCallback(s, num_classes=ctx.num_classes)]),
            (0.05, 0.1, 0.2),
            0.1,
            "α",
        ),
        T(
            "stochastic_depth",
            "stochastic depth, linear decay to p_L",
            "StochasticDepthCallback",
            "block l kept with p_l = 1 − (l/L)(1 − p_L)",
            "Huang et al. 2016",
            _stochastic_depth,
            (0.5, 0.7, 0.9),
            0.7,
            "p_L",
        ),
        T(
            "jacobian",
            "Jacobian penalty, 1 random projection",
            "JacobianPenaltyMixin",
            "L + λ·(1/B)Σ_b ‖∂f(x_b)/∂x_b‖_F²",
            "Hoffman, Roberts & Yaida 2019",
            _jacobian,
            (1e-3, 1e-2, 1e-1),
            1e-3,
            "λ",
        ),
        T(
            "cnn",
            "no regularization, the 1-D residual CNN instead of the MLP (architectural prior)",
            "ResidualCNN1d",
            "convolution + pooling: translation equivariance",
            "LeCun et al. 1998; Greydanus & Kobak 2020",
            lambda ctx, s: Recipe(arch="cnn"),
        ),
    ]
}

#: The combined recipe: a common stack of techniques that compose, each at its chosen strength.
COMBINED: tuple[str, ...] = ("l2", "dropout", "augmentation", "mixup")
COMBINED_NAME = "combined"
#: Rows that change the architecture rather than regularize it (only in ``--model mlp`` runs).
ARCHITECTURE: tuple[str, ...] = ("cnn",)


def all_names() -> list[str]:
    """Every technique name, then ``"combined"``."""
    return [*TECHNIQUES, COMBINED_NAME]


def strength_label(name: str, strength: Any) -> str:
    """``"λ=0.001"``; ``"-"`` for a technique without a strength."""
    if name == COMBINED_NAME:
        return ", ".join(f"{n} {strength_label(n, s)}" for n, s in strength.items())
    t = TECHNIQUES[name]
    return f"{t.knob}={_s(strength)}" if t.knob and strength is not None else "-"


def skip_reason(name: str, ctx: TechniqueContext) -> str | None:
    """Why ``name`` cannot act on this model and data (``None``: it can)."""
    if name == COMBINED_NAME:
        reasons = [r for n in COMBINED if (r := skip_reason(n, ctx))]
        return "; ".join(reasons) if len(reasons) == len(COMBINED) else None
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    if name in ("ghost_bn", "precise_bn") and not _has(ctx.model, bn):
        return "the model has no BatchNorm layer"
    if name == "cutmix" and ctx.kind not in ("image", "config"):
        return "CutMix pastes 2-D boxes: it needs image inputs (B, C, H, W)"
    if name in ("mixup", "cutmix", "label_smoothing") and not ctx.soft_targets:
        return f"the training loss does not accept soft targets ({ctx.soft_targets_error})"
    if (
        name == "jacobian"
        and ctx.kind == "config"
        and not isinstance(ctx.model, JacobianPenaltyMixin)
    ):
        return "the LightningModule does not use JacobianPenaltyMixin"
    if name == "stochastic_depth":
        try:
            model = copy.deepcopy(ctx.model)
            apply_stochastic_depth(model, 0.5, block_types=_block_types(model))
        except (RuntimeError, ValueError, TypeError) as err:
            return f"no residual block to wrap ({str(err).split('. ')[0].strip()})"
    if name == "dropout":
        try:
            add_dropout(copy.deepcopy(ctx.model), 0.1, after=_dropout_after(ctx))
        except (RuntimeError, ValueError, TypeError) as err:
            return f"nowhere to add dropout ({str(err).splitlines()[0]})"
    if name in ARCHITECTURE and ctx.kind not in ("sequence", "image"):
        return "only for the demo's --model mlp on mnist1d or digits"
    return None


def build_recipe(name: str, ctx: TechniqueContext, strength: Any) -> Recipe:
    """Call the factory of ``name`` (``"combined"``: ``strength`` maps each part to its own)."""
    if name == COMBINED_NAME:
        recipe = Recipe()
        for n, s in strength.items():
            recipe = recipe.merge(TECHNIQUES[n].factory(ctx, s))
        return recipe
    return TECHNIQUES[name].factory(ctx, strength)


def describe(name: str) -> Technique:
    """The registry row of ``name`` (a synthetic one for ``"combined"``)."""
    if name == COMBINED_NAME:
        return Technique(
            COMBINED_NAME,
            "combined recipe: " + " + ".join(COMBINED) + ", each at its chosen strength",
            " + ".join(TECHNIQUES[n].classes for n in COMBINED),
            "all of them at once",
            "-",
            lambda ctx, s: build_recipe(COMBINED_NAME, ctx, s),
        )
    return TECHNIQUES[name]
