"""Dropout as a regularizer: insertion by surgery, rate schedules, and MC-dropout prediction.

Maths. Dropout multiplies each activation by a mask ``z ~ Bernoulli(p_keep)``. The reference
writes ``h̃ = h·z`` and scales activations by ``p_keep`` at inference. PyTorch (and this module)
uses *inverted* dropout instead: kept units are scaled by ``1/p_keep`` during training and the
network is the identity at inference. Both give the same expected activation
(``E[h·z/p_keep] = h`` versus ``E[h·z] = p_keep·h`` matched by ``p_keep·h`` at inference), so
they train the same model up to a constant rescaling of the next layer. See ``docs/dropout.md``.
Throughout, ``p`` is the **drop** probability, as in ``torch.nn.Dropout``.

Pure torch first (no Lightning import needed to use them):

* :func:`add_dropout` / :func:`add_input_dropout` / :func:`remove_dropout`: surgery that puts an
  ``nn.Dropout`` after (or in front of) chosen module types, and takes it out again.
* :func:`dropout_modules`, :func:`set_dropout_rate`: find and set the rate of every dropout
  module.
* :class:`EarlyDropoutSchedule`, :class:`CurriculumDropoutSchedule`: rate schedules.
* :func:`mc_dropout_predict`: batched Monte-Carlo dropout (mean, std, predictive entropy).

Lightning below them: :class:`DropoutCallback` (sets and schedules the rate, logs
``reg/dropout/p``) and :class:`MCDropoutMixin` (``self.mc_predict`` inside ``predict_step``).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_reg.core.compat import DropoutBase
from lightning_reg.core.logging import is_logging_step, log_scalars
from lightning_reg.core.schedules import ConstantSchedule, Schedule, as_schedule
from lightning_reg.core.surgery import (
    ModuleChange,
    TransparentWrapper,
    format_changes,
    replace_modules,
    restore_modules,
    training_flags_restored,
)
from lightning_reg.core.validation import check_choice, check_int, check_positive, check_probability

__all__ = [
    "DEFAULT_ACTIVATIONS",
    "CurriculumDropoutSchedule",
    "DropoutAfter",
    "DropoutBefore",
    "DropoutCallback",
    "EarlyDropoutSchedule",
    "MCDropoutMixin",
    "MCDropoutResult",
    "add_dropout",
    "add_input_dropout",
    "dropout_modules",
    "mc_dropout_predict",
    "remove_dropout",
    "set_dropout_rate",
]

#: Activation types :func:`add_dropout` inserts dropout after by default.
DEFAULT_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.ELU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.Tanh,
    nn.Hardswish,
)

_DROPOUT_KINDS: dict[str, type[nn.Module]] = {
    "dropout": nn.Dropout,
    "dropout1d": nn.Dropout1d,
    "dropout2d": nn.Dropout2d,
    "dropout3d": nn.Dropout3d,
    "alpha": nn.AlphaDropout,
}

#: One module type or a tuple of them (what ``after=`` and ``layer_types=`` take).
ModuleTypes = tuple[type[nn.Module], ...] | type[nn.Module]


def _check_p(p: Any) -> float:
    """A drop probability in [0, 1): p = 1 would zero everything and divide by 0."""
    return check_probability("p", p, allow_one=False)


# --------------------------------------------------------------------------------------------
# Surgery
# --------------------------------------------------------------------------------------------


class _DropoutWrapper(TransparentWrapper):
    """A module and a dropout; the wrapper follows the module's training mode."""

    def __init__(self, module: nn.Module, p: float, kind: str = "dropout") -> None:
        super().__init__(module)
        self.dropout = _DROPOUT_KINDS[check_choice("kind", kind, _DROPOUT_KINDS)](_check_p(p))
        self.training = self.dropout.training = module.training


class DropoutAfter(_DropoutWrapper):
    """``module`` followed by dropout: ``dropout(module(x))``.

    ``state_dict`` keys are those of ``module`` (see :class:`TransparentWrapper`); the dropout
    has no state. :meth:`unwrap` returns ``module``.

    Args:
        module: the module to run first.
        p: drop probability in [0, 1).
        kind: ``"dropout"`` (per element), ``"dropout1d"``/``"dropout2d"``/``"dropout3d"``
            (per channel) or ``"alpha"`` (AlphaDropout, for SELU networks).

    Raises:
        ValueError: if ``p`` is outside [0, 1) or NaN, or ``kind`` is unknown.

    Example:
        >>> layer = DropoutAfter(nn.ReLU(), 0.1)
        >>> layer(torch.ones(2, 3)).shape
        torch.Size([2, 3])
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.dropout(self.module(*args, **kwargs))


class DropoutBefore(_DropoutWrapper):
    """Dropout on the input of ``module``: ``module(dropout(x))``.

    ``state_dict`` keys are those of ``module``. :meth:`unwrap` returns ``module``.

    Args:
        module: the module whose (first) input is dropped out.
        p: drop probability in [0, 1).
        kind: as in :class:`DropoutAfter`.

    Raises:
        ValueError: if ``p`` is outside [0, 1) or NaN, or ``kind`` is unknown.

    Example:
        >>> layer = DropoutBefore(nn.Linear(3, 2), 0.2)
        >>> sorted(layer.state_dict())
        ['bias', 'weight']
    """

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.module(self.dropout(x), *args, **kwargs)


def add_dropout(
    model: nn.Module, p: float, *, after: ModuleTypes | None = None, kind: str = "dropout"
) -> list[ModuleChange]:
    """Insert dropout after every module of the types in ``after`` (in place).

    Each matching module is replaced by :class:`DropoutAfter` ``(module, p)``. A module that is
    called several times in ``forward`` (torchvision's ``BasicBlock`` reuses its ``relu``) gets
    dropout after every call. ``state_dict`` keys do not change, so weights load both ways.

    Args:
        model: the model to change in place.
        p: drop probability in [0, 1).
        after: module types to put dropout after. ``None``: the activations, i.e.
            :data:`DEFAULT_ACTIVATIONS` and timm's and Hugging Face's activation classes.
        kind: dropout flavour, see :class:`DropoutAfter`.

    Returns:
        The list of changes (path, old type, new type).

    Raises:
        ValueError: if ``p`` is outside [0, 1) or NaN, or ``kind`` is unknown.
        RuntimeError: if the model already contains :class:`DropoutAfter` (apply once), or no
            module of the ``after`` types was found.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> [c.path for c in add_dropout(m, 0.1)]
        ['1']
    """
    if after is None:  # timm's and Hugging Face's classes live in their `activations` modules
        found = {type(m) for m in model.modules() if type(m).__module__.endswith(".activations")}
        after = (*DEFAULT_ACTIVATIONS, *sorted(found - set(DEFAULT_ACTIVATIONS), key=str))
    return _insert(model, p, kind, after, DropoutAfter, "after")


def _insert(
    model: nn.Module, p: float, kind: str, types: ModuleTypes, cls: type[_DropoutWrapper], arg: str
) -> list[ModuleChange]:
    types = (types,) if isinstance(types, type) else tuple(types)
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise TypeError(f"`{arg}` must be a non-empty tuple of nn.Module types, got {types!r}")
    # torch's attention and transformer layers read their children's weights directly (fused
    # fast path) instead of calling them: a wrapper there would break them, so skip those.
    fused = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    unused = {id(c) for m in model.modules() if isinstance(m, fused) for c in m.children()}
    policy = dict.fromkeys(types, lambda mod, _: None if id(mod) in unused else cls(mod, p, kind))
    changes = replace_modules(model, policy, refuse_if_contains=(cls,))
    if not changes:
        found = sorted({type(m).__name__ for m in model.modules()})
        raise RuntimeError(
            f"Dropout insertion found no module of type {[t.__name__ for t in types]}. The "
            f"model has: {found}. Pass `{arg}=` with types the model uses."
        )
    return changes


def add_input_dropout(
    model: nn.Module, p: float, *, layer_types: ModuleTypes = (nn.Linear,), kind: str = "dropout"
) -> list[ModuleChange]:
    """Put dropout on the input of every module of ``layer_types`` (in place).

    Each matching module is replaced by :class:`DropoutBefore` ``(module, p)``; its
    ``state_dict`` keys do not change.

    Args:
        model: the model to change in place.
        p: drop probability in [0, 1).
        layer_types: module types whose inputs get dropout (default ``nn.Linear``).
        kind: dropout flavour, see :class:`DropoutAfter`.

    Returns:
        The list of changes.

    Raises:
        ValueError: if ``p`` is outside [0, 1) or NaN.
        RuntimeError: if the model already contains :class:`DropoutBefore`, or has no module
            of ``layer_types``.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> len(add_input_dropout(m, 0.2))
        2
    """
    return _insert(model, p, kind, layer_types, DropoutBefore, "layer_types")


def remove_dropout(model: nn.Module) -> list[ModuleChange]:
    """Undo :func:`add_dropout` and :func:`add_input_dropout`: put the original modules back.

    Dropout modules that were part of the model originally are left alone.

    Returns:
        The list of changes (empty if there was nothing to remove).
    """
    return restore_modules(model, _DropoutWrapper)


def dropout_modules(
    model: nn.Module, apply_to: Sequence[str] | None = None
) -> list[tuple[str, nn.Module]]:
    """Every ``nn.Dropout*`` module of ``model`` as ``(path, module)``.

    Args:
        model: the model to search.
        apply_to: optional ``fnmatch`` globs on the module path; a module is kept if it matches
            at least one.
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, DropoutBase)]
    if apply_to is not None:
        found = [(n, m) for n, m in found if any(fnmatch.fnmatchcase(n, g) for g in apply_to)]
    return found


def set_dropout_rate(modules: Sequence[nn.Module] | nn.Module, p: float) -> int:
    """Set the drop probability of dropout modules; returns how many were set.

    ``modules`` is a model (every dropout module inside is set) or a list of dropout modules.

    Raises:
        ValueError: if ``p`` is outside [0, 1) or NaN.
    """
    p = _check_p(p)
    if isinstance(modules, nn.Module):
        modules = [m for _, m in dropout_modules(modules)]
    for module in modules:
        module.p = p
    return len(modules)


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------


class EarlyDropoutSchedule(Schedule):
    """Early dropout (Liu et al. 2023): rate ``p`` for the first ``until`` units, then 0.

    With ``ramp="linear"`` the rate decreases linearly from ``p`` at 0 to 0 at ``until``, the
    paper's other early-dropout variant.

    Args:
        p: drop probability during the early phase, in [0, 1).
        until: length of the early phase in units (>= 1).
        unit: ``"epoch"`` or ``"step"``.
        ramp: ``"constant"`` or ``"linear"``.

    Raises:
        ValueError: if ``p`` is outside [0, 1), ``until < 1`` or ``ramp``/``unit`` is unknown.

    Example:
        >>> s = EarlyDropoutSchedule(0.1, until=2)
        >>> [s.at(t) for t in range(3)]
        [0.1, 0.1, 0.0]

    Reference:
        Liu, Xu, Darrell, Malik, Girshick, Rabbat, Sun, "Dropout Reduces Underfitting",
        ICML 2023.
    """

    def __init__(self, p: float, until: int, unit: str = "epoch", ramp: str = "constant") -> None:
        super().__init__(unit)
        self.p = _check_p(p)
        self.until = check_int("until", until, minimum=1)
        self.ramp = check_choice("ramp", ramp, ("constant", "linear"))

    def at(self, t: int) -> float:
        ramp = 1.0 - max(t, 0) / self.until if self.ramp == "linear" else 1.0
        return self.p * ramp if t < self.until else 0.0


class CurriculumDropoutSchedule(Schedule):
    """Curriculum dropout (Morerio et al. 2017): the rate ramps up from 0 towards ``p``.

    The paper schedules the *keep* probability ``θ(t) = (1 − θ̄)·exp(−γt) + θ̄``; with the drop
    probability ``p = 1 − θ̄`` this is ``p(t) = p·(1 − exp(−γ·t))``.

    Args:
        p: the final drop probability, in [0, 1).
        gamma: ramp speed ``γ > 0`` per unit (the paper uses ``10 / total_steps``).
        unit: ``"step"`` (default, as in the paper) or ``"epoch"``.

    Raises:
        ValueError: if ``p`` is outside [0, 1) or ``gamma`` is not a positive finite number.

    Example:
        >>> s = CurriculumDropoutSchedule(0.5, gamma=0.1)
        >>> s.at(0), round(s.at(10), 4)
        (0.0, 0.3161)

    Reference:
        Morerio, Cavazza, Volpi, Vidal, Murino, "Curriculum Dropout", ICCV 2017.
    """

    def __init__(self, p: float, gamma: float, unit: str = "step") -> None:
        super().__init__(unit)
        self.p = _check_p(p)
        self.gamma = check_positive("gamma", gamma)

    def at(self, t: int) -> float:
        return self.p * (1.0 - math.exp(-self.gamma * max(t, 0)))


# --------------------------------------------------------------------------------------------
# MC dropout
# --------------------------------------------------------------------------------------------


@dataclass
class MCDropoutResult:
    """What :func:`mc_dropout_predict` returns.

    Attributes:
        mean: mean over samples of the outputs (of the softmax probabilities for a classifier),
            shape ``(B, ...)``.
        std: standard deviation over samples (``correction=1``), same shape.
        entropy: predictive entropy ``H[mean]`` (nats) over the last dim, shape ``(B, ...)``;
            classifiers only, else ``None``.
        mutual_info: ``H[mean] − mean_s H[p_s]`` (BALD epistemic part); classifiers only.
        samples: all samples ``(n_samples, B, ...)`` if ``return_samples=True``, else ``None``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
        >>> result = mc_dropout_predict(net, torch.randn(2, 4), n_samples=5, classifier=True)
        >>> result.mean.shape, result.entropy.shape
        (torch.Size([2, 3]), torch.Size([2]))
    """

    mean: torch.Tensor
    std: torch.Tensor
    entropy: torch.Tensor | None = None
    mutual_info: torch.Tensor | None = None
    samples: torch.Tensor | None = None


def _samples_dropout(module: nn.Module) -> bool:
    """Whether ``module`` must be in training mode for its dropout to sample: a dropout module
    with ``p > 0``, a module that owns one (attention layers of torch, timm and Hugging Face
    apply theirs functionally, only in training mode; ``nn.TransformerEncoderLayer`` takes a
    fused path without dropout in eval), or a module with a ``*dropout*`` rate ``> 0`` (torch's
    ``MultiheadAttention.dropout``, Hugging Face's ``attention_dropout``)."""
    if isinstance(module, DropoutBase):
        return module.p > 0
    return any(isinstance(c, DropoutBase) and c.p > 0 for c in module.children()) or any(
        "dropout" in k and isinstance(v, float) and v > 0 for k, v in vars(module).items()
    )


@contextmanager
def mc_dropout_mode(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Context: only what applies dropout in training mode; flags restored exactly after.

    In training mode: every dropout module with ``p > 0``, each module that owns one, and each
    module with a float ``*dropout*`` rate ``> 0`` (attention layers that drop out functionally,
    only when they are in training mode). Everything else, BatchNorm included, runs in eval
    mode, so running statistics are not touched. On exit each module's ``training`` flag is what
    it was on entry, module by module.

    Raises:
        RuntimeError: if nothing in the model samples dropout (MC dropout would return the
            same output every time); the message names the dropout layers with ``p = 0``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).eval()
        >>> with mc_dropout_mode(net) as sampling:
        ...     [type(m).__name__ for m in sampling]
        ['Sequential', 'Dropout']
    """
    sampling = [m for m in model.modules() if _samples_dropout(m)]
    if not sampling:
        idle = [n for n, _ in dropout_modules(model)]
        raise RuntimeError(
            f"MC dropout needs dropout with p > 0, but the model has none (p = 0 in {idle[:3]}). "
            "Insert some with `lightning_reg.add_dropout(model, p)` or raise the dropout rate."
        )
    with training_flags_restored(model):
        model.eval()
        for module in sampling:
            module.training = True
        yield sampling


def mc_dropout_predict(
    model: nn.Module,
    x: torch.Tensor,
    n_samples: int = 30,
    *,
    chunk_size: int | None = None,
    max_batch_elements: int = 2**24,
    classifier: bool = False,
    output: str = "logits",
    return_samples: bool = False,
) -> MCDropoutResult:
    """Monte-Carlo dropout prediction: ``n_samples`` stochastic passes, batched.

    The input ``(B, ...)`` is repeated ``n`` times along the batch dimension and run in as few
    forwards as the memory bound allows (one forward per chunk of samples, not ``n`` sequential
    passes). ``nn.Dropout`` draws its mask per element, so every repeated row gets an
    independent mask. Dropout modules and the layers that apply dropout functionally
    (attention) are in training mode, everything else (BatchNorm included) in eval mode, see
    :func:`mc_dropout_mode`; each module's ``training`` flag is restored exactly afterwards.
    Runs under ``torch.no_grad``. The model must treat batch rows independently in eval mode
    (true for standard layers).

    Args:
        model: the network; ``model(x)`` must return a tensor with batch dimension first.
        x: input batch ``(B, ...)``.
        n_samples: number of Monte-Carlo samples (>= 2).
        chunk_size: samples per forward; ``None`` picks the largest that keeps the repeated
            input under ``max_batch_elements`` elements.
        max_batch_elements: memory bound on the input elements of one forward (>= 1).
        classifier: ``True`` if the outputs are class scores over the last dim: statistics are
            then taken over softmax probabilities and the predictive entropy is returned.
        output: ``"logits"`` (softmax is applied when ``classifier``) or ``"probs"`` (the
            outputs already are probabilities; implies ``classifier``).
        return_samples: also return every sample, ``(n_samples, B, ...)``.

    Returns:
        :class:`MCDropoutResult` (statistics in float32 or the output's wider dtype).

    Raises:
        ValueError: for ``n_samples < 2``, a bad ``chunk_size``/``max_batch_elements`` or an
            unknown ``output``.
        RuntimeError: if the model has no dropout with ``p > 0`` or does not return a tensor.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
        >>> res = mc_dropout_predict(net, torch.randn(5, 4), 20, classifier=True)
        >>> res.mean.shape, res.entropy.shape
        (torch.Size([5, 3]), torch.Size([5]))

    Reference:
        Gal & Ghahramani, "Dropout as a Bayesian Approximation: Representing Model Uncertainty
        in Deep Learning", ICML 2016.
    """
    n_samples = check_int("n_samples", n_samples, minimum=2)
    max_batch_elements = check_int("max_batch_elements", max_batch_elements, minimum=1)
    classifier = check_choice("output", output, ("logits", "probs")) == "probs" or classifier
    if not isinstance(x, torch.Tensor) or x.ndim < 1:
        raise RuntimeError(f"mc_dropout_predict needs a batched input tensor, got {type(x)}")
    fits = max(1, min(n_samples, max_batch_elements // max(x.numel(), 1)))  # samples per forward
    chunk_size = check_int("chunk_size", fits if chunk_size is None else chunk_size, minimum=1)
    pieces: list[torch.Tensor] = []
    with torch.no_grad(), mc_dropout_mode(model):
        for done in range(0, n_samples, chunk_size):
            k = min(chunk_size, n_samples - done)
            out = model(x.expand(k, *x.shape).flatten(0, 1))
            if not isinstance(out, torch.Tensor) or out.shape[:1] != (k * len(x),):
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise RuntimeError(
                    f"mc_dropout_predict needs the model to return a tensor, batch dimension "
                    f"first, one row per input row; {k * len(x)} rows gave {got}. Wrap the model "
                    "so it returns the tensor to average."
                )
            out = out.unflatten(0, (k, len(x))).to(torch.promote_types(out.dtype, torch.float32))
            pieces.append(out.softmax(-1) if classifier and output == "logits" else out)
    samples = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    std, mean = torch.std_mean(samples, dim=0, correction=1)
    entropy = mutual_info = None
    if classifier:  # predictive entropy H[mean], and H[mean] - mean_s H[p_s]
        entropy = -torch.special.xlogy(mean, mean).sum(-1)
        mutual_info = entropy + torch.special.xlogy(samples, samples).sum(-1).mean(0)
    return MCDropoutResult(mean, std, entropy, mutual_info, samples if return_samples else None)


# --------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------


class MCDropoutMixin:
    """LightningModule mixin: ``self.mc_predict(x, n_samples)`` for MC-dropout uncertainty.

    Put it before ``LightningModule`` in the bases. ``mc_predict`` works anywhere, including
    ``predict_step``, where Lightning has put the whole model in eval mode: only the dropout
    modules (and the attention layers that own them) are switched to training mode for the call
    and every flag is restored afterwards.

    Args (class attributes, override in the subclass):
        mc_classifier: default for ``classifier`` (statistics over softmax probabilities and a
            predictive entropy).
        mc_n_samples: default number of samples.

    Raises:
        RuntimeError: from :func:`mc_dropout_predict` if the model has no dropout module.

    Example:
        >>> class Net(MCDropoutMixin, pl.LightningModule):
        ...     mc_classifier = True
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 3))
        ...     def forward(self, x):
        ...         return self.net(x)
        ...     def predict_step(self, batch, batch_idx):
        ...         return self.mc_predict(batch[0], 16)
        >>> Net().mc_predict(torch.randn(2, 4)).mean.shape
        torch.Size([2, 3])

    Reference:
        Gal & Ghahramani, "Dropout as a Bayesian Approximation", ICML 2016.
    """

    mc_classifier: bool = False
    mc_n_samples: int = 30

    def mc_predict(
        self, x: torch.Tensor, n_samples: int | None = None, **kwargs: Any
    ) -> MCDropoutResult:
        """MC-dropout prediction through ``self(x)``: :func:`mc_dropout_predict` on ``self``.

        Args:
            x: input batch ``(B, ...)``.
            n_samples: number of samples; ``None``: ``mc_n_samples``.
            **kwargs: the keyword arguments of :func:`mc_dropout_predict` (``chunk_size``,
                ``max_batch_elements``, ``classifier``, ``output``, ``return_samples``);
                ``classifier=None`` or absent: ``mc_classifier``.
        """
        if not isinstance(self, nn.Module):
            raise RuntimeError("MCDropoutMixin must be mixed into an nn.Module/LightningModule")
        if kwargs.get("classifier") is None:
            kwargs["classifier"] = self.mc_classifier
        n_samples = self.mc_n_samples if n_samples is None else n_samples
        return mc_dropout_predict(self, x, n_samples, **kwargs)


class DropoutCallback(pl.Callback):
    """Set and schedule the rate of every dropout module of the model.

    Give either a constant ``p`` or a ``schedule`` (any :class:`~lightning_reg.core.Schedule`,
    for example :class:`EarlyDropoutSchedule`, :class:`CurriculumDropoutSchedule` or
    ``LinearSchedule``). The rate is set before every training batch from
    ``trainer.current_epoch`` / ``trainer.global_step``, so a resumed run continues the schedule
    exactly. Logs ``reg/dropout/p`` on logging steps.

    With ``insert=True`` the callback first inserts dropout after the model's activations
    (:func:`add_dropout`, in ``setup``, once), for models that have none.

    Args:
        p: constant drop probability in [0, 1), or ``None`` when ``schedule`` is given.
        schedule: a :class:`Schedule` of the drop probability (values must stay in [0, 1)).
        apply_to: optional ``fnmatch`` globs on module paths (for example ``["model.head.*"]``);
            only matching dropout modules are scheduled.
        insert: insert dropout after activations (:data:`DEFAULT_ACTIVATIONS`) in ``setup``.

    Raises:
        ValueError: if neither or both of ``p`` and ``schedule`` are given, or ``p`` is outside
            [0, 1) or NaN.
        RuntimeError: at fit start, if the model has no dropout module to schedule; during
            training, if the schedule leaves [0, 1).

    Example:
        >>> cb = DropoutCallback(schedule=EarlyDropoutSchedule(0.1, until=5))
        >>> trainer = pl.Trainer(callbacks=[cb])  # doctest: +SKIP

        LightningCLI YAML::

            trainer:
              callbacks:
                - class_path: lightning_reg.DropoutCallback
                  init_args:
                    schedule:
                      class_path: lightning_reg.dropout.CurriculumDropoutSchedule
                      init_args: {p: 0.3, gamma: 0.001}

    Reference:
        Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from Overfitting",
        JMLR 2014; Liu et al., "Dropout Reduces Underfitting", ICML 2023; Morerio et al.,
        "Curriculum Dropout", ICCV 2017.
    """

    def __init__(
        self,
        p: float | None = None,
        *,
        schedule: Schedule | None = None,
        apply_to: list[str] | None = None,
        insert: bool = False,
    ) -> None:
        super().__init__()
        if (p is None) == (schedule is None):
            raise ValueError(
                "DropoutCallback needs exactly one of `p` (a constant rate in [0, 1)) or "
                f"`schedule` (a Schedule); got p={p!r}, schedule={schedule!r}"
            )
        self.schedule = as_schedule(_check_p(p) if schedule is None else schedule, "schedule")
        if isinstance(self.schedule, ConstantSchedule):
            _check_p(self.schedule.value_)
        apply_to = [apply_to] if isinstance(apply_to, str) else apply_to
        if apply_to is not None and not all(isinstance(glob, str) for glob in apply_to):
            raise TypeError(f"`apply_to` must be a list of str globs, got {apply_to!r}")
        self.apply_to = None if apply_to is None else list(apply_to)
        self.insert = bool(insert)
        self._dropouts: list[nn.Module] = []

    def _rate(self, trainer: pl.Trainer) -> float:
        value = self.schedule.value(epoch=trainer.current_epoch, step=trainer.global_step)
        if not 0.0 <= value < 1.0:  # NaN fails too
            raise RuntimeError(
                f"Fix the dropout schedule {self.schedule!r}: it gave p={value} at epoch "
                f"{trainer.current_epoch}, step {trainer.global_step}; p must be in [0, 1)."
            )
        return value

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.insert and not any(isinstance(m, DropoutAfter) for m in pl_module.modules()):
            changes = add_dropout(pl_module, self._rate(trainer))
            rank_zero_info(format_changes(changes, "DropoutCallback(insert=True)"))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._dropouts = [m for _, m in dropout_modules(pl_module, self.apply_to)]
        if not self._dropouts:
            raise RuntimeError(
                f"DropoutCallback found no nn.Dropout* module (apply_to={self.apply_to}) in the "
                "model. Insert dropout with `lightning_reg.add_dropout(model, p)` or use "
                "`DropoutCallback(..., insert=True)`, or fix `apply_to`."
            )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        p = self._rate(trainer)
        set_dropout_rate(self._dropouts, p)
        if is_logging_step(trainer):
            log_scalars(pl_module, {"reg/dropout/p": p})
