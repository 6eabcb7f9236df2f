"""FP=xINT at layer level: the forward of a layer whose weight *and* input are series-expanded.

With weight terms ``W_k = s_k (B_k - z_k)`` (stored) and input terms ``A_j = t_j (C_j - c_j)``
(expanded from the live input at run time, per token, so no calibration is needed), the layer
computes ``Σ_{(k, j) kept} A_j · W_k`` with ``(k, j)`` kept when ``k + j <= max_order``.

Two evaluations of that sum, both one batched op over all terms (no Python loop over terms):

* :func:`expanded_forward` (what the modules run): per activation term ``j`` the kept weight
  terms are folded first, ``W̃_j = Σ_{k: (k, j) kept} W_k`` — exact by linearity — so the cost is
  ``K_a`` GEMMs (one ``bmm`` / one grouped conv) plus ``K_w`` dequantizations.
* :func:`pair_outputs` emulates what an integer kernel would do: every kept pair is its own
  integer product ``(C_j - c_j)(B_k - z_k)`` followed by one float rescale ``t_j s_k``, all
  pairs stacked into one ``bmm`` / grouped conv. Used to inspect the per-pair contributions.

Activation scales are per token for Linear (one per row of ``[..., in_features]``) and per sample
for Conv2d (one per image: a per-pixel scale would not factor out of a convolution window).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .series import SeriesTerms, kept_pairs, residual_expand

if TYPE_CHECKING:
    from .modules import QuantModuleMixin

__all__ = ["expand_input", "expanded_forward", "pair_outputs"]


def expand_input(module: "QuantModuleMixin", x: torch.Tensor) -> SeriesTerms:
    """Run-time residual expansion of a layer input: per token (Linear) or per sample (Conv2d)."""
    s = module.scheme
    rows = x.reshape(-1, x.shape[-1]) if _is_linear(module) else x
    return residual_expand(rows, s.act_bits, s.act_terms, s.act_symmetric, "channel")


def _is_linear(module: "QuantModuleMixin") -> bool:
    return len(module.weight_shape_tuple) == 2


def _mask(module: "QuantModuleMixin") -> torch.Tensor:
    s = module.scheme
    return kept_pairs(s.terms, s.act_terms, s.max_order)


def expanded_forward(module: "QuantModuleMixin", x: torch.Tensor) -> torch.Tensor:
    """``Σ_{kept (k, j)} A_j · W_k + bias`` in one batched op (weight terms folded per ``j``)."""
    a_terms = expand_input(module, x)
    a = a_terms.values().to(x.dtype)  # [J, M, in] or [J, N, C, H, W]
    w = module.dequantized_terms(x.dtype)  # [K, *weight_shape]
    mask = _mask(module).to(device=w.device, dtype=w.dtype)  # [K, J]
    w_folded = torch.einsum("kj,k...->j...", mask, w)  # [J, *weight_shape]
    if _is_linear(module):
        y = torch.bmm(a, w_folded.transpose(1, 2)).sum(0)
        if module.bias is not None:
            y = y + module.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])
    return _stacked_conv(module, a, w_folded, module.bias)


def pair_outputs(module: "QuantModuleMixin", x: torch.Tensor) -> torch.Tensor:
    """Per kept pair, ``t_j s_k · (C_j - c_j)(B_k - z_k)`` (no bias), stacked: ``[P, *output_shape]``.

    Pairs are ordered as ``kept_pairs(...).nonzero()`` (weight term major). Integer products are
    computed on the centered codes in float32 (exact while partial sums stay below 2**24).
    """
    s = module.scheme
    a_terms = expand_input(module, x)
    w_int = module.quantized_weight()
    w_codes = w_int.codes if s.terms > 1 else w_int.codes.unsqueeze(0)
    w_terms = SeriesTerms(
        w_codes, w_int.scale.reshape(s.terms, -1), w_int.zero_point.reshape(s.terms, -1)
    )
    k_idx, j_idx = _mask(module).nonzero(as_tuple=True)
    a_c, w_c = a_terms.centered()[j_idx], w_terms.centered()[k_idx]  # [P, ...] each
    t, sc = a_terms.scale[j_idx], w_terms.scale[k_idx]  # [P, M or N], [P, out or 1]
    if _is_linear(module):
        prod = torch.bmm(a_c, w_c.transpose(1, 2))  # [P, M, out]
        y = prod * t.unsqueeze(-1) * sc.unsqueeze(1)
        return y.reshape(len(k_idx), *x.shape[:-1], y.shape[-1]).to(x.dtype)
    prod = _stacked_conv(module, a_c, w_c, None, reduce=False)  # [P, N, out, H', W']
    y = prod * t[:, :, None, None, None] * sc[:, None, :, None, None]
    return y.to(x.dtype)


def _stacked_conv(
    module: "QuantModuleMixin",
    a: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    reduce: bool = True,
) -> torch.Tensor:
    """Convolve input stack ``a[i]`` with weight stack ``w[i]`` for all ``i`` in ONE grouped conv.

    The stack goes into the channel dim with ``groups = T * groups``; group ``i * G + g`` sees
    input channels and output channels of stack entry ``i``. Returns the sum over the stack
    (+ bias), or the stack ``[T, N, out, H', W']`` when ``reduce=False``.
    """
    t, n = a.shape[0], a.shape[1]
    groups = module.groups
    x_cat = a.permute(1, 0, 2, 3, 4).reshape(n, -1, *a.shape[-2:])
    w_cat = w.reshape(-1, *w.shape[2:])
    y = F.conv2d(x_cat, w_cat, None, module.stride, module.padding, module.dilation, t * groups)
    y = y.reshape(n, t, -1, *y.shape[-2:])
    if not reduce:
        return y.transpose(0, 1)
    y = y.sum(1)
    if bias is not None:
        y = y + bias.to(y.dtype).reshape(1, -1, 1, 1)
    return y
