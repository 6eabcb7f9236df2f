"""COMQ: coordinate-wise minimization of each layer's output reconstruction error (arXiv 2403.07134).

For every Linear/Conv2d of a unit: accumulate the Gram matrix ``G = XᵀX`` of its inputs over the
calibration batches (conv inputs as im2col columns, one Gram per group), start from the min-max
grid shrunk by ``scale_factor`` λ, and run :func:`~hf_ptq.methods.comq_solver.comq_gram` —
greedy coordinate descent on the integer codes with an optional closed-form scale step.
Inputs come from the float model (``input_source="fp"``, the reference code) or, sequentially,
from the model quantized so far including earlier layers of the same block (``"quantized"``).
See docs/methods/comq.md for the derivation and the paper-vs-code choices.
"""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from torch import nn
from transformers.utils import logging

from ..quant.primitives import qrange
from ..quant.scheme import LayerScheme, QuantizedWeight, rtn_quantize_weight
from .base import PTQMethod, UnitResult, UnitWork, iter_layer_inputs, register_method, relative_name
from .comq_solver import ComqGrid, comq_gram, layer_error

if TYPE_CHECKING:
    from ..config import PTQConfig

__all__ = ["COMQ", "COMQKwargs", "input_columns", "GramAccumulator", "comq_quantize_layer"]

#: rows of X multiplied in float32 before adding to the float64 Gram (bounds the fp32 sums)
GRAM_PIECE_ROWS = 8192
#: largest im2col piece, in elements (bounds the unfold buffer of big feature maps)
GRAM_PIECE_ELEMENTS = 1 << 24


class COMQKwargs(BaseModel):
    """``PTQConfig.method_kwargs`` of ``method="comq"``.

    ``update_scale`` defaults to True (the paper treats the scales as variables; each scale step is
    an exact minimisation, so it never raises the error); ``False`` reproduces the reference
    code, which only optimises codes. ``scale_factor`` is the reference's ``--scalar`` λ: 1.0 by
    default; its README uses 0.65 for 2-bit ViT-S (with LN tuning).
    """

    model_config = ConfigDict(extra="forbid")

    greedy: StrictBool = True
    sweeps: StrictInt = Field(default=1, ge=1, le=100)
    update_scale: StrictBool = True
    scale_factor: float = Field(default=1.0, gt=0.0, le=1.0)
    input_source: Literal["fp", "quantized"] = "fp"
    chunk_size: StrictInt = Field(default=4096, ge=1)
    block_size: StrictInt | None = Field(default=None, ge=1)
    solver_dtype: Literal["float32", "float64"] = "float32"


# -- layer inputs as least-squares columns ---------------------------------------------------------


def _same_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) that ``padding="same"`` applies (extra pixel on the right/bottom)."""
    pads = []
    for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation)):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


def input_columns(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as least-squares rows ``[groups, N, n]`` (float32).

    Linear: every token is a row (``n = in_features``). Conv2d: im2col with the layer's kernel,
    stride, padding and dilation; columns ordered (in-channel, kh, kw) as in the flattened weight
    ``[out, in/groups·kh·kw]``, and each group gets its own ``n = in/groups·kh·kw`` columns.
    """
    x = x.float()
    if isinstance(layer, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    if not isinstance(layer, nn.Conv2d):
        raise ValueError(f"COMQ quantizes nn.Linear and nn.Conv2d layers, not {type(layer).__name__}")
    if layer.padding == "same":
        x = F.pad(x, _same_padding(layer))
    elif layer.padding != "valid" and any(layer.padding):
        ph, pw = layer.padding
        x = F.pad(x, (pw, pw, ph, ph))
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    # strided views [B, C, Ho, Wo, kh, kw], then one copy into the row-major [g, N, n] layout
    patches = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
    b, c, ho, wo = patches.shape[:4]
    g = layer.groups
    patches = patches.reshape(b, g, c // g, ho, wo, kh, kw).permute(1, 0, 3, 4, 2, 5, 6)
    return patches.reshape(g, b * ho * wo, (c // g) * kh * kw)


def _column_signature(layer: nn.Module) -> tuple:
    """Layers with equal signatures and the same input tensor share one Gram matrix."""
    if isinstance(layer, nn.Conv2d):
        return ("conv", layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups)
    return ("linear",)


class GramAccumulator:
    """``G = Σ_batches XᵀX`` per group, float64, from float32 products over bounded pieces."""

    def __init__(self, layer: nn.Module, device: torch.device) -> None:
        self.layer = layer
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.gram: torch.Tensor | None = None
        self.rows = 0

    def _pieces(self, x: torch.Tensor):
        if isinstance(self.layer, nn.Linear):
            flat = x.reshape(-1, x.shape[-1])
            yield from flat.split(GRAM_PIECE_ROWS)
            return
        x = x if x.dim() == 4 else x.unsqueeze(0)
        h_out, w_out = self._out_size(x)
        per_sample = max(1, h_out * w_out)
        n_full = self.layer.in_channels * self.layer.kernel_size[0] * self.layer.kernel_size[1]
        samples = max(1, min(GRAM_PIECE_ROWS // per_sample, GRAM_PIECE_ELEMENTS // (per_sample * n_full)))
        yield from x.split(samples)

    def _out_size(self, x: torch.Tensor) -> tuple[int, int]:
        conv = self.layer
        if conv.padding == "same":
            return x.shape[-2], x.shape[-1]
        pad = (0, 0) if conv.padding == "valid" else conv.padding
        return tuple(
            (x.shape[-2 + i] + 2 * pad[i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1) // conv.stride[i] + 1
            for i in range(2)
        )

    def fork(self) -> "GramAccumulator":
        """An independent accumulator holding the same sum so far."""
        other = GramAccumulator.__new__(GramAccumulator)
        other.layer, other.dtype, other.rows = self.layer, self.dtype, self.rows
        other.gram = None if self.gram is None else self.gram.clone()
        return other

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        for piece in self._pieces(x):
            cols = input_columns(self.layer, piece)
            part = torch.bmm(cols.transpose(1, 2), cols).to(self.dtype)
            self.gram = part if self.gram is None else self.gram.add_(part)
            self.rows += cols.shape[1]


# -- one layer ---------------------------------------------------------------------------------------


def comq_grid(weight: torch.Tensor, scheme: LayerScheme, observer: str, scale_factor: float):
    """COMQ's starting grid: the RTN grid of ``scheme`` with its step shrunk by λ, and the RTN weight.

    The zero point stays the RTN one (the reference's integer offset ``round(lo/δ)`` is computed
    before λ is applied), so the codes ``k ∈ [qmin − z, qmax − z]`` and the grid is ``λ·δ·k``.
    """
    rtn = rtn_quantize_weight(weight, scheme, observer)
    m = weight.shape[0]
    qmin, qmax = qrange(scheme.bits, scheme.symmetric)
    zp = rtn.zero_point.to(torch.float32).expand(m)
    grid = ComqGrid(
        step=(rtn.scale.float() * scale_factor).expand(m).contiguous(),
        kmin=(qmin - zp).contiguous(),
        kmax=(qmax - zp).contiguous(),
        per_tensor=scheme.granularity == "tensor",
    )
    return grid, rtn


def comq_quantize_layer(
    weight: torch.Tensor,
    gram: torch.Tensor,
    scheme: LayerScheme,
    kwargs: COMQKwargs,
    observer: str = "minmax",
) -> tuple[QuantizedWeight, dict[str, float]]:
    """COMQ codes and grid of one weight (``[out, in]`` or conv ``[out, in/g, kh, kw]``) from its Gram.

    Returns the :class:`QuantizedWeight` (unsigned codes in ``[qmin, qmax]``) and the relative
    layer errors ``‖X(W−Q)ᵀ‖²/‖XWᵀ‖²`` of COMQ and of RTN on the scheme's grid.
    """
    if scheme.terms != 1:
        raise ValueError(f"COMQ quantizes single-term weights; got LayerScheme.terms={scheme.terms} (allowed: 1)")
    w = weight.detach().float().reshape(weight.shape[0], -1)
    grid, rtn = comq_grid(weight, scheme, observer, kwargs.scale_factor)
    sol = comq_gram(
        w.to(gram.device), gram, grid,
        sweeps=kwargs.sweeps, greedy=kwargs.greedy, update_scale=kwargs.update_scale,
        chunk_size=kwargs.chunk_size, block_size=kwargs.block_size,
        dtype=torch.float64 if kwargs.solver_dtype == "float64" else torch.float32,
    )  # fmt: skip
    codes = (sol.codes + rtn.zero_point.to(sol.codes.device, torch.int64).reshape(-1, 1)).to(torch.int32)
    scale = sol.step[:1] if scheme.granularity == "tensor" else sol.step
    dev = weight.device
    qweight = QuantizedWeight(
        codes=codes.reshape(weight.shape).to(dev), scale=scale.float().to(dev), zero_point=rtn.zero_point, scheme=scheme
    )
    # diagnostics only: float32 products (a float64 GEMM would cost as much as a sweep on big layers)
    g32 = gram.float()
    ref = layer_error(w, torch.zeros_like(w), g32, torch.float32)
    stats = {
        "rel_error": layer_error(w, qweight.dequantize().reshape(w.shape), g32, torch.float32) / max(ref, 1e-30),
        "rtn_rel_error": layer_error(w, rtn.dequantize().reshape(w.shape), g32, torch.float32) / max(ref, 1e-30),
    }
    return qweight, stats


# -- the method ---------------------------------------------------------------------------------------


@register_method("comq")
class COMQ(PTQMethod):
    Kwargs = COMQKwargs
    default_weight_observer = "minmax"
    input_mode = "fp"
    unit_granularity = "block"

    def __init__(self, config: "PTQConfig") -> None:
        super().__init__(config)
        self.input_mode = self.kwargs.input_source  # the runner reads it per instance

    def quantize_unit(self, work: UnitWork) -> UnitResult:
        start = time.perf_counter()
        names = list(work.layers)
        weights: dict[str, QuantizedWeight] = {}
        errors: dict[str, dict[str, float]] = {}
        bar = logging.tqdm(total=len(names), desc=f"{work.desc} comq".strip(), unit="layer", leave=False)
        if self.kwargs.input_source == "fp":
            grams = self._grams(work, names)
            for name in names:
                weights[name], errors[name] = self._solve(work, name, grams.pop(name))
                bar.update(1)
        else:
            weights, errors = self._sequential(work, names, bar)
        bar.close()
        stats = {
            "comq_rel_error": sum(e["rel_error"] for e in errors.values()) / len(errors),
            "comq_rtn_rel_error": sum(e["rtn_rel_error"] for e in errors.values()) / len(errors),
            "comq_seconds": time.perf_counter() - start,
        }
        return UnitResult(weights=weights, stats=stats)

    def _solve(self, work: UnitWork, name: str, gram: torch.Tensor) -> tuple[QuantizedWeight, dict[str, float]]:
        return comq_quantize_layer(work.layers[name].weight, gram, work.schemes[name], self.kwargs, self.weight_observer)

    @staticmethod
    def _grams(work: UnitWork, names: list[str]) -> dict[str, torch.Tensor]:
        """One pass over the cached batches; layers fed the same tensor share one Gram.

        Sharing is decided per batch (same storage, shape, strides and column layout); a layer
        that stops sharing with its owner gets a copy of the owner's sum so far.
        """
        accs: dict[str, GramAccumulator] = {}
        owner: dict[str, str] = {}
        for b, seen in enumerate(iter_layer_inputs(work, names)):
            first = _sharing(work, names, seen)
            if b == 0:
                owner = dict(first)
            for name in names:
                if owner[name] != name and first[name] != owner[name]:
                    accs[name] = accs[owner[name]].fork()
                    owner[name] = name
            for name in names:
                if owner[name] == name:
                    accs.setdefault(name, GramAccumulator(work.layers[name], work.device)).add(seen[name])
        return {name: accs[owner[name]].gram for name in names}

    def _sequential(self, work: UnitWork, names: list[str], bar) -> tuple[dict, dict]:
        """Quantize layer by layer; later layers of the unit see the earlier ones quantized.

        Each pass takes the first remaining layer and the remaining layers fed the very same tensor
        (q/k/v): that tensor exists before the first layer runs, so it cannot depend on its codes.
        """
        weights: dict[str, QuantizedWeight] = {}
        errors: dict[str, dict[str, float]] = {}
        originals: dict[str, nn.Module] = {}
        remaining = list(names)
        try:
            while remaining:
                lead = remaining[0]
                acc = GramAccumulator(work.layers[lead], work.device)
                group = list(remaining)
                for seen in iter_layer_inputs(work, remaining):
                    first = _sharing(work, remaining, seen)
                    group = [n for n in group if first[n] == lead]
                    acc.add(seen[lead])
                for name in group:
                    weights[name], errors[name] = self._solve(work, name, acc.gram)
                    bar.update(1)
                    remaining.remove(name)
                    rel = relative_name(work, name)
                    if remaining and rel:
                        originals[rel] = work.module.get_submodule(rel)
                        work.module.set_submodule(rel, _dequantized_copy(originals[rel], weights[name]))
        finally:
            for rel, module in originals.items():
                work.module.set_submodule(rel, module)
        return weights, errors


def _sharing(work: UnitWork, names: list[str], seen: dict[str, torch.Tensor]) -> dict[str, str]:
    """For each layer, the first layer (in ``names`` order) fed the same tensor with the same columns."""
    firsts: dict[tuple, str] = {}
    out = {}
    for name in names:
        x = seen.get(name)
        if x is None:
            raise RuntimeError(f"COMQ: layer {name} was not called when running unit {work.name}")
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, _column_signature(work.layers[name]))
        out[name] = firsts.setdefault(key, name)
    return out


def _dequantized_copy(layer: nn.Module, qweight: QuantizedWeight) -> nn.Module:
    """A plain float twin of ``layer`` computing with the quantized weight (only while calibrating).

    Built fresh rather than copied, so no hooks (e.g. accelerate's) of the original come along.
    """
    w = layer.weight.detach()
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        twin = nn.Linear(layer.in_features, layer.out_features, bias=bias, device="meta")
    else:
        twin = nn.Conv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
            layer.dilation, layer.groups, bias, layer.padding_mode, device="meta",
        )  # fmt: skip
    twin.weight = nn.Parameter(qweight.dequantize().reshape(w.shape).to(w.device, w.dtype), requires_grad=False)
    if bias:
        twin.bias = nn.Parameter(layer.bias.detach(), requires_grad=False)
    return twin.eval()
