"""The model-zoo matrix (issue 10): every model-changing or parameter-selecting technique on the
models users bring: torchvision ``resnet18``, timm ``resnet18`` / ``vit_tiny_patch16_224`` /
``convnext_atto``, Hugging Face ``BertForSequenceClassification`` / ``ViTForImageClassification``
and ``nn.TransformerEncoder``, all from tiny configurations (``tests/helpers/zoo.py``).

Each cell shows all of:

* 2 training steps inside a Lightning ``Trainer`` (CPU, batch of 4);
* finite weights;
* the technique's ``reg/*`` keys reach the logger;
* the state dict loads into the plain model and back;
* in eval mode the trained model gives exactly the plain model's output (same weights);
* the default selection (``ParamSelection("weights")``) is the model family's own no-decay rule
  (timm's ``param_groups_weight_decay`` with ``no_weight_decay()``, Hugging Face's
  ``Trainer.get_decay_parameter_names``, minus positional embeddings and class tokens), and the
  technique acts on exactly that selection where it reports a number over it.

Ghost and precise BN apply to the BatchNorm models; on the others the cell checks the clear error.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from lightning_reg import (
    DropoutCallback,
    EarlyStoppingCallback,
    ElasticNetCallback,
    GhostBatchNorm,
    GhostBatchNormCallback,
    L1Callback,
    L2Callback,
    MaxNormCallback,
    ParamSelection,
    PreciseBatchNormCallback,
    RegularizationMonitorCallback,
    StochasticDepthCallback,
    StochasticDepthWrapper,
    add_dropout,
    mc_dropout_predict,
)
from tests.helpers.zoo import (
    NUM_CLASSES,
    POSITIONAL,
    ZOO,
    MemoryLogger,
    ZooModel,
    ZooModule,
    logits_of,
)

pytestmark = pytest.mark.slow  # still runs by default (addopts deselects nothing)

TECHNIQUES = [
    "penalties",
    "max_norm",
    "dropout_injection",
    "mc_dropout",
    "stochastic_depth",
    "ghost_bn",
    "precise_bn",
    "monitor",
    "early_stopping",
]

#: shape-preserving residual blocks that stochastic depth must wrap by default, never a
#: downsampling one: torchvision's ResNet-18 has 8 BasicBlocks, 3 of them downsample; the narrowed
#: timm ResNet-18 (64-channel stem, 16-channel first stage) also changes width in its first block
SD_BLOCKS = {
    "tv_resnet18": 5,
    "timm_resnet18": 4,
    "timm_vit_tiny": 12,
    "timm_convnext_atto": 12,
    "hf_bert": 2,
    "hf_vit": 2,
    "torch_transformer": 2,
}

MAX_NORM = 0.05


@functools.cache
def _base(name: str) -> nn.Module:
    """Each network is built once (timm's init is slow); every cell works on a deep copy."""
    torch.manual_seed(0)
    model = next(z for z in ZOO if z.name == name).build()
    return model.eval()


def _fresh(zm: ZooModel) -> nn.Module:
    return copy.deepcopy(_base(zm.name)).train()


def _loader(zm: ZooModel, seed: int) -> DataLoader:
    return DataLoader([zm.batch(4, seed=seed)], batch_size=None)


def _expected_selection(zm: ZooModel, model: nn.Module) -> set[str]:
    """The family's own decay rule; Hugging Face's rule minus positional embeddings/class tokens."""
    names = zm.reference_decay_names(model)
    if zm.family == "hf":
        names = {n for n in names if not POSITIONAL.search(n)}
    return names


def _assert_selection(zm: ZooModel, model: nn.Module) -> set[str]:
    selected = {s.name for s in ParamSelection("weights").select(model)}
    expected = _expected_selection(zm, model)
    assert selected == expected, (
        f"{zm.name}: default selection differs from the family's no-decay rule: "
        f"extra {sorted(selected - expected)}, missing {sorted(expected - selected)}"
    )
    forbidden = [
        n
        for n in selected
        if n.endswith(".bias") or POSITIONAL.search(n) or "norm" in n.lower() or ".ln" in n
    ]
    assert not forbidden, f"{zm.name}: selected {forbidden}"
    return selected


def _selected_tensors(zm: ZooModel, module: ZooModule) -> list[torch.Tensor]:
    names = _expected_selection(zm, _base(zm.name))
    params = dict(module.model.named_parameters())
    return [params[n].detach().double() for n in sorted(names)]


class Probe(Callback):
    """Counts surgery wrappers at train start and snapshots the weights at each validation."""

    def __init__(self) -> None:
        self.wrappers: dict[str, int] = {}
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        mods = list(pl_module.modules())
        self.wrappers["sd"] = sum(isinstance(m, StochasticDepthWrapper) for m in mods)
        self.wrappers["ghost"] = sum(isinstance(m, GhostBatchNorm) for m in mods)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.snapshots.append({k: v.clone() for k, v in pl_module.model.state_dict().items()})


def _fit(
    zm: ZooModel, module: ZooModule, callbacks: list[Callback], *, val: bool = False
) -> tuple[pl.Trainer, MemoryLogger, Probe]:
    logger, probe = MemoryLogger(), Probe()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,  # one batch per epoch: 2 steps, a validation after each
        logger=logger,
        log_every_n_steps=1,
        callbacks=[*callbacks, probe],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, _loader(zm, 0), _loader(zm, 1) if val else None)
    return trainer, logger, probe


def _eval_logits(zm: ZooModel, model: nn.Module) -> torch.Tensor:
    x = zm.inputs(4, seed=2)
    with torch.no_grad():
        if zm.kind == "text":
            return logits_of(model(input_ids=x, attention_mask=torch.ones_like(x)))
        return logits_of(model(x))


def _assert_cell(
    zm: ZooModel,
    module: ZooModule,
    trainer: pl.Trainer,
    logger: MemoryLogger,
    keys: tuple[str, ...],
) -> None:
    assert trainer.global_step == 2, f"{zm.name}: ran {trainer.global_step} steps"
    bad = [n for n, p in module.named_parameters() if not torch.isfinite(p).all()]
    assert not bad, f"{zm.name}: non-finite weights {bad}"
    seen = logger.keys | set(trainer.callback_metrics)
    missing = [k for k in keys if not any(s.startswith(k) for s in seen)]
    assert not missing, f"{zm.name}: {missing} not logged; saw {sorted(seen)}"
    for k in seen:
        if k.startswith("reg/") and k in trainer.callback_metrics:
            assert torch.isfinite(torch.as_tensor(trainer.callback_metrics[k])).all(), k

    # the state dict loads into the plain model and back
    plain = _fresh(zm)
    trained = module.model.state_dict()
    plain.load_state_dict(trained)  # strict: the same keys, the same shapes
    module.model.load_state_dict(plain.state_dict())
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, trained[name]), f"{zm.name}: {name} changed in the round trip"

    # same weights, eval mode: exactly the plain model's output
    module.model.eval()
    plain.eval()
    ours, theirs = _eval_logits(zm, module.model), _eval_logits(zm, plain)
    assert ours.shape == (4, NUM_CLASSES)
    assert torch.equal(ours, theirs), (
        f"{zm.name}: eval output differs from the plain model's by "
        f"{(ours - theirs).abs().max().item():.3g}"
    )
    _assert_selection(zm, plain)


def _dropout_after(zm: ZooModel) -> dict[str, Any]:
    """The activations to put dropout after: torch's by default; Hugging Face's own GELU class;
    ``nn.TransformerEncoderLayer`` calls its activation as a function, so after its Linears."""
    if zm.family == "hf":
        from transformers.activations import GELUActivation

        return {"after": (GELUActivation,)}
    if zm.name == "torch_transformer":
        return {"after": (nn.Linear,)}
    return {}


# -- the default selection, per model (the rule every cell re-checks) --------------------------


@pytest.mark.parametrize("zm", ZOO, ids=[z.name for z in ZOO])
def test_default_selection_is_the_family_no_decay_rule(zm):
    selected = _assert_selection(zm, _base(zm.name))
    if zm.name == "timm_vit_tiny":
        assert "pos_embed" not in selected and "cls_token" not in selected
    if zm.family == "hf":
        hf = zm.reference_decay_names(_base(zm.name))
        assert selected <= hf and all(POSITIONAL.search(n) for n in hf - selected)


# -- the matrix -------------------------------------------------------------------------------


@pytest.mark.parametrize("technique", TECHNIQUES)
@pytest.mark.parametrize("zm", ZOO, ids=[z.name for z in ZOO])
def test_zoo_cell(zm, technique):
    torch.manual_seed(0)
    model = _fresh(zm)
    module = ZooModule(model)

    if technique == "penalties":
        l2, l1, en = (
            L2Callback(1e-2),
            L1Callback(1e-4, proximal=True),
            ElasticNetCallback(1e-4, 1e-3),
        )
        trainer, logger, _ = _fit(zm, module, [l2, l1, en])
        _assert_cell(zm, module, trainer, logger, ("reg/l2/", "reg/l1/", "reg/elastic_net/"))
        # the logged penalties are over exactly the family's selection (final weights)
        w = _selected_tensors(zm, module)
        sq = sum((t**2).sum() for t in w).item()
        ab = sum(t.abs().sum() for t in w).item()
        assert logger.last("reg/l2/penalty") == pytest.approx(1e-2 / 2 * sq, rel=1e-4)
        assert logger.last("reg/l1/penalty") == pytest.approx(1e-4 * ab, rel=1e-4)
        expected_en = 1e-4 * ab + 1e-3 / 2 * sq
        assert logger.last("reg/elastic_net/penalty") == pytest.approx(expected_en, rel=1e-4)

    elif technique == "max_norm":
        before = {n: p.detach().norm().item() for n, p in module.model.named_parameters()}
        trainer, logger, _ = _fit(zm, module, [MaxNormCallback(MAX_NORM)])
        _assert_cell(zm, module, trainer, logger, ("reg/max_norm/",))
        selected = _expected_selection(zm, _base(zm.name))
        for name, p in module.model.named_parameters():
            if name in selected:  # every unit (dim 0) inside the ball
                units = p.detach().double().flatten(1).norm(dim=1)
                assert units.max() <= MAX_NORM * (1 + 1e-5), f"{zm.name}: {name} {units.max()}"
            elif p.ndim >= 2 and before[name] > 4 * MAX_NORM:  # e.g. pos_embed: not projected
                assert p.detach().norm() > MAX_NORM, f"{zm.name}: {name} was constrained"

    elif technique == "dropout_injection":
        changes = add_dropout(module.model, 0.1, **_dropout_after(zm))
        assert changes, f"{zm.name}: add_dropout changed nothing"
        trainer, logger, _ = _fit(zm, module, [DropoutCallback(0.1)])
        _assert_cell(zm, module, trainer, logger, ("reg/dropout/p",))

    elif technique == "mc_dropout":
        if not zm.dropout:
            with pytest.raises(RuntimeError, match="dropout"):
                mc_dropout_predict(module, zm.inputs(4), n_samples=2)
            add_dropout(module.model, 0.1, **_dropout_after(zm))  # the error's recipe
        trainer, logger, _ = _fit(zm, module, [DropoutCallback(0.1)])
        _assert_cell(zm, module, trainer, logger, ("reg/dropout/p",))
        module.eval()
        result = mc_dropout_predict(module, zm.inputs(4), n_samples=8)
        assert result.mean.shape == (4, NUM_CLASSES)
        assert (result.std > 0).float().mean() > 0.5, f"{zm.name}: MC dropout did not sample"
        assert not module.training and not any(m.training for m in module.modules())

    elif technique == "stochastic_depth":
        cb = StochasticDepthCallback(0.5, seed=0)
        trainer, logger, probe = _fit(zm, module, [cb])
        assert probe.wrappers["sd"] == SD_BLOCKS[zm.name], f"{zm.name}: wrapped {probe.wrappers}"
        if zm.name.endswith("resnet18"):  # cross-check: the blocks without a downsample branch
            plain = [m for m in _base(zm.name).modules() if type(m).__name__ == "BasicBlock"]
            assert SD_BLOCKS[zm.name] == sum(m.downsample is None for m in plain)
        _assert_cell(zm, module, trainer, logger, ("reg/stochastic_depth/",))

    elif technique in ("ghost_bn", "precise_bn"):
        cb = GhostBatchNormCallback(2) if technique == "ghost_bn" else PreciseBatchNormCallback(1)
        if not zm.batch_norm:
            with pytest.raises(RuntimeError, match="BatchNorm"):
                _fit(zm, module, [cb], val=True)
            return
        trainer, logger, probe = _fit(zm, module, [cb], val=True)
        if technique == "ghost_bn":
            assert probe.wrappers["ghost"] > 0, f"{zm.name}: no GhostBatchNorm during training"
            _assert_cell(zm, module, trainer, logger, ("reg/ghost_bn/",))
        else:
            _assert_cell(zm, module, trainer, logger, ("reg/precise_bn/",))

    elif technique == "monitor":
        target_key = "labels" if zm.kind == "text" else 1  # where the batch keeps its targets
        cb = RegularizationMonitorCallback(
            every_n_steps=1, num_classes=NUM_CLASSES, target_key=target_key
        )
        trainer, logger, _ = _fit(zm, module, [cb], val=True)
        _assert_cell(zm, module, trainer, logger, ("reg/monitor/norm/total", "reg/monitor/"))
        w = _selected_tensors(zm, module)
        total = sum((t**2).sum() for t in w).sqrt().item()
        assert logger.last("reg/monitor/norm/total") == pytest.approx(total, rel=1e-4)

    elif technique == "early_stopping":
        module = ZooModule(model, val_scores=[1.0, 2.0])  # the first validation is the best
        cb = EarlyStoppingCallback("val_score", patience=5, restore_best_weights=True)
        trainer, logger, probe = _fit(zm, module, [cb], val=True)
        _assert_cell(zm, module, trainer, logger, ("reg/early_stopping/",))
        assert len(probe.snapshots) == 2
        final = module.model.state_dict()
        best, last = probe.snapshots
        assert all(torch.equal(final[k], best[k]) for k in best), f"{zm.name}: not restored"
        assert not all(torch.equal(final[k], last[k]) for k in last), "the steps changed nothing"
