"""FP=xINT: the float model as a series of low-bit terms; no calibration data, no fine-tuning.

Every weight becomes ``W ≈ Σ_k s_k (B_k - z_k)``, ``K = terms`` integer tensors of ``weight_bits``
each quantizing the residual of the previous ones (:func:`hf_ptq.quant.series.residual_expand`),
so the error shrinks geometrically with ``K``. With ``act_bits`` set, each layer input is expanded
the same way at run time (``act_terms`` terms, per-token scales from the live tensor) and the
layer computes the (weight term, activation term) products with ``k + j <= max_order``.

The grid of every term is the config's (``weight_symmetric``, default asymmetric): both grids
contract the residual by at least ``2**-(b-1)`` per term, the asymmetric one a little faster
(``1/(2**b-1)`` vs ``1/(2**b-2)``; at 2 bits 1/3 vs 1/2), and ``weight_symmetric=True`` gives
exactly the absmax grid of algorithms.md §4.2 (zero-point-free integer GEMMs).

Storage cost is ``weight_bits × terms`` bits per weight: :func:`effective_bits` is the number to
report next to any accuracy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt
from torch import nn

from ..quant.scheme import LayerScheme, QuantizedWeight
from ..quant.series import residual_expand
from .base import PTQMethod, UnitResult, UnitWork, register_method

if TYPE_CHECKING:
    from ..config import PTQConfig

__all__ = ["FPxINT", "FPxINTKwargs", "effective_bits", "effective_act_bits"]

MAX_TERMS = 16


class FPxINTKwargs(BaseModel):
    """``PTQConfig.method_kwargs`` of ``method="fpxint"``.

    ``effective_bits``/``effective_act_bits`` are derived (``bits × terms``) and written by hf_ptq
    so that ``config.json`` states them; when given they must match.
    """

    model_config = ConfigDict(extra="forbid")

    terms: StrictInt = Field(default=2, ge=1, le=MAX_TERMS)
    act_terms: StrictInt = Field(default=1, ge=1, le=MAX_TERMS)
    max_order: StrictInt | None = None
    effective_bits: StrictInt | None = None
    effective_act_bits: StrictInt | None = None


def effective_bits(config: "PTQConfig") -> int:
    """Stored bits per weight, ``weight_bits × terms`` (``weight_bits`` for single-term methods)."""
    terms = config.method_kwargs.get("terms", 2) if config.method == "fpxint" else 1
    return config.weight_bits * terms


def effective_act_bits(config: "PTQConfig") -> int | None:
    """``act_bits × act_terms`` for the activation expansion; None when activations stay float."""
    if config.act_bits is None:
        return None
    terms = config.method_kwargs.get("act_terms", 1) if config.method == "fpxint" else 1
    return config.act_bits * terms


@register_method("fpxint")
class FPxINT(PTQMethod):
    Kwargs = FPxINTKwargs
    default_weight_observer = "minmax"
    input_mode = "none"

    @classmethod
    def requires_calibration(cls, config: "PTQConfig") -> bool:
        """Never: weights are expanded data-free and activations from the live tensor at run time."""
        return False

    @classmethod
    def validate_config(cls, config: "PTQConfig") -> dict[str, Any]:
        kwargs = super().validate_config(config)
        terms, act_terms, max_order = kwargs["terms"], kwargs["act_terms"], kwargs["max_order"]
        if config.weight_observer not in (None, "minmax"):
            raise ValueError(
                f"PTQConfig: invalid value for `weight_observer`: {config.weight_observer!r} with method='fpxint'. "
                "Allowed values: None, 'minmax' (a clipped grid breaks the |residual| <= scale/2 contraction; "
                "add terms instead of clipping)."
            )
        if config.act_bits is None and act_terms != 1:
            raise ValueError(
                f"PTQConfig.method_kwargs (method='fpxint'): invalid value for `act_terms`: {act_terms!r}. "
                "Allowed values: 1 when act_bits is None (set act_bits=4 or 8 to expand activations)."
            )
        lo, hi = max(terms, act_terms) + 1, terms + act_terms
        if max_order is not None and not lo <= max_order <= hi:
            raise ValueError(
                f"PTQConfig.method_kwargs (method='fpxint'): invalid value for `max_order`: {max_order!r}. "
                f"Allowed values: None (keep all pairs) or an integer in [{lo}, {hi}] for terms={terms}, "
                f"act_terms={act_terms} (below {lo} some stored term would never be used)."
            )
        derived = {
            "effective_bits": config.weight_bits * terms,
            "effective_act_bits": config.act_bits * act_terms if config.act_bits is not None else None,
        }
        for key, value in derived.items():
            if kwargs[key] is not None and kwargs[key] != value:
                raise ValueError(
                    f"PTQConfig.method_kwargs (method='fpxint'): invalid value for `{key}`: {kwargs[key]!r}. "
                    f"It is derived (bits × terms); allowed values: None or {value!r}."
                )
        return {**kwargs, **derived}

    def layer_schemes(self, layers: dict[str, nn.Module]) -> dict[str, LayerScheme]:
        from ..quant.replace import scheme_from_config

        k = self.kwargs
        dynamic = self.config.act_bits is not None
        keeps_all = k.max_order is None or k.max_order >= k.terms + k.act_terms
        base = scheme_from_config(self.config, terms=k.terms)
        scheme = LayerScheme(
            **{
                **base.to_dict(),
                "act_terms": k.act_terms,
                "act_dynamic": dynamic,
                "max_order": None if keeps_all else k.max_order,
            }
        )
        return {name: scheme for name in layers}

    def quantize_unit(self, work: UnitWork) -> UnitResult:
        weights, stats = {}, {}
        for name, layer in work.layers.items():
            scheme = work.schemes[name]
            series = residual_expand(layer.weight, scheme.bits, scheme.terms, scheme.symmetric, scheme.granularity)
            if scheme.terms == 1:
                qweight = QuantizedWeight(series.codes[0], series.scale[0], series.zero_point[0], scheme)
            else:
                qweight = QuantizedWeight(series.codes, series.scale, series.zero_point, scheme)
            weights[name] = qweight
            if len(work.layers) == 1:  # per-term relative residual norms, for the per-unit report
                rel = series.residual_norms / layer.weight.detach().float().norm().clamp_min(1e-12)
                stats.update({f"residual_rel_norm_term{i + 1}": float(r) for i, r in enumerate(rel)})
        return UnitResult(weights=weights, stats=stats)

    def report_fields(self) -> dict[str, Any]:
        k = self.kwargs
        return {
            "effective_bits": effective_bits(self.config),
            "effective_act_bits": effective_act_bits(self.config),
            "terms": k.terms,
            "act_terms": k.act_terms if self.config.act_bits is not None else None,
            "max_order": k.max_order,
        }
