"""The float reference models: transformers configs, fixed-seed training, and the on-disk cache.

Each reference is an ordinary Hugging Face checkpoint (``save_pretrained`` of the model and its
image processor) under ``$HF_PTQ_CACHE/benchmarks/<name>/``, trained once per machine, so the
matrix quantizes it through ``from_pretrained(path, quantization_config=...)`` like a Hub model.
Beside the weights, ``benchmark_info.json`` records the spec (fingerprinted: a changed spec means
a stale checkpoint), the training time and the measured float top-1 on the 10k test split.

Sizes are chosen for 2 CPU cores at the native 28×28 resolution (see the shared data.md: tiny
transformers models reach 90–93 % on Fashion-MNIST within minutes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from hf_ptq.builtin_data import FASHION_MNIST_CLASSES

from . import cache_root

logger = logging.get_logger("hf_ptq.benchmarks")

__all__ = ["ModelSpec", "MODELS", "image_processor", "checkpoint_dir", "load_info", "ensure_reference", "train_reference"]

#: pixel statistics of Fashion-MNIST x/255 (data.md): mean 0.286, std 0.353
FMNIST_MEAN, FMNIST_STD = 0.286, 0.353
INFO_FILE = "benchmark_info.json"


def image_processor():
    """28×28 grey images, mean/std normalised (the PIL ViT processor: no torchvision needed)."""
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    return ViTImageProcessorPil(size={"height": 28, "width": 28}, image_mean=[FMNIST_MEAN], image_std=[FMNIST_STD])


def _labels() -> dict[str, Any]:
    return {
        "num_labels": len(FASHION_MNIST_CLASSES),
        "id2label": dict(enumerate(FASHION_MNIST_CLASSES)),
        "label2id": {c: i for i, c in enumerate(FASHION_MNIST_CLASSES)},
    }


def _resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    # Bottleneck blocks (reduction 4) with the basic data.md model's inner widths 32/64/128.
    cfg = ResNetConfig(
        num_channels=1, embedding_size=32, hidden_sizes=[128, 256, 512], depths=[1, 1, 1],
        layer_type="bottleneck", downsample_in_first_stage=False, **_labels(),
    )  # fmt: skip
    return ResNetForImageClassification(cfg)


def _convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(
        num_channels=1, patch_size=2, num_stages=3, hidden_sizes=[32, 64, 128], depths=[2, 2, 2], **_labels()
    )  # fmt: skip
    return ConvNextForImageClassification(cfg)


def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        num_channels=1, image_size=28, patch_size=4, hidden_size=96, num_hidden_layers=4,
        num_attention_heads=4, intermediate_size=192, **_labels(),
    )  # fmt: skip
    return ViTForImageClassification(cfg)


@dataclass(frozen=True)
class ModelSpec:
    """How one reference model is built and trained (all of it enters the fingerprint)."""

    key: str
    title: str
    build: Callable[[], torch.nn.Module] = field(compare=False)
    target_top1: float
    epochs: float
    lr: float
    batch_size: int = 128
    weight_decay: float = 0.05
    label_smoothing: float = 0.05
    hflip: bool = True
    seed: int = 0
    version: int = 1

    @property
    def name(self) -> str:
        """Cache folder name (bump ``version`` to retrain after an incompatible change)."""
        return f"fmnist-{self.key}-v{self.version}"

    def training_args(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("key", "title", "build", "target_top1", "version")}

    def fingerprint(self) -> str:
        """Hash of the model config and training arguments: detects a cached checkpoint built differently."""
        model_cfg = self.build().config.to_dict()
        model_cfg.pop("transformers_version", None)
        blob = json.dumps({"config": model_cfg, "train": self.training_args()}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


MODELS: dict[str, ModelSpec] = {
    s.key: s
    for s in (
        ModelSpec("resnet", "ResNet (bottleneck)", _resnet, target_top1=0.92, epochs=10, lr=3e-3),
        ModelSpec("convnext", "ConvNeXt", _convnext, target_top1=0.90, epochs=10, lr=3e-3),
        ModelSpec("vit", "ViT", _vit, target_top1=0.88, epochs=12, lr=2e-3),
    )
}


def checkpoint_dir(spec: ModelSpec) -> Path:
    return cache_root() / spec.name


def load_info(spec: ModelSpec) -> dict[str, Any] | None:
    """The cached checkpoint's ``benchmark_info.json``, or None when it is missing or stale."""
    path = checkpoint_dir(spec)
    info_file = path / INFO_FILE
    if not (info_file.exists() and (path / "model.safetensors").exists() and (path / "config.json").exists()):
        return None
    info = json.loads(info_file.read_text())
    if info.get("fingerprint") != spec.fingerprint():
        logger.warning(f"{path} was trained from a different spec (fingerprint {info.get('fingerprint')}); stale.")
        return None
    return info


def train_reference(spec: ModelSpec, dataset=None) -> dict[str, Any]:
    """Train ``spec`` with its fixed seed, evaluate the saved checkpoint, and move it into the cache.

    Written to a temporary folder first and moved into place, so an interrupted run never leaves
    a half-written checkpoint that later runs would trust.
    """
    import hf_ptq
    from hf_ptq.training import preprocess_split, train_image_classifier
    from transformers import AutoModelForImageClassification

    from .data import load_benchmark_dataset

    ds = dataset if dataset is not None else load_benchmark_dataset(install=True)
    processor = image_processor()
    x, y = preprocess_split(ds["train"], processor)
    torch.manual_seed(spec.seed)
    model = spec.build()
    params = sum(p.numel() for p in model.parameters())
    logger.warning(f"training {spec.title} ({params / 1e3:.0f}k params) for {spec.epochs} epochs on {len(y)} images")
    start = time.perf_counter()
    train_image_classifier(
        model, x, y, epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr, weight_decay=spec.weight_decay,
        label_smoothing=spec.label_smoothing, hflip=spec.hflip, seed=spec.seed,
    )  # fmt: skip
    train_seconds = time.perf_counter() - start
    final = checkpoint_dir(spec)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{spec.name}-"))
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    # Evaluate what was saved, reloaded the way the matrix will load it.
    reloaded = AutoModelForImageClassification.from_pretrained(tmp)
    result = hf_ptq.evaluate_model(reloaded, ds["test"], confusion=True)
    info = {
        "name": spec.name,
        "title": spec.title,
        "architecture": type(model).__name__,
        "fingerprint": spec.fingerprint(),
        "params": params,
        "train": spec.training_args(),
        "train_images": len(y),
        "train_seconds": round(train_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "fp_top1": result["top1"],
        "target_top1": spec.target_top1,
        "per_class_recall": result.get("per_class_recall"),
        "test_images": result["num_samples"],
        "safetensors_bytes": (tmp / "model.safetensors").stat().st_size,
        "trained_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if final.exists():  # stale copy: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    status = "meets" if info["fp_top1"] >= spec.target_top1 else "MISSES"
    logger.warning(
        f"{spec.title}: top-1 {info['fp_top1'] * 100:.2f} % ({status} the {spec.target_top1 * 100:.0f} % target) "
        f"after {train_seconds / 60:.1f} min → {final}"
    )
    return info


def ensure_reference(spec: ModelSpec, *, train: bool = True, dataset=None) -> tuple[Path, dict[str, Any]]:
    """The cached checkpoint of ``spec`` and its info, training it first when missing or stale."""
    info = load_info(spec)
    if info is None:
        if not train:
            raise FileNotFoundError(
                f"reference model {spec.key!r} is not trained on this machine (expected {checkpoint_dir(spec)}); "
                "run `python -m benchmarks.prepare` first."
            )
        # Two processes (e.g. prepare and run started side by side) must not train the same model twice.
        import fcntl

        lock_path = cache_root() / f".{spec.name}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            info = load_info(spec)  # trained by another process while we waited?
            if info is None:
                info = train_reference(spec, dataset)
    return checkpoint_dir(spec), info
