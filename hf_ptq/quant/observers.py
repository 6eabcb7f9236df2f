"""Activation observers: accumulate statistics over calibration batches, then choose a grid.

``minmax`` keeps running extremes; ``percentile`` and ``mse`` (L2.4 clipping search, as the
BRECQ/QDrop references) work on a bounded uniform random subsample of the values seen
(``max_samples``, 131 072 by default), so memory and search time stay flat however many batches
pass through. The references search on the full activation tensor; the L2.4 error is a mean over
values, which a uniform sample of this size estimates closely, and the search (80 candidate
ranges, one fake-quantization pass each) then costs ~0.3 s per layer instead of seconds.
"""

from __future__ import annotations

from typing import Literal

import torch

from .primitives import mse_search_minmax, percentile_minmax, qparams_from_minmax

__all__ = ["ActivationObserver"]

ObserverKind = Literal["minmax", "percentile", "mse"]


class ActivationObserver:
    """Per-tensor range statistics of one layer input."""

    def __init__(self, kind: ObserverKind = "mse", max_samples: int = 1 << 17, seed: int = 0) -> None:
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
        n = flat.numel()
        self.seen += n
        # a uniform random subsample of every value seen, at most max_samples: each batch
        # contributes in proportion to its size, old and new batches alike. Large batches are
        # sampled with replacement (O(max_samples), where a permutation of millions of values is not).
        new = flat if n <= self.max_samples else flat[torch.randint(n, (self.max_samples,), generator=self.gen)]
        old = self.samples[0] if self.samples else flat[:0]
        if old.numel() + new.numel() > self.max_samples:
            n_new = min(new.numel(), round(self.max_samples * n / self.seen))
            n_old = min(old.numel(), self.max_samples - n_new)
            old = old[torch.randperm(old.numel(), generator=self.gen)[:n_old]]
            new = new[torch.randperm(new.numel(), generator=self.gen)[:n_new]]
        self.samples = [torch.cat([old, new])]

    def qparams(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale [1], zero_point [1]) of the chosen grid."""
        if self.kind == "minmax" or not self.samples:
            lo, hi = self.lo.reshape(1), self.hi.reshape(1)
        elif self.kind == "percentile":
            lo, hi = percentile_minmax(self.samples[0])
        else:
            lo, hi = mse_search_minmax(self.samples[0], bits, symmetric, "tensor")
        return qparams_from_minmax(lo, hi, bits, symmetric)
