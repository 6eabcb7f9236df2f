"""FP=xINT at model level: basis models, their Abelian group operations, and the layer-wise sum.

A *basis model* ``M_k`` is an isomorphic copy of the network (same modules, same state-dict keys
and shapes) whose expanded Linear/Conv2d weights hold the ``k``-th series term ``s_k (B_k - z_k)``
(:func:`hf_ptq.quant.series.residual_expand`, the same expansion the ``fpxint`` method stores).
Tensors that are not expanded (biases, norms, skipped layers) are carried by ``M_1``; the other
basis models hold zeros there, so that ``M_1 ⊕ … ⊕ M_K`` is the model with every expanded weight
replaced by its ``K``-term series.

Operations between isomorphic models act tensor by tensor on every floating-point entry of the
state dict (parameters and float buffers such as BatchNorm statistics); non-float buffers are
structural and must be equal:

* :func:`abelian_add` (⊕), identity :func:`abelian_zero`, inverse :func:`abelian_neg`: an Abelian
  group, so terms can be accumulated in any order or in parallel.
* :func:`abelian_mul` (⊙, Hadamard product), identity :func:`abelian_one`, inverse
  :func:`abelian_reciprocal`: an Abelian group on models without zero entries. A basis model
  factors as ``M_k = S_k ⊙ I_k``: scales times integer codes (:meth:`ModelExpansion.factors`).

Nonlinearities do not distribute over sums (``relu(a + b) != relu(a) + relu(b)``), so the sum of
the outputs of independently run basis models is **not** the float model. :func:`layerwise_sum`
is the exact form: at every expanded layer the ``K`` basis layers run in one batched op on the
*same* input and their outputs are summed **before** the next nonlinearity — the basis models share
activations layer by layer. Its output equals the float model with weights ``W - R_K``, which tends
to the float model as ``K`` grows since ``R_K`` shrinks geometrically.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .quant.primitives import Granularity
from .quant.replace import default_modules_to_not_convert, find_quantizable_layers
from .quant.series import SeriesTerms, residual_expand

__all__ = [
    "ModelExpansion",
    "expand_model",
    "abelian_add",
    "abelian_neg",
    "abelian_zero",
    "abelian_sum",
    "abelian_mul",
    "abelian_one",
    "abelian_reciprocal",
    "layerwise_sum",
    "StackedLinear",
    "StackedConv2d",
]


# -- tensor-wise operations between isomorphic models ------------------------------------------


def _check_isomorphic(models: Sequence[nn.Module]) -> None:
    ref = models[0].state_dict()
    for i, other in enumerate(models[1:], start=1):
        sd = other.state_dict()
        if sd.keys() != ref.keys():
            diff = sorted(set(sd) ^ set(ref))[:3]
            raise ValueError(f"models 0 and {i} are not isomorphic: state-dict keys differ ({diff})")
        for key, t in ref.items():
            u = sd[key]
            if u.shape != t.shape or u.dtype != t.dtype:
                raise ValueError(
                    f"models 0 and {i} are not isomorphic: {key!r} is {tuple(t.shape)}/{t.dtype} vs "
                    f"{tuple(u.shape)}/{u.dtype}"
                )
            if not t.is_floating_point() and not torch.equal(t, u):
                raise ValueError(f"models 0 and {i} are not isomorphic: non-float buffer {key!r} differs")


@torch.no_grad()
def _map(fn: Callable[..., torch.Tensor], *models: nn.Module) -> nn.Module:
    """A copy of ``models[0]`` whose float tensors are ``fn(t_0, t_1, ...)`` of the operands' tensors."""
    _check_isomorphic(models)
    states = [m.state_dict() for m in models]
    # Compute from the operands first, then write: tied tensors (one storage, two keys) must not
    # see a half-updated value.
    new = {key: fn(*(sd[key] for sd in states)) for key, t in states[0].items() if t.is_floating_point()}
    out = copy.deepcopy(models[0])
    for key, t in out.state_dict().items():  # state-dict tensors share storage with ``out``
        if key in new:
            t.copy_(new[key])
    return out


def abelian_add(a: nn.Module, b: nn.Module) -> nn.Module:
    """``a ⊕ b``: tensor-wise sum of two isomorphic models."""
    return _map(torch.add, a, b)


def abelian_neg(a: nn.Module) -> nn.Module:
    """Inverse for ⊕: every float tensor negated."""
    return _map(torch.neg, a)


def abelian_zero(like: nn.Module) -> nn.Module:
    """Identity for ⊕: the model isomorphic to ``like`` with every float tensor zero."""
    return _map(torch.zeros_like, like)


def abelian_sum(models: Sequence[nn.Module]) -> nn.Module:
    """``M_1 ⊕ … ⊕ M_K`` (any order gives the same model up to float rounding)."""
    if not models:
        raise ValueError("abelian_sum needs at least one model")
    return _map(lambda t, *rest: torch.stack([t, *rest]).sum(0), *models)


def abelian_mul(a: nn.Module, b: nn.Module) -> nn.Module:
    """``a ⊙ b``: tensor-wise (Hadamard) product of two isomorphic models."""
    return _map(torch.mul, a, b)


def abelian_one(like: nn.Module) -> nn.Module:
    """Identity for ⊙: every float tensor one."""
    return _map(torch.ones_like, like)


def abelian_reciprocal(a: nn.Module) -> nn.Module:
    """Inverse for ⊙ (defined on models without zero entries)."""
    for key, t in a.state_dict().items():
        if t.is_floating_point() and bool((t == 0).any()):
            raise ValueError(f"abelian_reciprocal: {key!r} has zero entries, which have no inverse under ⊙")
    return _map(torch.reciprocal, a)


# -- the expansion ------------------------------------------------------------------------------


@dataclass
class ModelExpansion:
    """The ``K``-term series of a model's expanded layers (weights of Linear/Conv2d).

    Attributes:
        model: the float model (not modified, not copied).
        series: qualified layer name → its weight's :class:`SeriesTerms`.
    """

    model: nn.Module
    series: dict[str, SeriesTerms]

    @property
    def num_terms(self) -> int:
        return next(iter(self.series.values())).num_terms

    @property
    def layers(self) -> list[str]:
        return list(self.series)

    def basis(self, k: int) -> nn.Module:
        """Basis model ``M_{k+1}`` (``k`` counts from 0): expanded weights = term ``k``."""
        return self._fill(k, lambda s, shape: s.values()[k].reshape(shape))

    def bases(self, terms: int | None = None) -> list[nn.Module]:
        """The first ``terms`` (default all) basis models."""
        return [self.basis(k) for k in range(terms if terms is not None else self.num_terms)]

    def factors(self, k: int) -> tuple[nn.Module, nn.Module]:
        """``(S, I)`` with ``basis(k) == abelian_mul(S, I)``: scales broadcast to each weight, integer codes.

        ``I`` holds ``B_k - z_k`` (integer-valued floats) at expanded weights and ``basis(k)``'s
        values elsewhere; ``S`` holds the per-channel (or per-tensor) scales and ones elsewhere.
        """
        ints = self._fill(k, lambda s, shape: s.centered()[k].reshape(shape))
        scales = self._fill(k, lambda s, shape: s.scale[k].reshape(-1, *[1] * (len(shape) - 1)).expand(shape))
        with torch.no_grad():
            expanded = {f"{name}.weight" for name in self.series}
            for key, t in scales.state_dict().items():
                if t.is_floating_point() and key not in expanded:
                    t.fill_(1.0)
        return scales, ints

    def _fill(self, k: int, term: Callable[[SeriesTerms, torch.Size], torch.Tensor]) -> nn.Module:
        out = copy.deepcopy(self.model) if k == 0 else abelian_zero(self.model)
        with torch.no_grad():
            for name, series in self.series.items():
                weight = out.get_submodule(name).weight
                weight.copy_(term(series, weight.shape).to(weight.dtype))
        return out


@torch.no_grad()
def expand_model(
    model: nn.Module,
    bits: int,
    terms: int,
    *,
    symmetric: bool = False,
    granularity: Granularity = "channel",
    modules_to_not_convert: list[str] | None = None,
) -> ModelExpansion:
    """Expand every quantizable Linear/Conv2d weight of ``model`` into ``terms`` ``bits``-bit terms.

    ``modules_to_not_convert=None`` skips the same layers as quantization does (classifier heads,
    ViT/DeiT patch embedding); ``[]`` expands every Linear/Conv2d.
    """
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits={bits!r} is not supported; allowed values are 2, 3, 4, 8.")
    if not isinstance(terms, int) or terms < 1:
        raise ValueError(f"terms={terms!r} is not supported; allowed values are integers >= 1.")
    skip = default_modules_to_not_convert(model) if modules_to_not_convert is None else modules_to_not_convert
    layers = find_quantizable_layers(model, skip)
    if not layers:
        raise ValueError(f"no Linear/Conv2d to expand in {type(model).__name__} with modules_to_not_convert={skip}")
    series = {name: residual_expand(m.weight, bits, terms, symmetric, granularity) for name, m in layers.items()}
    return ModelExpansion(model=model, series=series)


# -- exact evaluation: sum at every linear layer, before the nonlinearity -------------------------


class StackedLinear(nn.Module):
    """``K`` isomorphic Linear layers run on the same input in one batched matmul, outputs summed."""

    def __init__(self, weights: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weights.shape[1:]
        self.weight = nn.Parameter(weights, requires_grad=False)  # [K, out, in]
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, out, n = self.weight.shape
        # One GEMM against the K weights stacked along the output dim gives all K basis outputs.
        y = F.linear(x, self.weight.reshape(k * out, n)).unflatten(-1, (k, out)).sum(-2)
        return y + self.bias if self.bias is not None else y


class StackedConv2d(nn.Module):
    """``K`` isomorphic Conv2d layers run on the same input in one conv (stacked output channels)."""

    def __init__(self, conv: nn.Conv2d, weights: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        # Same attribute names as nn.Conv2d: some parents read them (MobileNetV2's TF padding).
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.padding_mode = conv.padding_mode
        self.weight = nn.Parameter(weights, requires_grad=False)  # [K, out, in/groups, kh, kw]
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, out = self.weight.shape[:2]
        g = self.groups
        # Output channels ordered [group, term, channel-in-group] so that each group of the
        # convolution still sees only its own input channels.
        kernel = self.weight.shape[2:]
        w = self.weight.reshape(k, g, out // g, *kernel).transpose(0, 1).reshape(k * out, *kernel)
        y = F.conv2d(x, w, None, self.stride, self.padding, self.dilation, g)
        n, h, wd = y.shape[0], y.shape[-2], y.shape[-1]
        y = y.reshape(n, g, k, out // g, h, wd).sum(2).reshape(n, out, h, wd)
        return y + self.bias.reshape(1, -1, 1, 1) if self.bias is not None else y


@torch.no_grad()
def layerwise_sum(models: Sequence[nn.Module], layers: Sequence[str]) -> nn.Module:
    """The basis models evaluated in parallel, summed at each of ``layers`` before the nonlinearity.

    Every listed Linear/Conv2d becomes a :class:`StackedLinear`/:class:`StackedConv2d` holding the
    ``K`` basis weights (one batched op computes all ``K`` outputs, then they are summed); every
    other tensor is the ⊕-sum of the models. Equal, up to float rounding, to
    ``abelian_sum(models)`` — the two differ only in where the sum is taken.
    """
    out = abelian_sum(models)
    for name in layers:
        layer = out.get_submodule(name)
        weights = torch.stack([m.get_submodule(name).weight.detach() for m in models])
        if type(layer) is nn.Linear:
            out.set_submodule(name, StackedLinear(weights, layer.bias))
        elif type(layer) is nn.Conv2d and layer.padding_mode == "zeros":
            out.set_submodule(name, StackedConv2d(layer, weights, layer.bias))
        else:
            raise ValueError(
                f"layerwise_sum: {name!r} is {type(layer).__name__}; allowed: nn.Linear, nn.Conv2d (zeros padding)"
            )
    return out
