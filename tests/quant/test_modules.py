"""QuantLinear / QuantConv2d: forward equals the float op on independently dequantized weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_ptq.quant.modules import QuantConv2d, QuantLinear
from hf_ptq.quant.replace import make_quant_module
from hf_ptq.quant.scheme import LayerScheme, rtn_quantize_weight

CONV_VARIANTS = [
    dict(in_channels=4, out_channels=6, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 5), padding=(1, 2), dilation=(2, 1)),
    dict(in_channels=4, out_channels=8, kernel_size=3, groups=2, padding="same"),
    dict(in_channels=6, out_channels=6, kernel_size=7, groups=6, padding=3),  # depthwise
    dict(in_channels=3, out_channels=5, kernel_size=1, bias=False),
]


def _independent_dequant(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel asymmetric min-max fake quantization written from the formula."""
    flat = w.reshape(w.shape[0], -1).double()
    lo = flat.min(1).values.clamp(max=0)
    hi = flat.max(1).values.clamp(min=0)
    s = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8)
    z = torch.round(-lo / s).clamp(0, 2**bits - 1)
    q = torch.clamp(torch.round(flat / s[:, None]) + z[:, None], 0, 2**bits - 1)
    return ((q - z[:, None]) * s[:, None]).reshape(w.shape).float()


@pytest.mark.parametrize("variant", CONV_VARIANTS)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quant_conv2d_variants(variant, bits):
    torch.manual_seed(0)
    conv = nn.Conv2d(**variant)
    q = make_quant_module(conv, rtn_quantize_weight(conv.weight, LayerScheme(bits=bits)))
    assert isinstance(q, QuantConv2d)
    x = torch.randn(2, variant["in_channels"], 11, 13)
    expected = F.conv2d(x, _independent_dequant(conv.weight, bits), conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)
    if bits == 8:  # and close to the float conv
        torch.testing.assert_close(q(x), conv(x), rtol=0, atol=0.05 * float(conv(x).detach().abs().max()))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_quant_linear(bias, granularity):
    torch.manual_seed(1)
    lin = nn.Linear(37, 11, bias=bias)
    scheme = LayerScheme(bits=4, granularity=granularity)
    q = make_quant_module(lin, rtn_quantize_weight(lin.weight, scheme))
    assert isinstance(q, QuantLinear)
    assert q.weight_scale.shape == ((11,) if granularity == "channel" else (1,))
    w = lin.weight.detach().double()
    lo, hi = (w.min().clamp(max=0), w.max().clamp(min=0)) if granularity == "tensor" else (None, None)
    if granularity == "tensor":
        s = (hi - lo) / 15
        z = torch.round(-lo / s)
        deq = ((torch.clamp(torch.round(w / s) + z, 0, 15) - z) * s).float()
    else:
        deq = _independent_dequant(lin.weight, 4)
    x = torch.randn(5, 37)
    torch.testing.assert_close(q(x), F.linear(x, deq, lin.bias), rtol=1e-5, atol=1e-5)


def test_codes_round_trip_through_module():
    torch.manual_seed(2)
    lin = nn.Linear(70, 9)
    qw = rtn_quantize_weight(lin.weight, LayerScheme(bits=3))
    q = make_quant_module(lin, qw)
    back = q.quantized_weight()
    assert torch.equal(back.codes, qw.codes)
    assert torch.equal(back.scale, qw.scale)
    assert q.weight.numel() == 0 and q.weight.dtype == torch.float32  # the guard tensor


def test_input_quantizer_is_applied():
    lin = nn.Linear(4, 2)
    q = make_quant_module(
        lin,
        rtn_quantize_weight(lin.weight, LayerScheme(bits=8, act_bits=4)),
        input_qparams=(torch.tensor([0.5]), torch.tensor([8], dtype=torch.int32)),
    )
    x = torch.tensor([[0.1, 0.3, 2.0, -9.0]])
    xq = (torch.clamp(torch.round(x / 0.5) + 8, 0, 15) - 8) * 0.5  # [0, 0.5, 2.0, -4.0]
    torch.testing.assert_close(q(x), F.linear(xq, q.dequantized_weight(), lin.bias))


def test_reflect_padding_is_refused_with_fix():
    conv = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="modules_to_not_convert"):
        make_quant_module(conv, rtn_quantize_weight(conv.weight, LayerScheme(bits=4)))


def test_dequantized_weight_cache_is_bitwise_and_scoped():
    """The calibration-time cache gives the same outputs, follows new weights, and is dropped on exit."""
    from hf_ptq.quant.modules import dequantized_weights_cached

    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    scheme = LayerScheme(bits=4)
    qconv = make_quant_module(block[0], rtn_quantize_weight(block[0].weight, scheme))
    qlin = make_quant_module(block[2], rtn_quantize_weight(block[2].weight, scheme))
    qblock = nn.Sequential(qconv, nn.Flatten(), qlin)
    x = torch.randn(2, 3, 8, 8)
    expected = F.linear(F.conv2d(x, _independent_dequant(block[0].weight, 4), block[0].bias).flatten(1),
                        _independent_dequant(block[2].weight, 4), block[2].bias)
    plain = qblock(x)
    with dequantized_weights_cached(qblock):
        assert torch.equal(qblock(x), plain)
        assert qlin._weight_cache is not None
        torch.testing.assert_close(qblock(x), expected, rtol=1e-5, atol=1e-5)
        other = torch.randn_like(block[2].weight)
        qlin.set_quantized_weight(rtn_quantize_weight(other, scheme))  # new codes: the cache must not be reused
        torch.testing.assert_close(qlin.dequantized_weight(), _independent_dequant(other, 4), rtol=1e-6, atol=1e-6)
    assert qconv._weight_cache is None and qlin._weight_cache is None
