"""Tiny transformers vision models built offline from configs (random weights), for fast tests."""

from __future__ import annotations

import torch
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextV2Config,
    ConvNextV2ForImageClassification,
    DeiTConfig,
    DeiTForImageClassification,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

_VIT = dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)

TINY = {
    "resnet-basic": lambda: ResNetForImageClassification(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], layer_type="basic", num_labels=3)
    ),
    "resnet-bottleneck": lambda: ResNetForImageClassification(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="bottleneck", num_labels=3)
    ),
    "vit": lambda: ViTForImageClassification(ViTConfig(**_VIT, num_labels=3)),
    "deit": lambda: DeiTForImageClassification(DeiTConfig(**_VIT, num_labels=3)),
    "convnext": lambda: ConvNextForImageClassification(
        ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3)
    ),
    "convnextv2": lambda: ConvNextV2ForImageClassification(
        ConvNextV2Config(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3)
    ),
    "swin": lambda: SwinForImageClassification(
        SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=3)
    ),
}


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model in eval mode with non-trivial BatchNorm statistics (so folding is tested for real)."""
    torch.manual_seed(seed)
    model = TINY[name]().eval()
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    model.config.architectures = [type(model).__name__]
    return model


def tiny_mobilenet(seed: int = 0) -> torch.nn.Module:
    """An architecture without a block map (exercises the per-layer fallback)."""
    torch.manual_seed(seed)
    model = MobileNetV2ForImageClassification(MobileNetV2Config(image_size=32, depth_multiplier=0.25, num_labels=3))
    model.config.architectures = [type(model).__name__]
    return model.eval()
