"""The model zoo: tiny, download-free models from torchvision, timm, Hugging Face and torch.

Shared by ``tests/test_model_zoo.py`` and ``scripts/gpu_check.py``. Each :class:`ZooModel` builds
its network from a small configuration (``pretrained=False``, no network access), makes a batch
of the right kind (a list ``[images, labels]`` or a dict ``{input_ids, attention_mask, labels}``)
and gives the reference weight-decay rule of its family:

* timm: ``param_groups_weight_decay(model, no_weight_decay_list=model.no_weight_decay())``
* Hugging Face: ``Trainer.get_decay_parameter_names`` (no biases, no LayerNorm weights)
* torchvision / torch: timm's generic rule (no 1-D parameters, no biases)

:class:`ZooModule` wraps any of them in one generic LightningModule (cross-entropy on the logits;
a Hugging Face output gives its ``.logits``), and :class:`MemoryLogger` keeps every logged metric.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch import nn

NUM_CLASSES = 10
IMAGE = (3, 32, 32)
SEQ_LEN = 8
VOCAB = 100
D_MODEL = 32

#: Parameter names that are positional embeddings or class tokens (never decayed or constrained).
POSITIONAL = re.compile(r"(pos_embed|position_embedding|cls_token|dist_token|reg_token)")


class EncoderClassifier(nn.Module):
    """``nn.TransformerEncoder`` (d_model 32, 2 layers, ``batch_first=True``) + a linear head."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            D_MODEL, nhead=2, dim_feedforward=64, dropout=0.1, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(D_MODEL, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


def _tv_resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=NUM_CLASSES)


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)

    return build


def _hf_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=NUM_CLASSES,
    )
    return BertForSequenceClassification(config)


def _hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=NUM_CLASSES,
    )
    return ViTForImageClassification(config)


def _timm_decay_names(model: nn.Module) -> set[str]:
    from timm.optim import param_groups_weight_decay

    no_decay = getattr(model, "no_weight_decay", None)
    groups = param_groups_weight_decay(
        model, weight_decay=1.0, no_weight_decay_list=no_decay() if no_decay else ()
    )
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    return {n for n, p in model.named_parameters() if id(p) in decayed}


def _hf_decay_names(model: nn.Module) -> set[str]:
    from transformers import Trainer

    # an instance method that never reads `self`: Hugging Face's own no-decay rule
    return set(Trainer.get_decay_parameter_names(None, model))


@dataclass(frozen=True)
class ZooModel:
    """One model family of the zoo.

    Attributes:
        name: the test id.
        build: builds the network from a tiny config (random weights, no download).
        kind: ``"image"`` (list batch of 3×32×32 images), ``"text"`` (dict batch of token ids
            and attention mask) or ``"sequence"`` (list batch of (B, 8, 32) float sequences).
        family: ``"timm"``, ``"hf"``, ``"torchvision"`` or ``"torch"``: which decay rule applies.
        batch_norm: the network has BatchNorm layers (ghost / precise BN apply).
        dropout: the network has dropout modules (MC dropout samples).
    """

    name: str
    build: Callable[[], nn.Module]
    kind: str
    family: str
    batch_norm: bool
    dropout: bool

    def reference_decay_names(self, model: nn.Module) -> set[str]:
        """The names the family's own weight-decay rule decays."""
        if self.family == "hf":
            return _hf_decay_names(model)
        return _timm_decay_names(model)  # timm's rule (generic for torchvision / torch)

    def batch(self, batch_size: int = 4, seed: int = 0) -> list[Any] | dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
        if self.kind == "text":
            ids = torch.randint(1, VOCAB, (batch_size, SEQ_LEN), generator=g)
            mask = torch.ones(batch_size, SEQ_LEN, dtype=torch.long)
            mask[0, SEQ_LEN // 2 :] = 0  # one padded sequence
            return {"input_ids": ids, "attention_mask": mask, "labels": y}
        shape = IMAGE if self.kind == "image" else (SEQ_LEN, D_MODEL)
        return [torch.randn(batch_size, *shape, generator=g), y]

    def inputs(self, batch_size: int = 4, seed: int = 1) -> torch.Tensor:
        """A bare input tensor (token ids for text models), for eval-output comparisons."""
        batch = self.batch(batch_size, seed)
        return batch["input_ids"] if isinstance(batch, dict) else batch[0]


ZOO: list[ZooModel] = [
    ZooModel("tv_resnet18", _tv_resnet18, "image", "torchvision", batch_norm=True, dropout=False),
    ZooModel(
        "timm_resnet18",
        _timm("resnet18", channels=(16, 32, 64, 128)),  # ResNet-18's blocks, narrower (speed)
        "image",
        "timm",
        batch_norm=True,
        dropout=False,
    ),
    ZooModel(
        "timm_vit_tiny",
        _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, drop_rate=0.1, proj_drop_rate=0.1),
        "image",
        "timm",
        batch_norm=False,
        dropout=True,
    ),
    ZooModel(
        "timm_convnext_atto",
        _timm("convnext_atto"),
        "image",
        "timm",
        batch_norm=False,
        dropout=False,
    ),
    ZooModel("hf_bert", _hf_bert, "text", "hf", batch_norm=False, dropout=True),
    ZooModel("hf_vit", _hf_vit, "image", "hf", batch_norm=False, dropout=True),
    ZooModel(
        "torch_transformer", EncoderClassifier, "sequence", "torch", batch_norm=False, dropout=True
    ),
]
ZOO_BY_NAME = {m.name: m for m in ZOO}


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor of a plain or a Hugging Face model's output."""
    return output.logits if hasattr(output, "logits") else output


class ZooModule(pl.LightningModule):
    """A generic classifier around any zoo model (list or dict batches, cross-entropy).

    ``val_scores`` (optional) makes validation log ``val_score`` from that fixed sequence, one
    value per validation run, so an early-stopping test knows the best epoch in advance.
    """

    def __init__(
        self, model: nn.Module, lr: float = 0.01, val_scores: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.val_scores = list(val_scores) if val_scores is not None else None
        self.val_runs = 0

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype == torch.long:  # token ids
            return logits_of(self.model(input_ids=x, attention_mask=attention_mask))
        return logits_of(self.model(x))

    def _logits_targets(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, dict):
            return self(batch["input_ids"], batch["attention_mask"]), batch["labels"]
        return self(batch[0]), batch[1]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        logits, y = self._logits_targets(batch)
        loss = F.cross_entropy(logits.float(), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        logits, y = self._logits_targets(batch)
        self.log("val_loss", F.cross_entropy(logits.float(), y))

    def on_validation_epoch_end(self) -> None:
        if self.val_scores is not None:
            self.log("val_score", self.val_scores[min(self.val_runs, len(self.val_scores) - 1)])
        self.val_runs += 1

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class MemoryLogger(Logger):
    """A Lightning logger that keeps every ``log_metrics`` call in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    @property
    def experiment(self) -> MemoryLogger:
        return self

    @property
    def metrics_keys(self) -> set[str]:
        return self.keys

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.history.append((step, {k: float(v) for k, v in metrics.items()}))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @property
    def keys(self) -> set[str]:
        return {k for _, metrics in self.history for k in metrics}

    def last(self, key: str) -> float:
        """The last value logged under ``key``."""
        values = [m[key] for _, m in self.history if key in m]
        if not values:
            raise KeyError(f"{key!r} was never logged; logged keys: {sorted(self.keys)}")
        return values[-1]
