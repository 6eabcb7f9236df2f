"""``PTQHfQuantizer``: the transformers hooks, and nothing else.

* float checkpoint + ``PTQConfig`` → load float weights, then quantize in
  ``_process_model_after_weight_loading`` (the GPTQ pattern: calibration needs real weights);
* hf_ptq checkpoint → swap in empty quantized modules on the meta model in
  ``_process_model_before_weight_loading`` so the packed tensors load straight into them.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers import HfQuantizer, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

from .config import QUANT_METHOD, PTQConfig
from .quant.fold import apply_folded_structure
from .quant.replace import schemes_from_config, swap_in_empty_quant_modules

__all__ = ["PTQHfQuantizer"]


class PTQHfQuantizer(HfQuantizer):
    """Quantizer for ``quant_method="hf_ptq"`` checkpoints and configs."""

    requires_calibration = False
    quantization_config: PTQConfig

    def __init__(self, quantization_config: PTQConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        if self.pre_quantized and not quantization_config.is_prequantized:
            raise ValueError(
                "This checkpoint's quantization_config has quant_method='hf_ptq' but lists no quantized modules; "
                "it was not written by hf_ptq's save_pretrained. Load the float checkpoint and pass "
                "quantization_config=PTQConfig(...) instead."
            )

    def _process_model_before_weight_loading(self, model, **kwargs: Any):
        if self.pre_quantized:
            apply_folded_structure(model, self.quantization_config.folded_batchnorms)
            swap_in_empty_quant_modules(model, schemes_from_config(self.quantization_config), device="meta")
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        if not self.pre_quantized:
            from .quantize import quantize_model

            quantize_model(model, self.quantization_config)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs: Any) -> bool:
        return False  # weights are quantized after loading, never tensor by tensor

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:  # re-imports (tests, reloads) must not raise
    register_quantizer(QUANT_METHOD)(PTQHfQuantizer)
