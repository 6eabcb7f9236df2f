"""BatchNorm folding: conv → BN pairs become one conv with a bias (exact in eval mode).

``W' = W · γ/σ`` per output channel and ``b' = (b − μ) · γ/σ + β`` with ``σ = sqrt(var + eps)``.
Pairs are found structurally: a module holding a ``Conv2d`` and a ``BatchNorm2d`` under the attribute
names below, whose forward applies them back to back (ResNet's ``ResNetConvLayer``/``ResNetShortCut``,
MobileNetV2's conv layers). A saved checkpoint records the folded BN names so a reload rebuilds
the same structure before loading weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibration.offload import materialized, replace_layer

__all__ = ["FOLDABLE_ATTRS", "find_conv_bn_pairs", "fold_batchnorm", "apply_folded_structure"]

#: (conv attribute, batch-norm attribute) of modules whose forward is ``bn(conv(x))``.
FOLDABLE_ATTRS: tuple[tuple[str, str], ...] = (("convolution", "normalization"),)


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, bn name) of every foldable pair, in module order."""
    pairs = []
    for name, module in model.named_modules():
        for conv_attr, bn_attr in FOLDABLE_ATTRS:
            conv, bn = getattr(module, conv_attr, None), getattr(module, bn_attr, None)
            if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + conv_attr, prefix + bn_attr))
    return pairs


def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    w = conv.weight.detach().float()
    factor = bn.weight.detach().float() / torch.sqrt(bn.running_var.float() + bn.eps)
    bias = conv.bias.detach().float() if conv.bias is not None else torch.zeros_like(factor)
    new = _conv_like(conv, bias=True, device=w.device)
    with torch.no_grad():
        new.weight.copy_(w * factor.reshape(-1, 1, 1, 1))
        new.bias.copy_((bias - bn.running_mean.float()) * factor + bn.bias.detach().float())
    return new.to(conv.weight.dtype)


def _conv_like(conv: nn.Conv2d, bias: bool, device) -> nn.Conv2d:
    return nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=bias,
        padding_mode=conv.padding_mode,
        device=device,
    )


@torch.no_grad()
def fold_batchnorm(model: nn.Module, skip: list[str] | None = None) -> list[str]:
    """Fold every conv → BN pair (except convs named in ``skip``); returns the folded BN names."""
    folded = []
    for conv_name, bn_name in find_conv_bn_pairs(model):
        if skip and conv_name in skip:
            continue
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        with materialized(conv) as c, materialized(bn) as b:
            new = _folded_conv(c, b)
        replace_layer(model, conv_name, new)
        model.set_submodule(bn_name, nn.Identity())
        folded.append(bn_name)
    return folded


def apply_folded_structure(model: nn.Module, folded_bn_names: list[str]) -> None:
    """On reload (meta model): the convs of folded pairs get a bias and their BNs become Identity."""
    wanted = set(folded_bn_names)
    for conv_name, bn_name in find_conv_bn_pairs(model):
        if bn_name in wanted:
            conv = model.get_submodule(conv_name)
            model.set_submodule(conv_name, _conv_like(conv, bias=True, device="meta"))
            model.set_submodule(bn_name, nn.Identity())
            wanted.discard(bn_name)
    if wanted:
        raise ValueError(f"the checkpoint says BatchNorms {sorted(wanted)} were folded, but this model has no such pairs.")
