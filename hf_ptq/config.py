"""``PTQConfig``: the user-facing quantization config, validated by a pydantic schema.

``PTQConfig`` is a transformers ``QuantizationConfigMixin`` (so ``from_pretrained`` accepts it and
``config.json`` stores it); the rules for each field live in the pydantic models below, so the
same schema validates Python arguments, ``config.json`` and recipe YAML files.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator
from transformers.utils.quantization_config import QuantizationConfigMixin

__all__ = ["PTQConfig", "CalibrationConfig", "FORMAT_VERSION", "format_validation_error"]

#: Version of the on-disk layout (tensor names, packing, config keys). Bump on incompatible change.
FORMAT_VERSION = 1
QUANT_METHOD = "hf_ptq"


def format_validation_error(owner: str, err: ValidationError) -> str:
    """One readable line per problem: field path, offending value, and what is allowed."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(root)"
        ctx = e.get("ctx") or {}
        value = e.get("input")
        shown = f"{value!r}" if not isinstance(value, dict) else "{...}"
        if e["type"] == "extra_forbidden":
            lines.append(f"{owner}: unknown argument `{path}`={shown}.")
            continue
        reason = f"Allowed values: {ctx['expected']}" if "expected" in ctx else e["msg"].removeprefix("Value error, ")
        lines.append(f"{owner}: invalid value for `{path}`: {shown}. {reason}.")
    return "\n".join(lines)


class CalibrationConfig(BaseModel):
    """Where calibration images come from and how many; see ``hf_ptq.calibration.data``.

    ``dataset`` is a Hub dataset id or a local folder (``imagefolder``), a ``datasets.Dataset``,
    or any iterable of ``pixel_values`` tensors / dicts holding them (e.g. a ``DataLoader``).
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    dataset: Any
    dataset_config: str | None = None
    split: str = "train"
    data_dir: str | None = None
    image_column: str | None = None
    num_samples: StrictInt = Field(default=1024, gt=0)
    batch_size: StrictInt = Field(default=32, gt=0)
    seed: StrictInt = 0
    augment: StrictBool = False
    cache_dtype: Literal["float32", "float16"] = "float32"
    #: runtime only (not written to config.json): the processor to use instead of the checkpoint's.
    image_processor: Any = Field(default=None, exclude=True)

    @field_validator("dataset")
    @classmethod
    def _check_dataset(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and not v.strip()):
            raise ValueError("a dataset is required: a Hub id, a local folder, a datasets.Dataset or an iterable")
        if isinstance(v, (str, Iterable)) or hasattr(v, "__getitem__"):
            return v
        raise ValueError(
            f"unsupported type {type(v).__name__}; pass a Hub id or folder (str), a datasets.Dataset, "
            "or an iterable of pixel_values"
        )

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-safe description; in-memory datasets are recorded by type and size, not by content."""
        data = self.model_dump()  # image_processor is excluded
        if not isinstance(self.dataset, str):
            desc = f"<in-memory {type(self.dataset).__module__}.{type(self.dataset).__name__}"
            if hasattr(self.dataset, "__len__"):
                desc += f", {len(self.dataset)} rows"
            data["dataset"] = desc + ">"
        return data


class _Schema(BaseModel):
    """Validation rules of every ``PTQConfig`` field (private: users see ``PTQConfig``)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    method: str = "rtn"
    weight_bits: Literal[2, 3, 4, 8] = 4
    weight_granularity: Literal["channel", "tensor"] = "channel"
    weight_symmetric: StrictBool = False
    weight_observer: Literal["minmax", "mse"] | None = None
    act_bits: Literal[4, 8] | None = None
    act_symmetric: StrictBool = False
    act_observer: Literal["minmax", "percentile", "mse"] = "mse"
    modules_to_not_convert: list[str] | None = None
    act_modules_to_not_convert: list[str] = Field(default_factory=list)
    calibration: CalibrationConfig | None = None
    method_kwargs: dict[str, Any] = Field(default_factory=dict)
    fold_batchnorm: StrictBool | None = None
    seed: StrictInt = 0
    quantized_modules: dict[str, dict[str, Any]] = Field(default_factory=dict)
    folded_batchnorms: list[str] = Field(default_factory=list)

    @field_validator("weight_bits", "act_bits", mode="before")
    @classmethod
    def _no_bool_or_str(cls, v: Any) -> Any:
        if isinstance(v, bool) or isinstance(v, str):
            raise ValueError(f"must be an int, not {type(v).__name__} (weight_bits: 2, 3, 4 or 8; act_bits: None, 4 or 8)")
        return v

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from .methods import available_methods

        if v not in available_methods():
            raise ValueError(f"unknown method. Allowed values: {', '.join(repr(m) for m in available_methods())}")
        return v

    @field_validator("modules_to_not_convert", "act_modules_to_not_convert", mode="before")
    @classmethod
    def _list_of_str(cls, v: Any) -> Any:
        if v is not None and (not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v)):
            raise ValueError("must be a list of module names or regex patterns (e.g. ['classifier']) or None")
        return list(v) if v is not None else v


class PTQConfig(QuantizationConfigMixin):
    """Post-training quantization settings for ``from_pretrained(..., quantization_config=...)``.

    Args:
        method: ``"rtn"`` (round-to-nearest), ``"comq"``, ``"brecq"`` or ``"fpxint"`` (those
            registered in ``hf_ptq.methods``).
        weight_bits: 2, 3, 4 or 8.
        weight_granularity: ``"channel"`` (one scale per output channel) or ``"tensor"``.
        weight_symmetric: symmetric grid (zero point fixed at the middle code) instead of asymmetric.
        weight_observer: ``"minmax"`` or ``"mse"`` (L2.4 clipping search, 80 candidates); ``None``
            uses the method's default.
        act_bits: ``None`` keeps activations in float; 4 or 8 quantizes the input of every quantized
            layer with a static per-tensor quantizer (needs ``calibration``).
        act_symmetric: symmetric activation grid.
        act_observer: ``"minmax"``, ``"percentile"`` or ``"mse"`` for activation ranges.
        modules_to_not_convert: module names or patterns kept in float; ``None`` = the defaults
            (classifier heads, ViT/DeiT patch embedding); ``[]`` quantizes everything.
        act_modules_to_not_convert: quantized layers whose *input* activations stay in float when
            ``act_bits`` is set (same pattern rules), e.g. ``["mlp.fc2"]`` keeps ViT GELU outputs float.
        calibration: a :class:`CalibrationConfig` or a dict of its fields.
        method_kwargs: options of the chosen method, validated by that method.
        fold_batchnorm: fold conv → BatchNorm pairs (ResNet) into the conv before quantizing;
            ``None`` uses the method's default (BRECQ: on, others: off).
        seed: seed of every random choice hf_ptq makes.

    ``quantized_modules`` and ``folded_batchnorms`` are written by hf_ptq after quantization (they
    tell a reload which modules to rebuild); users leave them empty.
    """

    def __init__(
        self,
        *,
        method: str = "rtn",
        weight_bits: int = 4,
        weight_granularity: str = "channel",
        weight_symmetric: bool = False,
        weight_observer: str | None = None,
        act_bits: int | None = None,
        act_symmetric: bool = False,
        act_observer: str = "mse",
        modules_to_not_convert: list[str] | None = None,
        act_modules_to_not_convert: list[str] | None = None,
        calibration: CalibrationConfig | dict[str, Any] | None = None,
        method_kwargs: dict[str, Any] | None = None,
        fold_batchnorm: bool | None = None,
        seed: int = 0,
        quantized_modules: dict[str, dict[str, Any]] | None = None,
        folded_batchnorms: list[str] | None = None,
        format_version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        **unknown: Any,
    ) -> None:
        if unknown:
            names = ", ".join(f"`{k}`" for k in sorted(unknown))
            raise ValueError(
                f"PTQConfig: unknown argument(s) {names}. Allowed arguments: {', '.join(_Schema.model_fields)}."
            )
        if quant_method != QUANT_METHOD:
            raise ValueError(f"PTQConfig: quant_method must be {QUANT_METHOD!r}, got {quant_method!r}.")
        if format_version != FORMAT_VERSION:
            raise ValueError(
                f"PTQConfig: this checkpoint uses hf_ptq storage format {format_version!r}, but the installed "
                f"hf_ptq reads format {FORMAT_VERSION}. Install the hf_ptq version that saved it "
                "(see the model card), or re-quantize the float model with this version."
            )
        fields = dict(
            method=method,
            weight_bits=weight_bits,
            weight_granularity=weight_granularity,
            weight_symmetric=weight_symmetric,
            weight_observer=weight_observer,
            act_bits=act_bits,
            act_symmetric=act_symmetric,
            act_observer=act_observer,
            modules_to_not_convert=modules_to_not_convert,
            act_modules_to_not_convert=act_modules_to_not_convert if act_modules_to_not_convert is not None else [],
            calibration=calibration,
            method_kwargs=method_kwargs if method_kwargs is not None else {},
            fold_batchnorm=fold_batchnorm,
            seed=seed,
            quantized_modules=quantized_modules if quantized_modules is not None else {},
            folded_batchnorms=folded_batchnorms if folded_batchnorms is not None else [],
        )
        try:
            schema = _Schema(**fields)
        except ValidationError as err:
            raise ValueError(format_validation_error("PTQConfig", err)) from None
        self.quant_method = QUANT_METHOD
        self.format_version = FORMAT_VERSION
        for name in _Schema.model_fields:
            setattr(self, name, getattr(schema, name))
        # The method validates its own kwargs (unknown keys, ranges) and cross-field rules.
        from .methods import get_method

        self.method_kwargs = get_method(self.method).validate_config(self)

    # -- derived -------------------------------------------------------------------------------
    @property
    def is_prequantized(self) -> bool:
        """True for a config read from a checkpoint that hf_ptq already quantized."""
        return bool(self.quantized_modules)

    # -- serialization ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"quant_method": self.quant_method, "format_version": self.format_version}
        for name in _Schema.model_fields:
            value = getattr(self, name)
            if name == "calibration" and value is not None:
                value = value.to_json_dict()
            data[name] = copy.deepcopy(value)
        return data

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PTQConfig) and self.to_dict() == other.to_dict()

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def _register() -> None:
    from transformers.quantizers import register_quantization_config
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:  # re-imports must not raise
        register_quantization_config(QUANT_METHOD)(PTQConfig)


_register()
