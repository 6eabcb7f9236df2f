"""The contract between the calibration engine and a quantization algorithm.

A method sees tensors and modules, never transformers classes: the engine hands it one
*unit* (a block such as a ``ViTLayer``, or a single layer), the unit's quantizable layers with
their number formats, and, when the method asks for them, cached inputs and float targets.
It returns integer codes and grids (:class:`~hf_ptq.quant.scheme.QuantizedWeight`) per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from ..quant.scheme import LayerScheme, QuantizedWeight

if TYPE_CHECKING:
    from ..config import PTQConfig

__all__ = ["PTQMethod", "UnitWork", "UnitResult", "register_method", "get_method", "available_methods"]

InputMode = Literal["none", "fp", "quantized", "mixed"]


class NoKwargs(BaseModel):
    """Kwargs schema of a method without options."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class UnitWork:
    """Everything a method may use to quantize one unit.

    Attributes:
        name: qualified module name of the unit (e.g. ``vit.layers.3``).
        module: the unit, on the compute device, with float layers still in place.
        layers: qualified name → float ``nn.Linear``/``nn.Conv2d`` inside ``module`` to quantize.
        schemes: qualified name → number format of that layer.
        inputs: cached unit inputs as ``(args, kwargs)`` per calibration batch (CPU), or None.
        fp_inputs: inputs the float model gives the unit (QDrop mixes both), or None.
        targets: float-model outputs of the unit per batch (CPU), or None.
        device: compute device.
    """

    name: str
    module: nn.Module
    layers: dict[str, nn.Module]
    schemes: dict[str, LayerScheme]
    inputs: list[tuple[tuple, dict]] | None = None
    fp_inputs: list[tuple[tuple, dict]] | None = None
    targets: list[Any] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: what ``PTQMethod.prepare`` computed for this unit (e.g. BRECQ's Fisher weights), by key.
    extras: dict[str, Any] = field(default_factory=dict)
    #: short label for progress bars, e.g. ``"(3/12) ViTLayer"``.
    desc: str = ""


@dataclass
class UnitResult:
    """What a method returns for a unit: codes per layer, optional input quantizer params, stats."""

    weights: dict[str, QuantizedWeight]
    input_qparams: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)


class PTQMethod:
    """Base class of an algorithm. Subclasses set the class attributes and ``quantize_unit``."""

    name: ClassVar[str]
    #: pydantic model of ``PTQConfig.method_kwargs`` for this method (``extra="forbid"``).
    Kwargs: ClassVar[type[BaseModel]] = NoKwargs
    #: observer that sets the initial grid when ``PTQConfig.weight_observer`` is None.
    default_weight_observer: ClassVar[str] = "minmax"
    #: where unit inputs come from: none (data-free), the float model, the quantized model, or both.
    input_mode: ClassVar[InputMode] = "none"
    #: whether the method needs the float unit outputs as targets.
    needs_targets: ClassVar[bool] = False
    #: how the engine splits the model: reconstruction blocks, or one unit per layer.
    unit_granularity: ClassVar[Literal["block", "layer"]] = "layer"
    #: fold conv → BatchNorm pairs first when ``PTQConfig.fold_batchnorm`` is None.
    default_fold_batchnorm: ClassVar[bool] = False

    def __init__(self, config: "PTQConfig") -> None:
        self.config = config
        self.kwargs = self.Kwargs(**config.method_kwargs)

    # -- validation ------------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, config: "PTQConfig") -> dict[str, Any]:
        """Validate ``method_kwargs`` and cross-field rules; returns the kwargs with defaults filled."""
        from ..config import format_validation_error

        try:
            kwargs = cls.Kwargs(**config.method_kwargs)
        except ValidationError as err:
            raise ValueError(format_validation_error(f"PTQConfig.method_kwargs (method={cls.name!r})", err)) from None
        if cls.requires_calibration(config) and config.calibration is None and not config.is_prequantized:
            why = "static activation quantization (act_bits)" if config.act_bits else f"method {cls.name!r}"
            raise ValueError(
                f"PTQConfig: `calibration` is required by {why} but is None. Pass calibration="
                "{'dataset': <Hub id, folder, datasets.Dataset or iterable>, 'num_samples': 1024}."
            )
        return kwargs.model_dump()

    @classmethod
    def requires_calibration(cls, config: "PTQConfig") -> bool:
        """Whether quantizing with ``config`` needs calibration data."""
        return cls.input_mode != "none" or config.act_bits is not None

    # -- work ------------------------------------------------------------------------------------
    @property
    def weight_observer(self) -> str:
        return self.config.weight_observer or self.default_weight_observer

    def layer_schemes(self, layers: dict[str, nn.Module]) -> dict[str, LayerScheme]:
        """Number format per layer; methods override to keep e.g. the first/last layer at 8 bits."""
        from ..quant.replace import scheme_from_config

        return {name: scheme_from_config(self.config) for name in layers}

    def prepare(self, model: nn.Module, units: list, batches: list[torch.Tensor], device: torch.device) -> dict:
        """Once, before the first unit, with the float model intact: per-unit extras by unit name.

        Default: nothing. BRECQ's Fisher weighting uses this to take gradients of the float model.
        """
        return {}

    def quantize_unit(self, work: UnitWork) -> UnitResult:
        raise NotImplementedError

    def report_fields(self) -> dict[str, Any]:
        """Method-specific entries of ``model.hf_ptq_report`` (e.g. FP=xINT's effective bits)."""
        return {}


_REGISTRY: dict[str, type[PTQMethod]] = {}


def register_method(name: str):
    """Class decorator adding a method under ``name`` (re-registering the same class is a no-op)."""

    def deco(cls: type[PTQMethod]) -> type[PTQMethod]:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"method {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def get_method(name: str) -> type[PTQMethod]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; allowed values: {', '.join(sorted(_REGISTRY))}") from None


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def relative_name(work: UnitWork, layer_name: str) -> str:
    """``layer_name`` relative to the unit module (for ``work.module.get_submodule``/``set_submodule``)."""
    if layer_name == work.name:
        return ""
    return layer_name[len(work.name) + 1 :]


def move_to(obj: Any, device: torch.device, dtype: torch.dtype | None = torch.float32) -> Any:
    """Recursively move cached tensors (CPU, maybe float16) to ``device`` (float ones cast to ``dtype``)."""
    if isinstance(obj, torch.Tensor):
        t = obj.to(device)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t
    if isinstance(obj, (tuple, list)):
        return type(obj)(move_to(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: move_to(v, device, dtype) for k, v in obj.items()}
    return obj


@torch.no_grad()
def iter_layer_inputs(work: UnitWork, layer_names: list[str], inputs: list | None = None):
    """Yield ``{layer name: its input tensor}`` per cached batch by running ``work.module``.

    Runs the unit as it currently is (float layers, or quantized ones a method swapped in), so a
    method can stream statistics (e.g. COMQ's Gram matrix) without storing every layer's inputs.
    """
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name in layer_names:
        module = work.module.get_submodule(relative_name(work, name)) if name != work.name else work.module

        def hook(mod, args, name=name):
            seen[name] = args[0].detach()

        handles.append(module.register_forward_pre_hook(hook))
    try:
        for args, kwargs in inputs if inputs is not None else work.inputs:
            seen.clear()
            work.module(*move_to(args, work.device), **move_to(kwargs, work.device))
            yield dict(seen)
    finally:
        for h in handles:
            h.remove()
