"""Sequential block-by-block calibration.

For each unit of the block map, in forward order:

1. get its inputs — from the previous unit's outputs when the probe shows a direct link, else by
   running the model up to the unit and stopping there (a pre-hook raises ``_StopForward``);
2. onload the unit (accelerate offload), run the float unit for targets, hand the unit, its cached
   inputs and targets to the method, build packed quantized layers, observe activation ranges;
3. swap the quantized layers in (written through the offload store) and run the *quantized* unit
   to produce the next unit's inputs, so errors propagate as in the deployed model.

Two input chains are kept on CPU: the quantized-model chain (``"quantized"`` methods: BRECQ) and
the float-model chain (targets; ``"fp"`` methods: COMQ). ``"fp"`` methods defer the swaps to the
end, so the model stays float while it is being calibrated. Cached activations never live on the
accelerator; each mini-batch moves there for its forward only.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..methods.base import PTQMethod, UnitWork
from ..quant.modules import QuantModuleMixin, dequantized_weights_cached
from ..quant.observers import ActivationObserver
from ..quant.replace import make_quant_module
from ..quant.scheme import LayerScheme, rtn_quantize_weight
from .blocks import Unit, units_for
from .data import calibration_batches
from .memory import release_memory
from .offload import execution_device, onloaded, replace_layer

logger = logging.get_logger("hf_ptq")

__all__ = ["run_calibrated", "probe_units", "capture_inputs", "run_unit"]

Inputs = list[tuple[tuple, dict]]


class _StopForward(Exception):
    """Raised by a capture hook once the unit's inputs are stored: the rest of the model is skipped."""


@dataclass
class _Probe:
    """How a unit is called: is its hidden state the previous unit's output, and its other arguments."""

    direct: bool
    static_args: tuple
    static_kwargs: dict


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "to_tuple"):
        return _first_tensor(out.to_tuple())
    raise TypeError(f"cannot find the hidden state in a unit output of type {type(out).__name__}")


def _has_tensor(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, (tuple, list)):
        return any(_has_tensor(o) for o in obj)
    if isinstance(obj, dict):
        return any(_has_tensor(v) for v in obj.values())
    return False


def _move(obj: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """Recursively move tensors (float ones optionally cast) to ``device``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device, dtype) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device, dtype) for k, v in obj.items()}
    return obj


def _forward(model: nn.Module, pixel_values: torch.Tensor, device: torch.device) -> None:
    with contextlib.suppress(_StopForward):
        model(pixel_values=pixel_values.to(device))


@torch.no_grad()
def probe_units(model: nn.Module, units: list[Unit], pixel_values: torch.Tensor, device: torch.device) -> list[_Probe]:
    """One small forward recording, for every unit, whether its input is the previous unit's output."""
    calls: dict[int, tuple] = {}
    handles = []
    for i, unit in enumerate(units):

        def pre(mod, args, kwargs, i=i):
            if i not in calls:
                calls[i] = (args, kwargs, None)

        def post(mod, args, kwargs, out, i=i):
            a, k, o = calls[i]
            if o is None:
                calls[i] = (a, k, _first_tensor(out))

        handles.append(unit.module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(unit.module.register_forward_hook(post, with_kwargs=True))
    try:
        model(pixel_values=pixel_values.to(device))
    finally:
        for h in handles:
            h.remove()
    probes = []
    for i, unit in enumerate(units):
        if i not in calls:
            raise RuntimeError(f"unit {unit.name} ({unit.kind}) was not called in a forward pass; cannot calibrate it.")
        args, kwargs, _ = calls[i]
        static = not _has_tensor(args[1:]) and not _has_tensor(kwargs)
        direct = bool(i > 0 and static and args and args[0] is calls[i - 1][2])
        probes.append(_Probe(direct, tuple(args[1:]) if static else (), dict(kwargs) if static else {}))
    return probes


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    module: nn.Module,
    batches: list[torch.Tensor],
    device: torch.device,
    cache_dtype: torch.dtype,
    override: tuple[nn.Module, list[Any]] | None = None,
) -> Inputs:
    """``(args, kwargs)`` of ``module`` for each batch, on CPU; the forward stops at ``module``.

    ``override=(unit, outputs)`` replaces ``unit``'s output with ``outputs[b]`` (used to follow the
    float chain through glue code while earlier units are already quantized).
    """
    captured: Inputs = []

    def pre(mod, args, kwargs):
        captured.append((_move(args, "cpu", cache_dtype), _move(kwargs, "cpu", cache_dtype)))
        raise _StopForward

    handles = [module.register_forward_pre_hook(pre, with_kwargs=True)]
    batch_index = [0]
    if override is not None:
        unit, outputs = override

        def post(mod, args, out):
            return _move(outputs[batch_index[0]], device, torch.float32)

        handles.append(unit.register_forward_hook(post))
    try:
        for b, pv in enumerate(batches):
            batch_index[0] = b
            _forward(model, pv, device)
            if len(captured) != b + 1:
                raise RuntimeError(f"the forward pass never reached {type(module).__name__}; cannot capture its inputs.")
    finally:
        for h in handles:
            h.remove()
    return captured


@torch.no_grad()
def run_unit(module: nn.Module, inputs: Inputs, device: torch.device, cache_dtype: torch.dtype) -> list[Any]:
    """Outputs of ``module`` for each cached input, on CPU.

    Quantized layers inside ``module`` are dequantized once for all batches (same outputs).
    """
    outs = []
    with dequantized_weights_cached(module):
        for args, kwargs in inputs:
            out = module(*_move(args, device, torch.float32), **_move(kwargs, device, torch.float32))
            outs.append(_move(out, "cpu", cache_dtype))
    return outs


def _next_inputs(outputs: list[Any], probe: _Probe) -> Inputs:
    return [((_first_tensor(o),) + probe.static_args, dict(probe.static_kwargs)) for o in outputs]


@contextlib.contextmanager
def _swapped(model: nn.Module, replacements: dict[str, nn.Module]):
    """Temporarily put ``replacements`` in the model (no offload bookkeeping: the unit is onloaded)."""
    originals = {name: model.get_submodule(name) for name in replacements}
    try:
        for name, new in replacements.items():
            model.set_submodule(name, new)
        yield
    finally:
        for name, old in originals.items():
            model.set_submodule(name, old)


def _relative_error(outputs: list[Any], targets: list[Any]) -> float:
    num = sum(float((_first_tensor(o).float() - _first_tensor(t).float()).pow(2).sum()) for o, t in zip(outputs, targets))
    den = sum(float(_first_tensor(t).float().pow(2).sum()) for t in targets)
    return num / max(den, 1e-30)


@torch.no_grad()
def _observe_inputs(
    model: nn.Module,
    unit_name: str,
    qmodules: dict[str, QuantModuleMixin],
    skip: set[str],
    inputs: Inputs,
    device: torch.device,
    cache_dtype: torch.dtype,
    config: Any,
) -> None:
    """Set the static input quantizer of each new layer from the inputs it sees in the quantized unit.

    All observers run in one pass with input quantization off (standard PTQ calibration); layers
    whose quantizer the method already set (``skip``) are left alone.
    """
    targets = {n: q for n, q in qmodules.items() if q.scheme.act_bits is not None and n not in skip}
    if not targets:
        return
    observers = {n: ActivationObserver(config.act_observer, seed=config.seed) for n in targets}
    handles = []
    for n, q in targets.items():
        q.act_quant_enabled = False
        handles.append(q.register_forward_pre_hook(lambda mod, args, n=n: observers[n].update(args[0])))
    try:
        with _swapped(model, qmodules):
            run_unit(model.get_submodule(unit_name), inputs, device, cache_dtype)
    finally:
        for h in handles:
            h.remove()
        for q in targets.values():
            q.act_quant_enabled = True
    for n, q in targets.items():
        q.set_input_qparams(*observers[n].qparams(q.scheme.act_bits, q.scheme.act_symmetric))


class _Stopwatch:
    """Seconds spent per phase, so users (and the benchmark) see where calibration time goes."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start


@torch.no_grad()
def _baseline_error(model, unit_name, layers, schemes, qmodules, inputs, targets, device, cache_dtype) -> float:
    """Reconstruction error of the unit with min-max RTN weights (same input quantizers as the method)."""
    baseline = {
        n: make_quant_module(layer, rtn_quantize_weight(layer.weight, schemes[n], "minmax")) for n, layer in layers.items()
    }
    for n, b in baseline.items():
        if qmodules[n].scheme.act_bits is not None:
            b.set_input_qparams(qmodules[n].input_scale, qmodules[n].input_zero_point)
    with _swapped(model, baseline):
        return _relative_error(run_unit(model.get_submodule(unit_name), inputs, device, cache_dtype), targets)


def run_calibrated(
    model: nn.Module,
    method: PTQMethod,
    layers: dict[str, nn.Module],
    schemes: dict[str, LayerScheme],
    calibration_data: Any = None,
    image_processor: Any = None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Quantize ``layers`` unit by unit with ``method``.

    Returns the per-unit report and the seconds spent per phase: ``data`` (loading and
    preprocessing), ``prepare`` (the method's one-off pass), ``capture`` (running the model up to a
    unit), ``propagate`` (float and quantized unit outputs that feed the next unit), ``method``,
    ``observe`` (activation ranges) and ``report`` (the RTN baseline and after-errors).
    """
    clock = _Stopwatch()
    config = method.config
    spec = config.calibration
    if spec is None:
        if calibration_data is None:
            raise ValueError(f"method {method.name!r} needs calibration data; set PTQConfig.calibration.")
        from ..config import CalibrationConfig

        spec = CalibrationConfig(dataset=calibration_data)
    cache_dtype = torch.float16 if spec.cache_dtype == "float16" else torch.float32
    device = execution_device(model)
    with clock("data"):
        batches = calibration_batches(spec, model, image_processor, dataset=calibration_data)
    model.eval()
    units = units_for(model, list(layers), method.unit_granularity)
    mode = method.input_mode if method.input_mode != "none" else "quantized"
    defer_swaps = mode == "fp"
    with clock("prepare"):
        extras = method.prepare(model, units, batches, device) or {}
    with clock("capture"):
        probes = probe_units(model, units, batches[0][:2], device)

    report: list[dict[str, Any]] = []
    pending: dict[str, nn.Module] = {}
    q_in: Inputs | None = None
    f_in: Inputs | None = None
    q_out: list[Any] | None = None
    f_out: list[Any] | None = None
    bar = logging.tqdm(total=len(units), desc="hf_ptq calibrating", unit="unit")
    for i, unit in enumerate(units):
        desc = f"({i + 1}/{len(units)}) {unit.kind}"
        bar.set_description(f"{desc}: calibrating")
        # 1. inputs of this unit, on both chains
        with clock("capture"):
            if probes[i].direct:
                f_in = _next_inputs(f_out, probes[i])
                q_in = _next_inputs(q_out, probes[i]) if not defer_swaps else None
            elif i == 0 or defer_swaps:
                f_in = capture_inputs(model, unit.module, batches, device, cache_dtype)
                q_in = f_in if not defer_swaps else None
            else:
                q_in = capture_inputs(model, unit.module, batches, device, cache_dtype)
                previous = model.get_submodule(units[i - 1].name)  # a layer unit may have been replaced
                f_in = capture_inputs(model, unit.module, batches, device, cache_dtype, override=(previous, f_out))
        method_inputs = f_in if mode == "fp" else q_in

        def current(name: str = unit.name) -> nn.Module:  # the unit as it is in the model right now
            return model.get_submodule(name)

        with onloaded(unit.module, device):
            with clock("propagate"):
                f_out = run_unit(unit.module, f_in, device, cache_dtype)
            work = UnitWork(
                name=unit.name,
                module=unit.module,
                layers={n: model.get_submodule(n) for n in unit.layer_names},
                schemes={n: schemes[n] for n in unit.layer_names},
                inputs=method_inputs,
                fp_inputs=f_in if mode == "mixed" else None,
                targets=[_first_tensor(o) for o in f_out] if method.needs_targets else None,
                device=device,
                extras=extras.get(unit.name, {}),
                desc=desc,
            )
            with clock("method"):
                result = method.quantize_unit(work)
                qmodules = {
                    n: make_quant_module(work.layers[n], result.weights[n], result.input_qparams.get(n))
                    for n in unit.layer_names
                }
            with clock("observe"):
                skip = set(result.input_qparams)
                _observe_inputs(model, unit.name, qmodules, skip, method_inputs, device, cache_dtype, config)
            with clock("report"):
                err_rtn = _baseline_error(
                    model, unit.name, work.layers, schemes, qmodules, method_inputs, f_out, device, cache_dtype
                )
            if defer_swaps:
                with clock("report"), _swapped(model, qmodules):
                    err_after = _relative_error(run_unit(current(), method_inputs, device, cache_dtype), f_out)
                pending.update(qmodules)
            else:
                for n, q in qmodules.items():
                    replace_layer(model, n, q)
                with clock("propagate"):
                    q_out = run_unit(current(), q_in, device, cache_dtype)
                err_after = _relative_error(q_out, f_out)
        report.append(
            {
                "unit": unit.name,
                "kind": unit.kind,
                "layers": list(unit.layer_names),
                "recon_error_rtn": err_rtn,
                "recon_error": err_after,
                **result.stats,
            }
        )
        del work, result, qmodules
        release_memory()  # keeps peak memory flat in depth (see calibration/memory.py)
        bar.update(1)
        bar.set_postfix(err=f"{err_after:.2e}", rtn=f"{err_rtn:.2e}", refresh=False)
    bar.close()
    for n, q in pending.items():
        replace_layer(model, n, q)
    return report, dict(clock.seconds)
