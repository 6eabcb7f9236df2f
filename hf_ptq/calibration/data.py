"""Calibration and evaluation inputs: a dataset spec → batches of ``pixel_values``.

Images go through the checkpoint's own image processor, so calibration sees exactly what the
model sees at inference. Sources: a Hub dataset id (+ config, split), a local image folder
(``imagefolder``), a ``datasets.Dataset``/``DatasetDict``, or any iterable yielding
``pixel_values`` tensors, dicts holding them, or ``(pixel_values, label)`` tuples (e.g. a
``DataLoader``). Sampling is deterministic for a seed.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from ..config import CalibrationConfig

logger = logging.get_logger("hf_ptq")

__all__ = [
    "load_image_dataset",
    "find_image_column",
    "find_label_column",
    "resolve_image_processor",
    "calibration_batches",
    "iterate_image_batches",
    "random_augment",
]


def load_image_dataset(source: Any, *, dataset_config: str | None = None, split: str = "train", data_dir=None):
    """A ``datasets.Dataset`` from a Hub id, a local folder, a Dataset or a DatasetDict (else ``source``)."""
    import datasets

    if isinstance(source, str):
        if os.path.isdir(source):
            ds = datasets.load_dataset("imagefolder", data_dir=source)
        else:  # a Hub dataset id (needs network unless it is in the local cache)
            ds = datasets.load_dataset(source, dataset_config, data_dir=data_dir)
        source = ds
    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise ValueError(f"split {split!r} not found; the dataset has splits {sorted(source)}. Set `split`.")
        source = source[split]
    if isinstance(source, datasets.IterableDataset):
        return source
    if isinstance(source, datasets.Dataset) and len(source) == 0:
        raise ValueError("the calibration dataset is empty (0 rows).")
    return source


def find_image_column(ds, image_column: str | None = None) -> str:
    """The column holding images: the one given, else the (single) ``datasets.Image`` feature."""
    import datasets

    features = ds.features or {}
    described = ", ".join(f"{k} ({type(v).__name__})" for k, v in features.items())
    if image_column is not None:
        if image_column not in features:
            raise ValueError(f"image_column={image_column!r} is not a column of the dataset; columns: {described}.")
        if not isinstance(features[image_column], datasets.Image):
            raise ValueError(
                f"column {image_column!r} holds {type(features[image_column]).__name__}, not images; columns: "
                f"{described}. Cast it with ds.cast_column({image_column!r}, datasets.Image()) or pick another."
            )
        return image_column
    images = [k for k, v in features.items() if isinstance(v, datasets.Image)]
    if not images:
        raise ValueError(
            f"no image column found; columns: {described}. Pass image_column=... naming a column of "
            "datasets.Image() type (cast it first if it holds paths or arrays)."
        )
    if len(images) > 1:
        logger.warning(f"several image columns {images}; using {images[0]!r} (set image_column to choose).")
    return images[0]


def find_label_column(ds, label_column: str | None = None) -> str:
    """The label column: the one given, else the ``ClassLabel`` feature, else ``label``/``labels``."""
    import datasets

    features = ds.features or {}
    if label_column is not None:
        if label_column not in features:
            raise ValueError(f"label_column={label_column!r} is not a column; columns: {list(features)}.")
        return label_column
    for k, v in features.items():
        if isinstance(v, datasets.ClassLabel):
            return k
    for k in ("label", "labels"):
        if k in features:
            return k
    raise ValueError(f"no label column found; columns: {list(features)}. Pass label_column=...")


def resolve_image_processor(model: Any, image_processor: Any = None) -> Any:
    """The processor given, else ``AutoImageProcessor.from_pretrained(model.name_or_path)``."""
    if image_processor is not None:
        return image_processor
    from transformers import AutoImageProcessor

    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    try:
        return AutoImageProcessor.from_pretrained(path)
    except Exception as err:
        raise ValueError(
            f"could not load an image processor for {path!r} ({type(err).__name__}: {err}). Save one beside the "
            "checkpoint (processor.save_pretrained(dir)) or pass it: CalibrationConfig(image_processor=...) / "
            "hf_ptq.quantize_model(..., image_processor=...)."
        ) from None


def random_augment(image, rng: random.Random, scale: tuple[float, float] = (0.5, 1.0)):
    """Train-time augmentation of the references: random resized crop + horizontal flip (PIL only)."""
    w, h = image.size
    area = w * h * rng.uniform(*scale)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw = int(round(min(w, np.sqrt(area * ratio))))
    ch = int(round(min(h, np.sqrt(area / ratio))))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    image = image.crop((left, top, left + cw, top + ch)).resize((w, h))
    if rng.random() < 0.5:
        image = image.transpose(0)  # PIL.Image.FLIP_LEFT_RIGHT
    return image


def iterate_image_batches(
    ds,
    image_processor: Any,
    *,
    batch_size: int,
    image_column: str | None = None,
    label_column: str | None = None,
    with_labels: bool = True,
    indices: list[int] | None = None,
    augment_seed: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(pixel_values, labels)`` batches of a ``datasets.Dataset`` through ``image_processor``.

    ``labels`` is None when ``with_labels`` is False; ``indices`` picks and orders rows.
    """
    image_column = find_image_column(ds, image_column)
    labels_col = find_label_column(ds, label_column) if with_labels else None
    order = indices if indices is not None else list(range(len(ds)))
    rng = random.Random(augment_seed) if augment_seed is not None else None
    for start in range(0, len(order), batch_size):
        rows = ds[order[start : start + batch_size]]
        images = list(rows[image_column])
        if rng is not None:
            images = [random_augment(im, rng) for im in images]
        pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
        labels = torch.as_tensor(list(rows[labels_col])) if labels_col is not None else None
        yield pixel_values, labels


def _pixel_values_of(item: Any) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, dict) and "pixel_values" in item:
        return torch.as_tensor(item["pixel_values"])
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        return item[0]
    raise ValueError(
        f"calibration iterable yielded {type(item).__name__}; expected pixel_values tensors [B, C, H, W], "
        "dicts with 'pixel_values', or (pixel_values, label) tuples."
    )


def calibration_batches(
    spec: CalibrationConfig, model: Any = None, image_processor: Any = None, dataset: Any = None
) -> list[torch.Tensor]:
    """``spec.num_samples`` preprocessed images as CPU ``pixel_values`` batches of ``spec.batch_size``.

    ``dataset`` overrides ``spec.dataset`` (e.g. an in-memory object passed at call time).
    """
    source = dataset if dataset is not None else spec.dataset
    import datasets

    if isinstance(source, (str, datasets.Dataset, datasets.DatasetDict)):
        ds = load_image_dataset(source, dataset_config=spec.dataset_config, split=spec.split, data_dir=spec.data_dir)
        if isinstance(ds, datasets.Dataset):
            n = len(ds)
            if spec.num_samples > n:
                logger.warning(f"num_samples={spec.num_samples} is larger than the dataset ({n} rows); using all {n}.")
            order = list(range(n))
            random.Random(spec.seed).shuffle(order)
            order = order[: min(spec.num_samples, n)]
            processor = resolve_image_processor(model, image_processor or spec.image_processor)
            return [
                pv.contiguous()
                for pv, _ in iterate_image_batches(
                    ds,
                    processor,
                    batch_size=spec.batch_size,
                    image_column=spec.image_column,
                    with_labels=False,
                    indices=sorted(order) if not spec.augment else order,
                    augment_seed=spec.seed if spec.augment else None,
                )
            ]
        source = ds  # an IterableDataset: stream it like any iterable below
    if isinstance(source, (str, bytes)) or not isinstance(source, Iterable):
        raise ValueError(f"unsupported calibration dataset of type {type(source).__name__}.")
    chunks, total = [], 0
    for item in source:
        if isinstance(item, dict) and "pixel_values" not in item:  # a streamed dataset row with an image
            processor = resolve_image_processor(model, image_processor or spec.image_processor)
            key = next((k for k, v in item.items() if hasattr(v, "convert")), None)
            if key is None:
                raise ValueError(f"calibration rows have no image; keys: {sorted(item)}.")
            item = processor([item[key]], return_tensors="pt")["pixel_values"]
        pv = _pixel_values_of(item).detach().cpu()
        if pv.dim() == 3:
            pv = pv.unsqueeze(0)
        chunks.append(pv)
        total += pv.shape[0]
        if total >= spec.num_samples:
            break
    if not chunks:
        raise ValueError("the calibration iterable yielded no data.")
    if total < spec.num_samples:
        logger.warning(f"num_samples={spec.num_samples} but the iterable gave only {total} images; using all {total}.")
    flat = torch.cat(chunks)[: spec.num_samples]
    return [b.contiguous() for b in flat.split(spec.batch_size)]
