"""Activation observers: accumulate statistics over calibration batches, then choose a grid.

``minmax`` keeps running extremes; ``percentile`` and ``mse`` (L2.4 clipping search, as the
BRECQ/QDrop references) work on a bounded uniform subsample of the values seen, so memory stays
flat however many batches pass through.
"""

from __future__ import annotations

from typing import Literal

import torch

from .primitives import mse_search_minmax, percentile_minmax, qparams_from_minmax

__all__ = ["ActivationObserver"]

ObserverKind = Literal["minmax", "percentile", "mse"]


class ActivationObserver:
    """Per-tensor range statistics of one layer input."""

    def __init__(self, kind: ObserverKind = "mse", max_samples: int = 1 << 20, seed: int = 0) -> None:
        if kind not in ("minmax", "percentile", "mse"):
            raise ValueError(f"act_observer={kind!r} is not supported; allowed values are 'minmax', 'percentile', 'mse'.")
        self.kind = kind
        self.max_samples = max_samples
        self.lo = torch.tensor(float("inf"))
        self.hi = torch.tensor(float("-inf"))
        self.samples: list[torch.Tensor] = []
        self.seen = 0
        self.gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().float().flatten().cpu()
        self.lo = torch.minimum(self.lo, flat.min())
        self.hi = torch.maximum(self.hi, flat.max())
        if self.kind == "minmax":
            return
        self.seen += flat.numel()
        # keep each batch's share of a uniform subsample bounded by max_samples overall
        keep = min(flat.numel(), self.max_samples)
        idx = torch.randint(0, flat.numel(), (keep,), generator=self.gen)
        self.samples.append(flat[idx])
        pooled = torch.cat(self.samples)
        if pooled.numel() > self.max_samples:
            pooled = pooled[torch.randperm(pooled.numel(), generator=self.gen)[: self.max_samples]]
        self.samples = [pooled]

    def qparams(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale [1], zero_point [1]) of the chosen grid."""
        if self.kind == "minmax" or not self.samples:
            lo, hi = self.lo.reshape(1), self.hi.reshape(1)
        elif self.kind == "percentile":
            lo, hi = percentile_minmax(self.samples[0])
        else:
            lo, hi = mse_search_minmax(self.samples[0], bits, symmetric, "tensor")
        return qparams_from_minmax(lo, hi, bits, symmetric)
