"""Gradients of a loss with respect to unit outputs: BRECQ's diagonal-Fisher weights.

BRECQ weights the block-output error ``Δz`` by the diagonal Fisher ``(∂L/∂z)²`` of the block
output. Two versions exist (algorithms.md §3.5):

* the **paper**: gradients of the task loss (cross-entropy) on the *float* model. Calibration data
  has no labels, so hf_ptq uses the float model's own predictions (``argmax`` of its logits) as
  pseudo-labels — the "empirical Fisher with model targets". One forward/backward pass per
  calibration batch covers every unit (:func:`task_loss_gradients`, run in ``prepare``).
* the **reference code** (``GetLayerGrad``): gradients of ``KL(softmax(fp logits) ‖ softmax(q logits))``
  on the model quantized *up to and including* the current block, damped to ``|g| + 1``
  (:func:`kl_gradients`, run per unit because it depends on the units quantized before).

Gradients are stored in float16 with one float32 factor per batch (so tiny gradients do not
underflow). The task-loss version covers every unit at once (``N × Σ_units |z_u| × 2`` bytes), so
it is written to one file per unit in a temporary folder and read back by memory-mapped rows:
resident memory stays at one batch's gradients instead of growing with depth. The KL version
covers one unit at a time and stays in memory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GradientCache", "first_tensor", "model_logits", "task_loss_gradients", "kl_gradients", "swapped_weights", "frozen_parameters"]


def first_tensor(out: Any) -> torch.Tensor:
    """The hidden state of a unit output (a tensor, the first element of a tuple, or of a ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find the hidden state in a unit output of type {type(out).__name__}")


def _replace_first(out: Any, new: torch.Tensor) -> Any:
    if isinstance(out, torch.Tensor):
        return new
    if isinstance(out, tuple):
        return (new,) + out[1:]
    if isinstance(out, list):
        return [new] + out[1:]
    raise TypeError(f"cannot replace the hidden state in a unit output of type {type(out).__name__}")


def model_logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Logits of an image classifier called as the calibration runner calls it."""
    out = model(pixel_values=pixel_values)
    return out.logits if hasattr(out, "logits") else first_tensor(out)


@dataclass
class GradientCache:
    """Per-batch gradients of one unit's output: float16 payload × float32 factor (+ offset).

    ``offset`` is added when a batch is read back (the reference's ``|g| + 1`` damping), so the
    float16 payload keeps the precision of ``g`` itself instead of rounding ``1 + g`` to 1.
    With ``path`` set the payload is appended to that file instead of being kept in memory, and
    reads memory-map just the rows asked for (:meth:`release` deletes the file).
    """

    payload: list[torch.Tensor] = field(default_factory=list)
    factors: list[float] = field(default_factory=list)
    offset: float = 0.0
    path: Path | None = None
    #: on disk: (byte offset, shape) of every batch in ``path``
    extents: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)

    def append(self, grad: torch.Tensor) -> None:
        g = grad.detach().float()
        factor = float(g.abs().amax()) or 1.0
        half = (g / factor).to(torch.float16).cpu()
        self.factors.append(factor)
        if self.path is None:
            self.payload.append(half)
            return
        start = self.path.stat().st_size if self.path.exists() else 0
        with open(self.path, "ab") as f:
            f.write(half.numpy().tobytes())
        self.extents.append((start, tuple(half.shape)))

    def __len__(self) -> int:
        return len(self.factors)

    def _read(self, b: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Batch ``b``'s float16 payload (only ``rows`` of it): a memory map of the spill file, so
        only the rows asked for are read from disk and nothing stays resident afterwards."""
        if self.path is None:
            return self.payload[b] if rows is None else self.payload[b][rows]
        start, shape = self.extents[b]
        mapped = np.memmap(self.path, dtype=np.float16, mode="r", offset=start, shape=shape)
        return torch.from_numpy(np.array(mapped if rows is None else mapped[rows.numpy()]))

    def batch(self, b: int) -> torch.Tensor:
        return self._read(b).float() * self.factors[b] + self.offset

    def rows(self, b: int, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` of batch ``b`` as float32."""
        return self._read(b, rows).float() * self.factors[b] + self.offset

    def mean_square(self) -> float:
        """``mean(g²)`` over every stored element (the Fisher normaliser)."""
        total = count = 0
        for b in range(len(self)):
            g = self.batch(b)
            total += float(g.pow(2).sum())
            count += g.numel()
        return total / max(1, count)

    def nbytes(self) -> int:
        if self.path is not None:
            return sum(2 * int(np.prod(shape)) for _, shape in self.extents)
        return sum(t.numel() * t.element_size() for t in self.payload)

    def release(self) -> None:
        """Free the payload (delete the spill file); the cache is empty afterwards."""
        self.payload.clear()
        self.factors.clear()
        self.extents.clear()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters need no gradient: only activations (Fisher) or the method's own variables
    (rounding logits, step sizes) are differentiated, which also halves the backward cost."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def task_loss_gradients(
    model: nn.Module,
    unit_modules: dict[str, nn.Module],
    batches: list[torch.Tensor],
    device: torch.device,
    spill_dir: str | os.PathLike | None = None,
) -> dict[str, GradientCache]:
    """``|∂CE(logits, argmax logits)/∂z|`` for every unit output ``z``, per sample (summed CE), float model.

    The cross-entropy is summed over the batch so each sample's gradient is its own (not divided
    by the batch size). A unit called several times in one forward keeps its first call.
    ``spill_dir``: write each unit's gradients to a file there (one per unit) instead of memory.
    """
    paths = {name: Path(spill_dir) / f"unit{i:04d}.f16" if spill_dir is not None else None for i, name in enumerate(unit_modules)}
    caches = {name: GradientCache(path=paths[name]) for name in unit_modules}
    current: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(mod, args, out):
            if name in current:
                return None
            z = first_tensor(out)
            if not z.requires_grad:
                return None
            z.retain_grad()
            current[name] = z
            # the model continues on a copy: an in-place op downstream (ResNet's ``hidden += residual``)
            # must not change the tensor whose gradient is read
            return _replace_first(out, z.clone())

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in unit_modules.items()]
    try:
        with frozen_parameters(model), torch.enable_grad():
            for pv in batches:
                current.clear()
                x = pv.to(device).float().requires_grad_(True)
                logits = model_logits(model, x)
                labels = logits.detach().argmax(-1)
                F.cross_entropy(logits.float(), labels, reduction="sum").backward()
                for name, cache in caches.items():
                    z = current.get(name)
                    if z is None or z.grad is None:
                        raise RuntimeError(f"no gradient reached the output of unit {name}; cannot compute Fisher weights")
                    cache.append(z.grad.abs())  # only g² enters the loss
    finally:
        for h in handles:
            h.remove()
    return caches


@contextlib.contextmanager
def swapped_weights(layers: dict[str, nn.Module], weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily give ``layers`` other weight values (the unit is onloaded; restored on exit)."""
    saved = {n: layers[n].weight.data for n in weights}
    try:
        for n, w in weights.items():
            layers[n].weight.data = w.to(saved[n].dtype)
        yield
    finally:
        for n, data in saved.items():
            layers[n].weight.data = data


def kl_gradients(
    model: nn.Module,
    unit: nn.Module,
    batches: list[torch.Tensor],
    fp_logits: list[torch.Tensor],
    device: torch.device,
) -> GradientCache:
    """``|∂KL(fp ‖ q)/∂z| + 1`` at the output of ``unit`` on ``model`` as it is now (the reference code).

    ``model`` must hold the state the reference uses: earlier units quantized, ``unit`` with its
    initial (round-to-nearest) weights, later units float. KL uses ``batchmean`` over each
    calibration batch, as ``F.kl_div(..., reduction='batchmean')`` in ``GetLayerGrad``. Gradients
    stop at ``z`` (it is made a leaf), so nothing upstream is differentiated.
    """
    cache = GradientCache(offset=1.0)
    leaf: list[torch.Tensor] = []

    def hook(mod, args, out):
        if leaf:
            return None
        z = first_tensor(out).detach().requires_grad_(True)
        leaf.append(z)
        return _replace_first(out, z.clone())  # a non-leaf copy may be modified in place downstream

    handle = unit.register_forward_hook(hook)
    try:
        with frozen_parameters(model), torch.enable_grad():
            for pv, ref in zip(batches, fp_logits):
                leaf.clear()
                logits = model_logits(model, pv.to(device).float())
                target = F.softmax(ref.to(device).float(), dim=-1)
                F.kl_div(F.log_softmax(logits.float(), dim=-1), target, reduction="batchmean").backward()
                if not leaf or leaf[0].grad is None:
                    raise RuntimeError("no gradient reached the unit output; cannot compute KL Fisher weights")
                cache.append(leaf[0].grad.abs())
    finally:
        handle.remove()
    return cache
