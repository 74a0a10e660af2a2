"""Tiny models of the zoos users bring (torchvision, timm, Hugging Face, torch), built from
small configurations with no download, and small residual blocks for surgery tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

#: name -> paths of the blocks that stochastic depth wraps by default.
ZOO_BLOCKS: dict[str, list[str]] = {
    "torchvision_resnet18": ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"],
    "timm_resnet18": ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"],
    "timm_vit": [f"blocks.{i}" for i in range(2)],
    "timm_convnext": [
        f"stages.{s}.blocks.{b}" for s, n in enumerate((2, 2, 6, 2)) for b in range(n)
    ],
    "hf_bert": ["bert.encoder.layer.0", "bert.encoder.layer.1"],
    "hf_vit": ["vit.layers.0", "vit.layers.1"],
    "hf_gpt2": ["transformer.h.0", "transformer.h.1"],
    "hf_llama": ["model.layers.0", "model.layers.1"],
    "torch_encoder": ["layers.0", "layers.1"],
}


class LinearResidual(nn.Module):
    """``x + W x``: residual block that is linear in its input (so a stack of randomly dropped
    ones is multilinear in the independent keep decisions and its mean is exact)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x)


class BatchNormResidual(nn.Module):
    """``x + BN(W x)`` with a ``BatchNorm1d``: cannot normalise a batch of one row."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.bn = nn.BatchNorm1d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn(self.fc(x))


def _hf_quiet() -> Any:
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    return transformers


def zoo_model(name: str, *, dropout: float = 0.1) -> tuple[nn.Module, Callable[[nn.Module], Any]]:
    """``(model, run)``: a tiny seeded model of the zoo and ``run(model) -> output tensor`` on a
    fixed batch of 4 (token ids with a padding mask for text models, 32x32 images otherwise)."""
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    ids = torch.randint(0, 100, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[0, 5:] = 0
    if name == "torchvision_resnet18":
        tvm = pytest.importorskip("torchvision.models")
        return tvm.resnet18(num_classes=10), lambda m: m(images)
    if name.startswith("timm_"):
        timm = pytest.importorskip("timm")
        arch = {"timm_resnet18": "resnet18", "timm_convnext": "convnext_atto"}.get(name)
        if arch is None:  # timm_vit: a 2-block ViT-Tiny on 32x32 images
            model = timm.create_model(
                "vit_tiny_patch16_224", img_size=32, depth=2, num_classes=10, drop_rate=dropout
            )
        else:
            model = timm.create_model(arch, pretrained=False, num_classes=10)
        return model, lambda m: m(images)
    if name == "torch_encoder":
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=dropout, batch_first=True)
        model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        src, pad = torch.randn(4, 5, 16), torch.zeros(4, 5, dtype=torch.bool)
        pad[0, 3:] = True
        return model, lambda m: m(src, src_key_padding_mask=pad)
    tf = _hf_quiet()
    if name == "hf_vit":
        config = tf.ViTConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=64, num_labels=10,
            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        )  # fmt: skip
        return tf.ViTForImageClassification(config), lambda m: m(pixel_values=images).logits
    if name == "hf_bert":
        config = tf.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            vocab_size=100, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        )  # fmt: skip
        model = tf.BertForSequenceClassification(config)
    elif name == "hf_gpt2":
        config = tf.GPT2Config(
            n_embd=32, n_layer=2, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0,
            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        )  # fmt: skip
        model = tf.GPT2LMHeadModel(config)
    elif name == "hf_llama":
        config = tf.LlamaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            intermediate_size=64, vocab_size=100, attention_dropout=dropout,
        )  # fmt: skip
        model = tf.LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown zoo model {name!r}")
    if name == "hf_bert":
        return model, lambda m: m(input_ids=ids, attention_mask=mask).logits
    return model, lambda m: m(input_ids=ids, attention_mask=mask, use_cache=False).logits
