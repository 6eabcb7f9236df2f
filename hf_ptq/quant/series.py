"""FP=xINT at tensor level: a float tensor as a sum of low-bit integer terms (residual expansion).

``R_0 = x``; term ``k`` puts a fresh min-max grid on the residual ``R_{k-1}`` (per output channel,
or per tensor), rounds it to ``b``-bit codes ``B_k`` and leaves ``R_k = R_{k-1} - s_k (B_k - z_k)``.
Each grid covers the residual it quantizes, so ``|R_k| <= s_k / 2`` element-wise, and the max-norm
of the residual contracts by at least

* ``rho = 1 / (2**b - 2)`` per term on the symmetric grid (``s = absmax / (2**(b-1) - 1)``,
  algorithms.md §4.2), and
* ``rho = 1 / (2**b - 1)`` on the asymmetric grid (``s = (max - min) / (2**b - 1)``),

both ``<= 2**-(b-1)``: the expansion converges geometrically (the paper's "exponential
convergence"). The same function expands weights once (per output channel) and activations at
run time (per token: one row of a ``[tokens, features]`` view).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .primitives import Granularity, dequantize, qparams_from_minmax, quantize, reduce_minmax

__all__ = ["SeriesTerms", "residual_expand", "contraction_bound", "kept_pairs"]


@dataclass
class SeriesTerms:
    """``K`` integer terms of one tensor: ``x ≈ Σ_k scale[k] * (codes[k] - zero_point[k])``.

    ``codes`` is int32 ``[K, *shape]`` (unsigned, like every hf_ptq code); ``scale`` and
    ``zero_point`` are ``[K, C]`` with ``C`` the size of dim 0 (channel) or 1 (tensor).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    #: Frobenius norm of the residual left after each term, ``[K]`` (float32, as computed).
    residual_norms: torch.Tensor | None = None

    @property
    def num_terms(self) -> int:
        return self.codes.shape[0]

    def centered(self) -> torch.Tensor:
        """Signed integer values ``codes - zero_point`` per term (float32, exact), ``[K, *shape]``."""
        z = self.zero_point.reshape(*self.zero_point.shape, *([1] * (self.codes.dim() - 2)))
        return self.codes.to(torch.float32) - z.to(torch.float32)

    def values(self) -> torch.Tensor:
        """Float value of every term, ``[K, *shape]`` (term ``k`` is ``s_k (B_k - z_k)``)."""
        return torch.stack([dequantize(c, s, z) for c, s, z in zip(self.codes, self.scale, self.zero_point)])

    def reconstruct(self) -> torch.Tensor:
        """The truncated series ``Σ_k s_k (B_k - z_k)``."""
        return self.values().sum(0)


@torch.no_grad()
def residual_expand(
    x: torch.Tensor, bits: int, terms: int, symmetric: bool, granularity: Granularity = "channel"
) -> SeriesTerms:
    """Expand ``x`` into ``terms`` ``bits``-bit integer tensors, each quantizing the previous residual.

    ``granularity="channel"`` gives every slice along dim 0 its own grids (weights: output channels;
    activations viewed as ``[tokens, features]``: tokens).
    """
    if terms < 1:
        raise ValueError(f"terms={terms!r} is not supported; allowed values are integers >= 1.")
    residual = x.detach().float()
    codes, scales, zero_points, norms = [], [], [], []
    for _ in range(terms):  # sequential by nature: term k needs the residual of terms < k
        lo, hi = reduce_minmax(residual, granularity)
        scale, zero_point = qparams_from_minmax(lo, hi, bits, symmetric)
        q = quantize(residual, scale, zero_point, bits, symmetric)
        residual = residual - dequantize(q, scale, zero_point)
        codes.append(q)
        scales.append(scale)
        zero_points.append(zero_point)
        norms.append(residual.norm())
    return SeriesTerms(torch.stack(codes), torch.stack(scales), torch.stack(zero_points), torch.stack(norms))


def contraction_bound(bits: int, symmetric: bool) -> float:
    """Guaranteed per-term shrink factor of the residual's max-norm (per channel), see module doc."""
    return 1.0 / (2**bits - 2) if symmetric else 1.0 / (2**bits - 1)


def kept_pairs(weight_terms: int, act_terms: int, max_order: int | None) -> torch.Tensor:
    """Bool ``[K_w, K_a]`` mask of the (weight term k, activation term j) products kept.

    Terms are numbered from 1; the pair ``(k, j)`` has order ``k + j`` and is kept when
    ``k + j <= max_order`` (``None`` keeps all), like dropping higher-order terms of a series.
    """
    k = torch.arange(1, weight_terms + 1).unsqueeze(1)
    j = torch.arange(1, act_terms + 1).unsqueeze(0)
    if max_order is None:
        return torch.ones(weight_terms, act_terms, dtype=torch.bool)
    return (k + j) <= max_order
