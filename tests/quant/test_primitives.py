"""Packing round trips, grid arithmetic and observers against independent reference computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_ptq.quant.primitives import (
    dequantize,
    mse_search_minmax,
    pack_codes,
    packed_words,
    qparams_from_minmax,
    quantize,
    reduce_minmax,
    unpack_codes,
)

ODD_SHAPES = [(1, 1), (7, 13), (3, 33), (5, 97), (2, 3, 31), (4, 1000)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_pack_unpack_round_trip(bits, shape):
    gen = torch.Generator().manual_seed(bits * 1000 + sum(shape))
    codes = torch.randint(0, 2**bits, shape, generator=gen, dtype=torch.int32)
    packed = pack_codes(codes, bits)
    assert packed.dtype == (torch.int8 if bits == 8 else torch.int32)
    assert packed.shape[-1] == packed_words(shape[-1], bits)
    assert torch.equal(unpack_codes(packed, bits, shape[-1]), codes)


def _reference_pack(row: list[int], bits: int) -> list[int]:
    """Bit-by-bit little-endian stream into 32-bit words, written independently of the library."""
    stream = []
    for v in row:
        stream.extend((v >> k) & 1 for k in range(bits))
    words = []
    for start in range(0, len(stream), 32):
        chunk = stream[start : start + 32]
        word = sum(bit << k for k, bit in enumerate(chunk))
        words.append(word - 2**32 if word >= 2**31 else word)
    return words


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_matches_bit_stream_reference(bits):
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 45), generator=gen, dtype=torch.int32)
    packed = pack_codes(codes, bits)
    for r in range(3):
        assert packed[r].tolist() == _reference_pack(codes[r].tolist(), bits)


def test_packed_words_arithmetic():
    assert packed_words(768, 4) == 96
    assert packed_words(768, 2) == 48
    assert packed_words(10, 3) == 1  # 30 bits
    assert packed_words(11, 3) == 2  # 33 bits straddle into a second word
    assert packed_words(100, 8) == 100


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([[0, 4]], dtype=torch.int32), 2)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymmetric_per_channel_grid_matches_formula(bits):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 20, generator=gen) + torch.linspace(-1, 1, 6)[:, None]
    lo, hi = reduce_minmax(w, "channel")
    scale, zp = qparams_from_minmax(lo, hi, bits, symmetric=False)
    codes = quantize(w, scale, zp, bits, symmetric=False)
    deq = dequantize(codes, scale, zp)
    wn = w.numpy().astype(np.float64)
    for i in range(6):
        mn, mx = min(wn[i].min(), 0.0), max(wn[i].max(), 0.0)
        s = (mx - mn) / (2**bits - 1)
        z = int(np.clip(np.round(-mn / s), 0, 2**bits - 1))
        q = np.clip(np.round(wn[i] / s) + z, 0, 2**bits - 1)
        np.testing.assert_allclose(deq[i].numpy(), s * (q - z), rtol=1e-5, atol=1e-6)
        assert codes[i].min() >= 0 and codes[i].max() <= 2**bits - 1
    # min-max asymmetric rounding error is at most half a step inside the range
    assert torch.all((deq - w).abs() <= scale[:, None] / 2 + 1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_symmetric_grid_is_restricted_and_zero_exact(bits):
    w = torch.tensor([[-3.0, -1.0, 0.0, 0.5, 2.0]])
    lo, hi = reduce_minmax(w, "channel")
    scale, zp = qparams_from_minmax(lo, hi, bits, symmetric=True)
    half = 2 ** (bits - 1) - 1
    assert math.isclose(float(scale), 3.0 / half, rel_tol=1e-6)
    assert int(zp) == 2 ** (bits - 1)
    codes = quantize(w, scale, zp, bits, symmetric=True)
    assert int(codes.min()) >= 1  # code 0 (= -2^(b-1)) is unused by the restricted range
    assert float(dequantize(codes, scale, zp)[0, 2]) == 0.0


def test_per_tensor_uses_one_grid():
    w = torch.tensor([[1.0, -1.0], [10.0, -10.0]])
    lo, hi = reduce_minmax(w, "tensor")
    assert lo.shape == (1,) and float(lo) == -10.0 and float(hi) == 10.0
    lo_c, hi_c = reduce_minmax(w, "channel")
    assert lo_c.tolist() == [-1.0, -10.0]


def test_mse_search_matches_brute_force():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4, 64, generator=gen)
    w[0, 0] = 8.0  # an outlier makes clipping worthwhile
    bits, p = 3, 2.4
    lo, hi = mse_search_minmax(w, bits, symmetric=False, granularity="channel")
    for i in range(4):
        row = w[i].double()
        best, best_range = None, None
        for k in range(80):
            c_lo, c_hi = min(float(row.min()), 0) * (1 - 0.01 * k), max(float(row.max()), 0) * (1 - 0.01 * k)
            s = max((c_hi - c_lo) / (2**bits - 1), 1e-8)
            z = min(max(round(-c_lo / s), 0), 2**bits - 1)
            q = torch.clamp(torch.round(row / s) + z, 0, 2**bits - 1)
            err = float(((row - s * (q - z)).abs() ** p).mean())
            if best is None or err < best - 1e-12:
                best, best_range = err, (c_lo, c_hi)
        assert math.isclose(float(lo[i]), best_range[0], rel_tol=1e-4, abs_tol=1e-6)
        assert math.isclose(float(hi[i]), best_range[1], rel_tol=1e-4, abs_tol=1e-6)
    assert float(hi[0]) < 8.0  # the outlier row was clipped


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fake_quantize_equals_integer_round_trip_bitwise(bits, per_channel, symmetric):
    """The in-place float fake-quantization gives exactly the stored-integer values."""
    from hf_ptq.quant.primitives import dequantize, fake_quantize, qparams_from_minmax, quantize, reduce_minmax

    torch.manual_seed(bits)
    x = torch.randn(6, 50) * 3
    lo, hi = reduce_minmax(x * 0.7, "channel" if per_channel else "tensor")  # clipped range: values saturate
    scale, zp = qparams_from_minmax(lo, hi, bits, symmetric)
    expected = dequantize(quantize(x, scale, zp, bits, symmetric), scale, zp)
    assert torch.equal(fake_quantize(x, scale, zp, bits, symmetric), expected)
