"""hf_ptq: post-training quantization for Hugging Face transformers vision models.

``import hf_ptq`` registers ``quant_method="hf_ptq"`` with transformers, so that
``from_pretrained(..., quantization_config=PTQConfig(...))`` quantizes a float checkpoint and a
plain ``from_pretrained`` reloads a checkpoint saved by hf_ptq.
"""

from importlib.metadata import PackageNotFoundError, version

from .config import CalibrationConfig, PTQConfig
from .quantizer import PTQHfQuantizer
from .quantize import quantize_model
from .evaluation import evaluate_model
from .card import EvalReport
from .hub import HubUploadError, push_to_hub, save_quantized
from .recipes import RecipeError, load_recipe

try:
    __version__ = version("hf-ptq")
except PackageNotFoundError:  # source tree without install
    __version__ = "0.0.0"

__all__ = ["PTQConfig", "CalibrationConfig", "PTQHfQuantizer", "quantize_model", "evaluate_model", "__version__"]
__all__ += ["save_quantized", "push_to_hub", "HubUploadError", "EvalReport", "load_recipe", "RecipeError"]
