"""Top-1 accuracy of an image classifier on a labelled dataset, through the `evaluate` library.

The metric module ships inside hf_ptq (``hf_ptq/metrics/top1``) and is loaded from its local path,
so evaluation works offline.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

import torch
from transformers.utils import logging

from .calibration.data import iterate_image_batches, load_image_dataset, resolve_image_processor

logger = logging.get_logger("hf_ptq")

__all__ = ["evaluate_model", "load_top1_metric"]


def load_top1_metric():
    """The shipped ``evaluate`` top-1 metric (no Hub access)."""
    import evaluate

    return evaluate.load(str(files("hf_ptq") / "metrics" / "top1"))


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    dataset: Any,
    *,
    image_processor: Any = None,
    split: str = "test",
    batch_size: int = 64,
    image_column: str | None = None,
    label_column: str | None = None,
    max_samples: int | None = None,
    confusion: bool = False,
) -> dict[str, Any]:
    """Top-1 of ``model`` on ``dataset`` (a ``datasets.Dataset``/``DatasetDict``, Hub id or image folder).

    Returns ``{"top1": float, "num_samples": int}`` plus per-class recall and the confusion matrix
    when ``confusion=True``. Images go through ``image_processor`` (default: the checkpoint's own).
    """
    ds = load_image_dataset(dataset, split=split)
    processor = resolve_image_processor(model, image_processor)
    indices = list(range(min(len(ds), max_samples))) if max_samples else None
    metric = load_top1_metric()
    model.eval()
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    total = len(indices) if indices is not None else len(ds)
    bar = logging.tqdm(total=total, desc="evaluating", unit="img")
    for pixel_values, labels in iterate_image_batches(
        ds, processor, batch_size=batch_size, image_column=image_column, label_column=label_column, indices=indices
    ):
        logits = model(pixel_values=pixel_values.to(device)).logits
        metric.add_batch(predictions=logits.argmax(-1).cpu().tolist(), references=labels.tolist())
        bar.update(len(labels))
    bar.close()
    num_classes = getattr(getattr(model, "config", None), "num_labels", None) if confusion else None
    result = metric.compute(num_classes=num_classes)
    result["num_samples"] = total
    return result
