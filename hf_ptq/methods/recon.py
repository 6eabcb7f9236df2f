"""Plumbing of reconstruction: random mini-batches of cached unit data, the unit forward, the loss.

The engine caches a unit's inputs and float targets on CPU as one ``(args, kwargs)`` per
calibration batch. Reconstruction samples ``batch_size`` *samples* at random from all of them every
iteration (as the references do from their cached tensors), gathers just those rows and moves them
to the compute device — never the whole cache, which is what makes the references run out of
accelerator memory on large calibration sets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .base import UnitWork, move_to, relative_name
from .fisher import GradientCache, first_tensor

__all__ = ["UnitData", "MiniBatch", "recon_loss", "unit_forward", "weight_key", "input_hooks"]


def recon_loss(pred: torch.Tensor, target: torch.Tensor, p: float = 2.0, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_{other dims} Σ_channels (|Δz| · g)^p`` — the references' ``lp_loss(..., reduction='none')``.

    The channel axis is dim 1 of an NCHW feature map and the last dim of token/feature tensors
    (``[B, T, D]``, ``[B, D]``), so the error is summed over features and averaged over samples and
    positions; that is the scale at which the rounding-loss weight λ = 0.01 was tuned.
    ``weight`` holds the Fisher factors ``g`` (None: plain L_p); only ``|g|`` matters.
    """
    diff = (pred - target).abs()
    if weight is not None:
        diff = diff * weight.abs()
    err = diff.pow(p)
    if err.dim() < 2:
        return err.mean()
    return err.sum(1 if err.dim() == 4 else -1).mean()


def weight_key(work: UnitWork, layer_name: str) -> str:
    """Name of a layer's weight relative to the unit (for ``functional_call``)."""
    rel = relative_name(work, layer_name)
    return f"{rel}.weight" if rel else "weight"


def unit_forward(work: UnitWork, weights: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> torch.Tensor:
    """The unit's hidden-state output with some weights replaced (gradients flow into them)."""
    return first_tensor(functional_call(work.module, weights, tuple(args), kwargs, strict=False))


@contextlib.contextmanager
def input_hooks(work: UnitWork, quantizers: dict[str, nn.Module]) -> Iterator[None]:
    """Apply ``quantizers[name]`` to the input of each named layer while the context is open."""
    handles = []
    for name, q in quantizers.items():
        layer = work.layers[name]
        handles.append(layer.register_forward_pre_hook(lambda mod, args, q=q: (q(args[0]),) + tuple(args[1:])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class MiniBatch:
    """One sampled mini-batch on the compute device."""

    args: tuple
    kwargs: dict
    target: torch.Tensor
    fp_args: tuple | None = None
    weight: torch.Tensor | None = None


def _batch_len(args: tuple) -> int:
    return int(first_tensor(args).shape[0])


def _take(objs: list, groups: list[tuple[int, torch.Tensor]], sizes: list[int]) -> Any:
    """Gather ``rows`` of batch ``b`` for each group from a list of same-structured per-batch objects.

    Tensors whose first dim is the batch size are gathered; anything else (static arguments,
    shared tensors) is taken from the first batch involved.
    """
    ref = objs[groups[0][0]]
    if isinstance(ref, torch.Tensor):
        if ref.dim() > 0 and all(objs[b].dim() > 0 and objs[b].shape[0] == sizes[b] for b, _ in groups):
            return torch.cat([objs[b][rows] for b, rows in groups])
        return ref
    if isinstance(ref, (tuple, list)):
        return type(ref)(_take([o[i] for o in objs], groups, sizes) for i in range(len(ref)))
    if isinstance(ref, dict):
        return {k: _take([o[k] for o in objs], groups, sizes) for k in ref}
    return ref


class UnitData:
    """A unit's cached calibration data (CPU), sampled by random mini-batches of samples.

    ``weights`` (Fisher factors) are divided by ``weight_norm`` when read.
    """

    def __init__(
        self,
        work: UnitWork,
        weights: GradientCache | None = None,
        weight_norm: float = 1.0,
        seed: int = 0,
    ) -> None:
        if work.inputs is None or work.targets is None:
            raise ValueError("reconstruction needs the unit's cached inputs and float targets")
        self.work = work
        self.sizes = [_batch_len(args) for args, _ in work.inputs]
        self.total = sum(self.sizes)
        self.offsets = torch.tensor([0] + self.sizes).cumsum(0)
        self.fisher = weights
        self.weight_norm = weight_norm
        self.gen = torch.Generator().manual_seed(seed)

    def sample(self, batch_size: int) -> torch.Tensor:
        """Flat sample indices: ``batch_size`` distinct samples (all of them if fewer)."""
        return torch.randperm(self.total, generator=self.gen)[: min(batch_size, self.total)].sort().values

    def _groups(self, index: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        b = torch.searchsorted(self.offsets, index, right=True) - 1
        return [(int(k), index[b == k] - self.offsets[k]) for k in torch.unique(b)]

    def gather(self, index: torch.Tensor, device: torch.device) -> MiniBatch:
        groups = self._groups(index)
        work = self.work
        args = _take([a for a, _ in work.inputs], groups, self.sizes)
        kwargs = _take([k for _, k in work.inputs], groups, self.sizes)
        target = _take(work.targets, groups, self.sizes)
        fp_args = _take([a for a, _ in work.fp_inputs], groups, self.sizes) if work.fp_inputs is not None else None
        weight = None
        if self.fisher is not None:
            weight = torch.cat([self.fisher.rows(b, rows) for b, rows in groups]) / self.weight_norm
        return MiniBatch(
            args=move_to(args, device),
            kwargs=move_to(kwargs, device),
            target=move_to(target, device),
            fp_args=move_to(fp_args, device) if fp_args is not None else None,
            weight=weight.to(device) if weight is not None else None,
        )

    def batches(self, device: torch.device) -> Iterator[MiniBatch]:
        """Every cached calibration batch in order (for full-set evaluations)."""
        for b, size in enumerate(self.sizes):
            yield self.gather(torch.arange(size) + self.offsets[b], device)
