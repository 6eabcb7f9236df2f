"""Pure quantization arithmetic: qparams, quantize/dequantize, packing, observers.

Everything here is a function of tensors only (no modules, no transformers), so that every
method and the storage format share one definition of the integer grid.

Conventions
-----------
* Codes are stored **unsigned**: ``q ∈ [0, 2**bits - 1]`` and ``w ≈ scale * (q - zero_point)``.
* Asymmetric grids: ``scale = (max - min) / (2**bits - 1)`` over a range that always contains 0,
  ``zero_point = round(-min / scale)``.
* Symmetric grids: restricted signed range ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``,
  ``scale = absmax / (2**(bits-1) - 1)``, ``zero_point = 2**(bits-1)`` (so the unsigned code
  ``2**(bits-1)`` is exactly 0 and code 0 is unused).
* Granularity ``"channel"`` means one (scale, zero point) per output channel (dim 0); ``"tensor"``
  means one pair for the whole tensor (stored with shape ``[1]``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Granularity = Literal["channel", "tensor"]

__all__ = [
    "qrange",
    "reduce_minmax",
    "qparams_from_minmax",
    "quantize",
    "dequantize",
    "fake_quantize",
    "mse_search_minmax",
    "percentile_minmax",
    "packed_words",
    "pack_codes",
    "unpack_codes",
    "storage_dtype",
]


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Smallest and largest **unsigned** code of the grid."""
    if symmetric:
        return 1, 2**bits - 1
    return 0, 2**bits - 1


def _broadcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape a per-channel ``[C]`` (or per-tensor ``[1]``) vector to broadcast over dim 0 of ``like``."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def reduce_minmax(x: torch.Tensor, granularity: Granularity) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel (dim 0) or per-tensor min and max, as 1-D float tensors."""
    if granularity == "channel":
        flat = x.detach().reshape(x.shape[0], -1).float()
        return flat.amin(1), flat.amax(1)
    if granularity == "tensor":
        flat = x.detach().float()
        return flat.amin().reshape(1), flat.amax().reshape(1)
    raise ValueError(f"granularity={granularity!r} is not supported; allowed values are 'channel', 'tensor'.")


def qparams_from_minmax(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) of the grid that covers ``[lo, hi]`` (extended to contain 0)."""
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    if symmetric:
        half = 2 ** (bits - 1) - 1
        scale = (torch.maximum(-lo, hi) / half).clamp_min(eps)
        zero_point = torch.full_like(scale, 2 ** (bits - 1), dtype=torch.int32)
        return scale, zero_point
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp_min(eps)
    zero_point = torch.round(-lo / scale).clamp(0, qmax).to(torch.int32)
    return scale, zero_point


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool
) -> torch.Tensor:
    """Unsigned integer codes (int32) of ``x`` on the grid; scale/zero point broadcast over dim 0."""
    qmin, qmax = qrange(bits, symmetric)
    s, z = _broadcast(scale, x), _broadcast(zero_point, x)
    return torch.clamp(torch.round(x.float() / s) + z, qmin, qmax).to(torch.int32)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Float values ``scale * (codes - zero_point)``; scale/zero point broadcast over dim 0."""
    s, z = _broadcast(scale, codes), _broadcast(zero_point, codes)
    return (codes.to(torch.float32) - z.to(torch.float32)) * s.to(torch.float32)


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool
) -> torch.Tensor:
    """``dequantize(quantize(x))``: the value the quantized layer will actually use.

    Computed in float with in-place ops (no integer tensors): the same values bit for bit, since
    ``round(x / s) + z`` and its clamp are small integers, exact in float32, at about half the cost
    of the two-step form (it runs on every activation of every quantized layer).
    """
    qmin, qmax = qrange(bits, symmetric)
    s, z = _broadcast(scale, x).to(torch.float32), _broadcast(zero_point, x).to(torch.float32)
    return torch.round(x.float() / s).add_(z).clamp_(qmin, qmax).sub_(z).mul_(s)


def _lp_error(x: torch.Tensor, xq: torch.Tensor, p: float, granularity: Granularity) -> torch.Tensor:
    err = (x - xq).abs().pow(p)
    if granularity == "channel":
        return err.reshape(err.shape[0], -1).mean(1)
    return err.mean().reshape(1)


def mse_search_minmax(
    x: torch.Tensor,
    bits: int,
    symmetric: bool,
    granularity: Granularity,
    num_candidates: int = 80,
    p: float = 2.4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipping range minimising the L_p quantization error (BRECQ/QDrop reference: p=2.4, 80 steps).

    Candidate ``i`` shrinks the min-max range to ``[min*(1-0.01i), max*(1-0.01i)]``; the best
    candidate is chosen independently per channel for ``granularity="channel"``.
    """
    x = x.detach().float()
    lo, hi = reduce_minmax(x, granularity)
    best_err = torch.full_like(lo, math.inf)
    best_lo, best_hi = lo.clone(), hi.clone()
    for i in range(num_candidates):
        shrink = 1.0 - 0.01 * i
        c_lo, c_hi = lo * shrink, hi * shrink
        scale, zp = qparams_from_minmax(c_lo, c_hi, bits, symmetric)
        err = _lp_error(x, fake_quantize(x, scale, zp, bits, symmetric), p, granularity)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, c_lo, best_lo)
        best_hi = torch.where(better, c_hi, best_hi)
    return best_lo, best_hi


def percentile_minmax(x: torch.Tensor, percentile: float = 99.99) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor ``(100-p)``-th and ``p``-th percentiles (activation observer robust to outliers)."""
    flat = x.detach().float().flatten()
    if flat.numel() > 16_000_000:  # torch.quantile limit; a strided subsample keeps it exact enough
        flat = flat[:: math.ceil(flat.numel() / 16_000_000)]
    q = torch.tensor([1.0 - percentile / 100.0, percentile / 100.0], dtype=flat.dtype)
    lo, hi = torch.quantile(flat, q)
    return lo.reshape(1), hi.reshape(1)


# --------------------------------------------------------------------------------------------
# Packing: codes of one output channel are laid out as a dense little-endian bit stream in
# int32 words (values may straddle two words), so a row of n b-bit codes takes
# ceil(n*b/32) words. 8-bit codes are stored as int8 (code - 128) instead, one per byte.
# --------------------------------------------------------------------------------------------


def storage_dtype(bits: int) -> torch.dtype:
    """On-disk dtype of ``weight_packed`` for a bit width."""
    return torch.int8 if bits == 8 else torch.int32


def packed_words(n: int, bits: int) -> int:
    """Length of the last dim of ``weight_packed`` for ``n`` codes per row."""
    return n if bits == 8 else math.ceil(n * bits / 32)


def _bit_positions(n: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.arange(n, device=device, dtype=torch.int64) * bits
    return offsets // 32, offsets % 32


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[..., n]`` into ``[..., packed_words(n, bits)]`` (int32, or int8 at 8 bits)."""
    if bits == 8:
        return (codes.to(torch.int16) - 128).to(torch.int8)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits}-bit packing: [{int(codes.min())}, {int(codes.max())}]")
    *lead, n = codes.shape
    rows = codes.reshape(-1, n).to(torch.int64)
    words = packed_words(n, bits)
    if 32 % bits == 0:
        # Fast path (2/4 bits: no code straddles a word): pad the row to whole words, shift each
        # code to its slot and add (disjoint bits) — same layout as the general path below.
        per = 32 // bits
        rows = torch.cat([rows, rows.new_zeros(rows.shape[0], words * per - n)], dim=1).reshape(-1, words, per)
        shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=codes.device)
        out = (rows << shifts).sum(-1)
        out = torch.where(out >= 2**31, out - 2**32, out)  # reinterpret uint32 as int32
        return out.to(torch.int32).reshape(*lead, words)
    word, shift = _bit_positions(n, bits, codes.device)
    out = torch.zeros(rows.shape[0], words + 1, dtype=torch.int64, device=codes.device)
    # Bits never overlap, so adding is the same as OR-ing. Low part goes to `word`, the part
    # that spills past bit 31 goes to `word + 1` (the extra column is dropped afterwards).
    low = (rows << shift) & 0xFFFFFFFF
    high = rows >> (32 - shift)
    out.scatter_add_(1, word.expand_as(rows), low)
    out.scatter_add_(1, (word + 1).expand_as(rows), high)
    out = out[:, :words]
    out = torch.where(out >= 2**31, out - 2**32, out)  # reinterpret uint32 as int32
    return out.to(torch.int32).reshape(*lead, words)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[..., words]`` → unsigned codes ``[..., n]`` (int32)."""
    if bits == 8:
        return packed.to(torch.int32) + 128
    *lead, words = packed.shape
    if 32 % bits == 0:
        # Fast path (2/4 bits: no code straddles a word), same layout: code i of a word sits at
        # bit i*bits. One broadcast shift + mask in int32 instead of int64 gathers; the mask also
        # drops the sign bits an arithmetic shift of a negative word brings in.
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
        codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)
        return codes.reshape(*lead, words * (32 // bits))[..., :n].contiguous()
    rows = packed.reshape(-1, words).to(torch.int64) & 0xFFFFFFFF
    rows = torch.cat([rows, torch.zeros_like(rows[:, :1])], dim=1)
    word, shift = _bit_positions(n, bits, packed.device)
    low = rows[:, word] >> shift
    high = rows[:, word + 1] << (32 - shift)
    mask = 2**bits - 1
    return ((low | high) & mask).to(torch.int32).reshape(*lead, n)
