"""What one quantized layer stores: its number format, independent of the method that chose the codes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from .primitives import qparams_from_minmax, quantize, reduce_minmax, mse_search_minmax

__all__ = ["LayerScheme", "QuantizedWeight", "rtn_quantize_weight"]


@dataclass(frozen=True)
class LayerScheme:
    """Number format of one quantized Linear/Conv2d (serialized per module in ``config.json``).

    ``terms > 1`` is FP=xINT's series expansion: the weight is the sum of ``terms`` integer tensors,
    each with its own scales. ``act_bits=None`` keeps the layer input in float.

    FP=xINT's run-time activation expansion (``act_dynamic=True``) replaces the static input
    quantizer: the live input is expanded into ``act_terms`` integer terms with per-token scales, and
    only (weight term k, activation term j) pairs with ``k + j <= max_order`` are computed
    (``None`` keeps all pairs). The defaults leave every other method's format unchanged.
    """

    bits: int
    granularity: Literal["channel", "tensor"] = "channel"
    symmetric: bool = False
    terms: int = 1
    act_bits: int | None = None
    act_symmetric: bool = False
    act_terms: int = 1
    act_dynamic: bool = False
    max_order: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerScheme":
        return cls(**data)


@dataclass
class QuantizedWeight:
    """Integer codes + grid of one weight; what every method hands to the storage modules.

    ``codes`` are unsigned ints with the weight's shape (``[terms, *shape]`` when ``terms > 1``);
    ``scale``/``zero_point`` are ``[C]`` per channel or ``[1]`` per tensor (``[terms, C]`` for terms).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    scheme: LayerScheme

    def dequantize(self) -> torch.Tensor:
        """The float weight the quantized layer computes with (sum over terms)."""
        from .primitives import dequantize

        if self.scheme.terms == 1:
            return dequantize(self.codes, self.scale, self.zero_point)
        return sum(dequantize(c, s, z) for c, s, z in zip(self.codes, self.scale, self.zero_point))


def rtn_quantize_weight(
    weight: torch.Tensor, scheme: LayerScheme, observer: Literal["minmax", "mse"] = "minmax"
) -> QuantizedWeight:
    """Round-to-nearest on a min-max or MSE(L2.4)-searched grid; also the init of COMQ/BRECQ."""
    w = weight.detach().float()
    if observer == "minmax":
        lo, hi = reduce_minmax(w, scheme.granularity)
    elif observer == "mse":
        lo, hi = mse_search_minmax(w, scheme.bits, scheme.symmetric, scheme.granularity)
    else:
        raise ValueError(f"observer={observer!r} is not supported; allowed values are 'minmax', 'mse'.")
    scale, zero_point = qparams_from_minmax(lo, hi, scheme.bits, scheme.symmetric)
    codes = quantize(w, scale, zero_point, scheme.bits, scheme.symmetric)
    return QuantizedWeight(codes=codes, scale=scale, zero_point=zero_point, scheme=scheme)
