"""Learned activation step size (LSQ-style) for the static input quantizer of one layer.

hf_ptq quantizes activations at the *input* of each quantized Linear/Conv2d with a static
per-tensor (scale, zero point). BRECQ and QDrop initialise that grid with an MSE (L2.4) range
search and then learn the step size by gradient descent through a straight-through estimator on
``round`` (the references' ``UniformAffineQuantizer(leaf_param=True)`` / QDrop's LSQ
fake-quantizer); the zero point stays fixed. QDrop additionally *drops* quantization at random:
each element keeps its quantized value with probability ``keep_prob`` and its float value
otherwise, which flattens the loss landscape seen by the weights during joint learning.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.primitives import qrange

__all__ = ["round_ste", "LearnedStepQuantizer"]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round`` in the forward pass, identity in the backward pass (straight-through estimator)."""
    return (torch.round(x) - x).detach() + x


class LearnedStepQuantizer(nn.Module):
    """Fake-quantizer ``s · (clamp(round_ste(x/s) + z, qmin, qmax) − z)`` with ``s`` an ``nn.Parameter``.

    ``keep_prob < 1`` (QDrop) mixes quantized and float elements while ``self.training``; in eval
    mode every element is quantized, as in the deployed model.
    """

    def __init__(
        self,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        bits: int,
        symmetric: bool,
        keep_prob: float = 1.0,
        min_scale: float = 1e-8,
    ) -> None:
        super().__init__()
        self.scale = nn.Parameter(scale.detach().float().reshape(1).clone())
        self.register_buffer("zero_point", zero_point.detach().float().reshape(1).clone())
        self.qmin, self.qmax = qrange(bits, symmetric)
        self.keep_prob = keep_prob
        self.min_scale = min_scale
        #: False passes inputs through unchanged (e.g. while weights are reconstructed first).
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        s = self.scale.clamp_min(self.min_scale)
        xq = (torch.clamp(round_ste(x / s) + self.zero_point, self.qmin, self.qmax) - self.zero_point) * s
        if self.training and self.keep_prob < 1.0:
            return torch.where(torch.rand_like(x) < self.keep_prob, xq, x)
        return xq

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale [1], zero_point [1] int32) for the storage module's static input quantizer."""
        s = self.scale.detach().clamp_min(self.min_scale).cpu()
        return s.clone(), self.zero_point.detach().to(torch.int32).cpu()
