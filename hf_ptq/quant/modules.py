"""Storage modules: ``QuantLinear`` and ``QuantConv2d`` hold packed integer weights.

State-dict names follow compressed-tensors: ``weight_packed`` (int32 words, int8 at 8 bits),
``weight_scale``, ``weight_zero_point``, ``weight_shape``; with activation quantization also
``input_scale`` and ``input_zero_point``. Conv weights are flattened to ``[out, in/groups*kh*kw]``
for packing; ``weight_shape`` keeps the real shape.

Two extra tensors exist on purpose:

* ``weight`` is an **empty** float tensor. Loading an hf_ptq checkpoint without ``import hf_ptq``
  makes transformers compare it with the float layer's ``[out, in]`` weight and raise a size
  mismatch, instead of silently running randomly initialised weights (transformers only warns
  about missing keys). It also tells code that reads ``module.weight.dtype`` (ViT casts its
  ``pixel_values`` with it) the compute dtype.
* ``bias`` stays a float parameter.

The forward pass dequantizes (``scale * (code - zero_point)``, summed over FP=xINT terms) and calls
``F.linear`` / ``F.conv2d``: this is simulated ("fake") quantization with real integer storage; no
integer kernels are used. Layers with ``scheme.act_dynamic`` (FP=xINT activation expansion) run
:func:`hf_ptq.quant.expanded.expanded_forward` instead: the sum over kept (weight term, activation
term) pairs, all terms in one batched op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .expanded import expanded_forward
from .primitives import dequantize, fake_quantize, pack_codes, packed_words, storage_dtype, unpack_codes
from .scheme import LayerScheme, QuantizedWeight

__all__ = ["QuantModuleMixin", "QuantLinear", "QuantConv2d", "QUANT_MODULE_FOR_FLOAT", "dequantized_weights_cached"]


class QuantModuleMixin:
    """Buffers, packing and dequantization shared by the quantized Linear and Conv2d."""

    scheme: LayerScheme
    #: False while calibration observes the float inputs of this layer (set by the runner).
    act_quant_enabled: bool = True
    #: inside :func:`dequantized_weights_cached`: keep the float weight after its first use.
    _weight_caching: bool = False
    _weight_cache: torch.Tensor | None = None
    weight_packed: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor
    weight_shape: torch.Tensor

    def _init_quant_buffers(self, weight_shape: tuple[int, ...], scheme: LayerScheme, device=None) -> None:
        self.scheme = scheme
        out_channels, row = weight_shape[0], _row(weight_shape)
        channels = out_channels if scheme.granularity == "channel" else 1
        lead = (scheme.terms,) if scheme.terms > 1 else ()
        words = packed_words(row, scheme.bits)
        self.register_buffer("weight", torch.empty(0, device=device))
        self.register_buffer(
            "weight_packed", torch.zeros(*lead, out_channels, words, dtype=storage_dtype(scheme.bits), device=device)
        )
        self.register_buffer("weight_scale", torch.ones(*lead, channels, device=device))
        self.register_buffer("weight_zero_point", torch.zeros(*lead, channels, dtype=torch.int32, device=device))
        self.register_buffer("weight_shape", torch.tensor(weight_shape, dtype=torch.int64, device=device))
        if scheme.act_bits is not None and not scheme.act_dynamic:  # dynamic: scales come from the live input
            self.register_buffer("input_scale", torch.ones(1, device=device))
            self.register_buffer("input_zero_point", torch.zeros(1, dtype=torch.int32, device=device))

    # -- writing ------------------------------------------------------------------------------
    @torch.no_grad()
    def set_quantized_weight(self, qweight: QuantizedWeight) -> None:
        """Pack ``qweight`` into this module's buffers (shapes must match the scheme)."""
        if qweight.scheme != self.scheme:
            raise ValueError(f"scheme mismatch: module has {self.scheme}, weight has {qweight.scheme}")
        self._weight_cache = None
        codes = qweight.codes
        lead = (self.scheme.terms,) if self.scheme.terms > 1 else ()
        rows = codes.reshape(*lead, codes.shape[len(lead)], -1)
        self.weight_packed.copy_(pack_codes(rows, self.scheme.bits))
        self.weight_scale.copy_(qweight.scale.reshape(self.weight_scale.shape))
        self.weight_zero_point.copy_(qweight.zero_point.reshape(self.weight_zero_point.shape))

    @torch.no_grad()
    def set_input_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Static per-tensor input quantizer parameters (only when ``act_bits`` is set)."""
        if self.scheme.act_bits is None:
            raise ValueError("this layer has no input quantizer (act_bits is None)")
        if self.scheme.act_dynamic:
            raise ValueError("this layer expands its input at run time (act_dynamic=True); it has no static quantizer")
        self.input_scale.copy_(scale.reshape(1))
        self.input_zero_point.copy_(zero_point.reshape(1))

    # -- reading ------------------------------------------------------------------------------
    @property
    def weight_shape_tuple(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.weight_shape.tolist())

    def quantized_weight(self) -> QuantizedWeight:
        """Unpacked integer codes and grid (the inverse of :meth:`set_quantized_weight`)."""
        shape = self.weight_shape_tuple
        codes = unpack_codes(self.weight_packed, self.scheme.bits, _row(shape))
        lead = (self.scheme.terms,) if self.scheme.terms > 1 else ()
        return QuantizedWeight(
            codes=codes.reshape(*lead, *shape),
            scale=self.weight_scale.clone(),
            zero_point=self.weight_zero_point.clone(),
            scheme=self.scheme,
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Float weight used by the forward pass (sum of the terms for FP=xINT layers)."""
        dtype = dtype or self.weight.dtype
        cached = self._weight_cache
        if cached is not None and cached.dtype == dtype and cached.device == self.weight_packed.device:
            return cached
        shape = self.weight_shape_tuple
        codes = unpack_codes(self.weight_packed, self.scheme.bits, _row(shape))
        if self.scheme.terms == 1:
            w = dequantize(codes, self.weight_scale, self.weight_zero_point)
        else:  # in place: one float buffer for all terms (same values, ~40 % faster at K=4)
            w = codes.float().sub_(self.weight_zero_point.unsqueeze(-1)).mul_(self.weight_scale.unsqueeze(-1)).sum(0)
        w = w.reshape(shape).to(dtype)
        if self._weight_caching:
            self._weight_cache = w
        return w

    def dequantized_terms(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Float value of every weight term, ``[terms, *weight_shape]`` (a leading 1 when terms == 1)."""
        shape = self.weight_shape_tuple
        terms = self.scheme.terms
        codes = unpack_codes(self.weight_packed, self.scheme.bits, _row(shape)).reshape(terms, shape[0], -1)
        w = codes.float().sub_(self.weight_zero_point.reshape(terms, -1, 1)).mul_(self.weight_scale.reshape(terms, -1, 1))
        return w.reshape(terms, *shape).to(dtype or self.weight.dtype)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Static fake-quantization of the layer input (identity when ``act_bits`` is None)."""
        if self.scheme.act_bits is None or not self.act_quant_enabled:
            return x
        return fake_quantize(
            x, self.input_scale, self.input_zero_point, self.scheme.act_bits, self.scheme.act_symmetric
        ).to(x.dtype)

    def extra_repr(self) -> str:  # shown by print(model)
        s = self.scheme
        act = f", act_bits={s.act_bits}" if s.act_bits is not None else ""
        terms = f", terms={s.terms}" if s.terms > 1 else ""
        if s.act_dynamic:
            act += f", act_terms={s.act_terms} (dynamic), max_order={s.max_order}"
        return f"{self._float_repr()}, bits={s.bits}, granularity={s.granularity}{terms}{act}"


@contextlib.contextmanager
def dequantized_weights_cached(module: nn.Module) -> Iterator[None]:
    """Dequantize every quantized layer under ``module`` once and reuse it until the block exits.

    The forward pass normally unpacks and dequantizes on each call, which keeps memory at the
    packed size; calibration runs the same unit over many batches, where one float copy of one
    unit's weights is cheap and the repeated unpacking is not. Outputs are bitwise the same.
    New codes written with ``set_quantized_weight`` drop the cached copy.
    """
    layers = [m for m in module.modules() if isinstance(m, QuantModuleMixin)]
    try:
        for m in layers:  # filled on first use: offloaded layers only have real buffers inside forward
            m._weight_cache, m._weight_caching = None, True
        yield
    finally:
        for m in layers:
            m._weight_cache, m._weight_caching = None, False


def _row(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return n


class QuantLinear(QuantModuleMixin, nn.Module):
    """``nn.Linear`` with packed integer weights (see module docstring for the stored tensors)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, scheme: LayerScheme, device=None, dtype=None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_quant_buffers((out_features, in_features), scheme, device)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear, scheme: LayerScheme) -> "QuantLinear":
        """Empty quantized twin of ``linear`` (same device; the bias is copied)."""
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme, device=linear.weight.device)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme.act_dynamic and self.act_quant_enabled:
            return expanded_forward(self, x)
        x = self.quantize_input(x)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def _float_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuantConv2d(QuantModuleMixin, nn.Module):
    """``nn.Conv2d`` (any stride/padding/dilation/groups, zeros padding) with packed integer weights."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int] | str,
        dilation: tuple[int, int],
        groups: int,
        bias: bool,
        scheme: LayerScheme,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = tuple(kernel_size), tuple(stride), padding
        self.dilation, self.groups = tuple(dilation), groups
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_quant_buffers(shape, scheme, device)
        self.bias = nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_float(cls, conv: nn.Conv2d, scheme: LayerScheme) -> "QuantConv2d":
        """Empty quantized twin of ``conv`` (same device; the bias is copied)."""
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"Conv2d with padding_mode={conv.padding_mode!r} is not supported; only 'zeros'. "
                "Add the module to modules_to_not_convert."
            )
        q = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            scheme,
            device=conv.weight.device,
        )
        if conv.bias is not None:
            q.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme.act_dynamic and self.act_quant_enabled:
            return expanded_forward(self, x)
        x = self.quantize_input(x)
        return F.conv2d(
            x, self.dequantized_weight(x.dtype), self.bias, self.stride, self.padding, self.dilation, self.groups
        )

    def _float_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}"
        )


#: float class → quantized class; the single place that says which layers hf_ptq can quantize.
QUANT_MODULE_FOR_FLOAT: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}
