"""A small, deterministic training loop for the reference models of the quickstart, tests and benchmarks.

Not part of quantization: hf_ptq needs trained float checkpoints to measure real accuracy, and
no pretrained weights can be downloaded here, so it trains tiny ones (seconds to minutes on CPU).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from transformers.utils import logging

from .calibration.data import iterate_image_batches

__all__ = ["preprocess_split", "train_image_classifier"]


def preprocess_split(ds, image_processor: Any, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a split through the processor, as one ``(pixel_values, labels)`` pair."""
    xs, ys = [], []
    for pv, labels in iterate_image_batches(ds, image_processor, batch_size=batch_size):
        xs.append(pv)
        ys.append(labels)
    return torch.cat(xs), torch.cat(ys)


def train_image_classifier(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: float = 10,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 0.05,
    label_smoothing: float = 0.05,
    hflip: bool = False,
    seed: int = 0,
) -> torch.nn.Module:
    """AdamW + cosine schedule on preprocessed tensors; returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = pixel_values.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(1, int(round(epochs * steps_per_epoch)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.1)
    model.train()
    bar = logging.tqdm(total=total, desc="training", unit="step")
    step = 0
    while step < total:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            if step >= total:
                break
            idx = perm[start : start + batch_size]
            x, y = pixel_values[idx], labels[idx]
            if hflip:
                flip = torch.rand(len(idx), generator=gen) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(pixel_values=x).logits, y, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            if step % 50 == 0 or step == total:
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return model.eval()
