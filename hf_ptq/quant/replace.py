"""Module surgery: which layers get quantized, their number formats, and swapping them in.

This is the only place that decides *which* modules are converted; methods decide *how*.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.quantizers.quantizers_utils import should_convert_module

from .modules import QUANT_MODULE_FOR_FLOAT, QuantModuleMixin
from .scheme import LayerScheme, QuantizedWeight

if TYPE_CHECKING:
    from ..config import PTQConfig

__all__ = [
    "default_modules_to_not_convert",
    "resolve_modules_to_not_convert",
    "find_quantizable_layers",
    "scheme_from_config",
    "make_quant_module",
    "scheme_overrides",
    "without_input_quantizers",
    "schemes_from_config",
    "swap_in_empty_quant_modules",
    "quant_modules",
]

#: classifier heads of transformers vision models (kept in float by default, like every peer).
HEAD_NAMES = ("classifier", "cls_classifier", "distillation_classifier")
#: model types whose forward casts ``pixel_values`` to the patch-embedding weight dtype; their
#: patch embedding stays float by default (also what COMQ/RepQ-ViT practice does).
PATCH_EMBEDDING_SKIPS = {"vit": "embeddings.patch_embeddings", "deit": "embeddings.patch_embeddings"}


def default_modules_to_not_convert(model: nn.Module) -> list[str]:
    """Classifier heads, plus the ViT/DeiT patch embedding."""
    skips = [name for name in HEAD_NAMES if hasattr(model, name)]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in PATCH_EMBEDDING_SKIPS:
        prefix = getattr(model, "base_model_prefix", "")
        skips.append(f"{prefix}.{PATCH_EMBEDDING_SKIPS[model_type]}" if prefix else PATCH_EMBEDDING_SKIPS[model_type])
    return skips


def resolve_modules_to_not_convert(model: nn.Module, config: "PTQConfig") -> list[str]:
    """The user's list when given (``[]`` = quantize everything), else the defaults."""
    if config.modules_to_not_convert is not None:
        return list(config.modules_to_not_convert)
    return default_modules_to_not_convert(model)


def find_quantizable_layers(model: nn.Module, skip: list[str]) -> dict[str, nn.Module]:
    """Qualified name → float Linear/Conv2d to quantize, in module order, minus the skipped ones.

    Subclasses of Linear/Conv2d with their own forward are not touched (the swap would drop it).
    """
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if type(module) not in QUANT_MODULE_FOR_FLOAT:
            continue
        if not should_convert_module(name, skip):
            continue
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            raise ValueError(
                f"{name}: Conv2d with padding_mode={module.padding_mode!r} cannot be quantized (only 'zeros'). "
                f"Add {name!r} to PTQConfig.modules_to_not_convert."
            )
        found[name] = module
    return found


def scheme_from_config(config: "PTQConfig", bits: int | None = None, terms: int = 1) -> LayerScheme:
    """Number format of a layer from the global config (``bits`` overrides, e.g. 8-bit stems)."""
    return LayerScheme(
        bits=bits if bits is not None else config.weight_bits,
        granularity=config.weight_granularity,
        symmetric=config.weight_symmetric,
        terms=terms,
        act_bits=config.act_bits,
        act_symmetric=config.act_symmetric,
    )


def without_input_quantizers(schemes: dict[str, LayerScheme], patterns: list[str]) -> dict[str, LayerScheme]:
    """``schemes`` with activation quantization removed for layers matching ``patterns``."""
    import dataclasses

    out = {}
    for name, scheme in schemes.items():
        if patterns and not should_convert_module(name, patterns):
            changes = {"act_bits": None}
            if getattr(scheme, "act_dynamic", False):
                changes["act_dynamic"] = False
            scheme = dataclasses.replace(scheme, **changes)
        out[name] = scheme
    return out


def scheme_overrides(config: "PTQConfig", scheme: LayerScheme) -> dict:
    """The fields of ``scheme`` that differ from the config's global format (what config.json stores)."""
    base = scheme_from_config(config).to_dict()
    return {k: v for k, v in scheme.to_dict().items() if base[k] != v}


def schemes_from_config(config: "PTQConfig") -> dict[str, LayerScheme]:
    """Per-module formats recorded in a saved config (inverse of :func:`scheme_overrides`)."""
    base = scheme_from_config(config).to_dict()
    return {name: LayerScheme.from_dict({**base, **diff}) for name, diff in config.quantized_modules.items()}


def make_quant_module(
    float_module: nn.Module,
    qweight: QuantizedWeight,
    input_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> QuantModuleMixin:
    """Quantized twin of ``float_module`` filled with ``qweight`` (and input qparams, if any)."""
    cls = QUANT_MODULE_FOR_FLOAT[type(float_module)]
    qmodule = cls.from_float(float_module, qweight.scheme)
    qmodule.set_quantized_weight(qweight)
    if input_qparams is not None:
        qmodule.set_input_qparams(*input_qparams)
    return qmodule


def _empty_quant_module(float_module: nn.Module, scheme: LayerScheme, device: torch.device | str) -> nn.Module:
    cls = QUANT_MODULE_FOR_FLOAT[type(float_module)]
    if isinstance(float_module, nn.Linear):
        return cls(float_module.in_features, float_module.out_features, float_module.bias is not None, scheme, device)
    return cls(
        float_module.in_channels,
        float_module.out_channels,
        float_module.kernel_size,
        float_module.stride,
        float_module.padding,
        float_module.dilation,
        float_module.groups,
        float_module.bias is not None,
        scheme,
        device,
    )


def swap_in_empty_quant_modules(model: nn.Module, schemes: dict[str, LayerScheme], device="meta") -> None:
    """Before loading a saved hf_ptq checkpoint: put empty quantized modules where it expects them."""
    for name, scheme in schemes.items():
        try:
            float_module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"the checkpoint's quantization_config lists quantized module {name!r}, which this model does not "
                "have. Was it saved from another architecture or transformers version?"
            ) from None
        if type(float_module) not in QUANT_MODULE_FOR_FLOAT:
            raise ValueError(f"{name}: expected nn.Linear or nn.Conv2d, found {type(float_module).__name__}")
        model.set_submodule(name, _empty_quant_module(float_module, scheme, device))


def quant_modules(model: nn.Module) -> dict[str, QuantModuleMixin]:
    """All quantized layers of a model by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantModuleMixin)}
