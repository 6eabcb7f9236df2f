"""Quantize a loaded float model in place: pick layers, run the method, swap in packed modules.

Data-free methods (RTN weights-only, FP=xINT) go layer by layer here; methods that need
calibration data go through the sequential block runner in :mod:`hf_ptq.calibration`.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .config import PTQConfig
from .methods import get_method
from .methods.base import PTQMethod, UnitWork
from .quant.fold import fold_batchnorm
from .quant.replace import (
    find_quantizable_layers,
    make_quant_module,
    resolve_modules_to_not_convert,
    scheme_overrides,
    without_input_quantizers,
)

logger = logging.get_logger("hf_ptq")

__all__ = ["quantize_model"]


def quantize_model(
    model: nn.Module,
    config: PTQConfig,
    *,
    calibration_data: Any = None,
    image_processor: Any = None,
) -> nn.Module:
    """Quantize ``model`` in place with ``config`` and record what was done in ``config``.

    ``from_pretrained(..., quantization_config=config)`` calls this; call it directly to quantize a
    model you already hold. ``calibration_data`` overrides ``config.calibration.dataset`` and
    ``image_processor`` overrides the processor loaded from the checkpoint.
    """
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    method = get_method(config.method)(config)
    skip = resolve_modules_to_not_convert(model, config)
    fold = config.fold_batchnorm if config.fold_batchnorm is not None else method.default_fold_batchnorm
    if fold:
        config.folded_batchnorms = fold_batchnorm(model)
    layers = find_quantizable_layers(model, skip)
    if not layers:
        raise ValueError(
            f"no quantizable nn.Linear/nn.Conv2d left in {type(model).__name__} after modules_to_not_convert={skip}."
        )
    schemes = without_input_quantizers(method.layer_schemes(layers), config.act_modules_to_not_convert)
    if method.requires_calibration(config):
        from .calibration.runner import run_calibrated

        report, timing = run_calibrated(model, method, layers, schemes, calibration_data, image_processor)
    else:
        report, timing = _run_data_free(model, method, layers, schemes), {}
    config.quantized_modules = {name: scheme_overrides(config, schemes[name]) for name in layers}
    model.hf_ptq_report = {
        "method": config.method,
        "seconds": time.perf_counter() - start,
        "units": report,
        "timing": timing,
        **method.report_fields(),
    }
    return model


def _run_data_free(model: nn.Module, method: PTQMethod, layers: dict, schemes: dict) -> list[dict[str, Any]]:
    from .calibration.offload import materialized, replace_layer

    report = []
    bar = logging.tqdm(layers.items(), total=len(layers), desc=f"hf_ptq {method.name}", unit="layer")
    for name, layer in bar:
        with materialized(layer) as float_layer:
            work = UnitWork(name=name, module=float_layer, layers={name: float_layer}, schemes={name: schemes[name]})
            result = method.quantize_unit(work)
            qweight = result.weights[name]
            w = float_layer.weight.detach().float()
            rel = float((qweight.dequantize().reshape(w.shape) - w).norm() / w.norm().clamp_min(1e-12))
            qmodule = make_quant_module(float_layer, qweight)
        replace_layer(model, name, qmodule)
        report.append({"unit": name, "layers": [name], "weight_rel_error": rel, **result.stats})
    return report
