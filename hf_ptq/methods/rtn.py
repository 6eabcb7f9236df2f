"""Round-to-nearest: the baseline every other method must beat.

Each weight is rounded to the nearest point of a min-max grid, or of the grid whose clipping
range minimises the L2.4 error (``weight_observer="mse"``, as the BRECQ/QDrop references).
Needs no data unless activations are quantized (then only to observe activation ranges).
"""

from __future__ import annotations

from ..quant.scheme import rtn_quantize_weight
from .base import PTQMethod, UnitResult, UnitWork, register_method


@register_method("rtn")
class RTN(PTQMethod):
    default_weight_observer = "minmax"
    input_mode = "none"
    unit_granularity = "block"  # only matters with act_bits: activation ranges are observed per block

    def quantize_unit(self, work: UnitWork) -> UnitResult:
        weights = {
            name: rtn_quantize_weight(layer.weight, work.schemes[name], self.weight_observer)
            for name, layer in work.layers.items()
        }
        return UnitResult(weights=weights)
