"""AdaRound soft rounding: the learned up/down decision of every weight on a frozen grid.

Each weight ``w`` on a grid with step ``s`` and zero point ``z`` is written as
``s · (clamp(floor(w/s) + h(V) + z, qmin, qmax) − z)`` where ``h`` is the *rectified sigmoid*
``clamp(sigmoid(V)·(ζ−γ) + γ, 0, 1)`` with ζ = 1.1, γ = −0.1 (AdaRound, Nagel et al. 2020; the
BRECQ reference ``quant/adaptive_rounding.py``). ``h`` reaches exactly 0 and 1 for finite ``V``,
so the regulariser ``Σ 1 − |2h − 1|^β`` can drive every variable to a hard decision.

``V`` is initialised so that ``h(V)`` is the fractional part of ``w/s``: at iteration 0 the soft
weights *are* the float weights (for weights inside the clipping range), so learning starts from
the float model rather than from round-to-nearest. The final codes round up where ``V ≥ 0``
(``h(V) ≥ 0.5``), i.e. the init alone gives round-to-nearest.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.primitives import qrange
from ..quant.scheme import LayerScheme, QuantizedWeight

__all__ = ["ZETA", "GAMMA", "rectified_sigmoid", "init_logits", "beta_schedule", "AdaRoundWeight"]

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clamp(sigmoid(V)·(ζ−γ) + γ, 0, 1)``: a sigmoid stretched past [0, 1] and clipped."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_logits(frac: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) = frac`` for ``frac ∈ [0, 1)``: ``V = −log((ζ−γ)/(frac−γ) − 1)``."""
    return -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0)


def beta_schedule(t: int, iters: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float:
    """Temperature β of the rounding regulariser at (1-based) iteration ``t``; 0 during warm-up.

    As the reference's ``LinearTempDecay`` + ``LossFunction``: no regulariser while
    ``t < warmup·iters``; afterwards β decays **linearly** from ``start`` at ``t = warmup·iters`` to
    ``end`` at ``t = iters`` (the reference docstring says cosine; its code is linear). With a
    large β the penalty ``1 − |2h − 1|^β`` is flat (≈ 1) except close to 0 and 1, so the
    reconstruction loss moves the variables freely; as β falls towards 2 the penalty becomes a
    parabola that pushes every variable away from 0.5, to a hard decision.
    """
    begin = warmup * iters
    if t < begin:
        return 0.0
    rel = (t - begin) / max(iters - begin, 1e-12)
    return end + (start - end) * max(0.0, 1.0 - rel)


class AdaRoundWeight(nn.Module):
    """Soft-quantized weight of one layer: frozen grid (scale, zero point, floor) + learned ``V``.

    The grid comes from the method's range init (per-channel MSE L2.4 for BRECQ) and is never
    changed: only the rounding direction is learned, so the final codes are ``floor`` or
    ``floor + 1`` of ``w/s`` (+ ``z``), clamped to the grid.
    """

    def __init__(self, weight: torch.Tensor, init: QuantizedWeight) -> None:
        super().__init__()
        self.scheme: LayerScheme = init.scheme
        self.shape = tuple(weight.shape)
        w = weight.detach().float()
        view = (-1,) + (1,) * (w.dim() - 1)
        self.register_buffer("scale", init.scale.detach().float().reshape(view).to(w.device))
        self.register_buffer("zero_point", init.zero_point.detach().float().reshape(view).to(w.device))
        scaled = w / self.scale
        floor = torch.floor(scaled)
        self.register_buffer("floor", floor)
        self.qmin, self.qmax = qrange(self.scheme.bits, self.scheme.symmetric)
        self.logits = nn.Parameter(init_logits(scaled - floor))

    def soft_rounding(self) -> torch.Tensor:
        """``h(V)`` ∈ [0, 1] per weight."""
        return rectified_sigmoid(self.logits)

    def hard_rounding(self) -> torch.Tensor:
        """The final 0/1 decision: round up where ``V ≥ 0``."""
        return (self.logits.detach() >= 0).float()

    def _dequant(self, rounding: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(self.floor + rounding + self.zero_point, self.qmin, self.qmax)
        return self.scale * (q - self.zero_point)

    def forward(self) -> torch.Tensor:
        """Soft-quantized float weight (differentiable in ``V``)."""
        return self._dequant(self.soft_rounding())

    @torch.no_grad()
    def hard_weight(self) -> torch.Tensor:
        """Float weight with the hard rounding (what the packed layer will compute with)."""
        return self._dequant(self.hard_rounding())

    def regularizer(self, beta: float) -> torch.Tensor:
        """``Σ 1 − |2h(V) − 1|^β``: 0 when every variable is 0 or 1, largest at 0.5."""
        return (1.0 - (2.0 * self.soft_rounding() - 1.0).abs().pow(beta)).sum()

    @torch.no_grad()
    def quantized(self) -> QuantizedWeight:
        """Integer codes of the hard rounding on the frozen grid (codes in ``[qmin, qmax]``)."""
        codes = torch.clamp(self.floor + self.hard_rounding() + self.zero_point, self.qmin, self.qmax)
        return QuantizedWeight(
            codes=codes.to(torch.int32).cpu(),
            scale=self.scale.reshape(-1).cpu(),
            zero_point=self.zero_point.reshape(-1).to(torch.int32).cpu(),
            scheme=self.scheme,
        )
