"""Real labelled image datasets that work offline, as ``datasets.DatasetDict`` with Image/ClassLabel.

* ``load_digits_dataset``: scikit-learn's bundled UCI digits (1,797 8×8 images), split 80/20
  stratified with a fixed seed. Used by the quickstart and the fast tests.
* ``load_fashion_mnist``: Fashion-MNIST (60k train / 10k test, 28×28) from the Debian package
  ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``). Used by the benchmarks.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

__all__ = ["load_digits_dataset", "load_fashion_mnist", "FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES"]

FASHION_MNIST_DIR = Path(os.environ.get("HF_PTQ_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def _to_dataset(images: np.ndarray, labels: np.ndarray, names: list[str]):
    import datasets
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(im, mode="L") for im in images], "label": labels.astype(np.int64).tolist()},
        features=features,
    )


def load_digits_dataset(test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn digits as grey 8×8 PIL images (values scaled 0..16 → 0..255), stratified split."""
    import datasets

    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn") from err
    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    labels = digits.target
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in np.unique(labels):  # stratified: the same fraction of every class in the test split
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        test_idx.extend(idx[: int(round(len(idx) * test_fraction))].tolist())
    test_mask = np.zeros(len(labels), dtype=bool)
    test_mask[test_idx] = True
    names = [str(i) for i in range(10)]
    return datasets.DatasetDict(
        train=_to_dataset(images[~test_mask], labels[~test_mask], names),
        test=_to_dataset(images[test_mask], labels[test_mask], names),
    )


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def load_fashion_mnist(root: str | os.PathLike | None = None):
    """Fashion-MNIST from the Debian package's IDX files: ``DatasetDict(train=60k, test=10k)``."""
    import datasets

    root = Path(root) if root is not None else FASHION_MNIST_DIR
    files = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }
    missing = [str(root / f) for pair in files.values() for f in pair if not (root / f).exists()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {missing}. Install them with "
            "`sudo apt-get install dataset-fashion-mnist` or set HF_PTQ_FASHION_MNIST_DIR."
        )
    splits = {}
    for split, (img_file, lbl_file) in files.items():
        images = _read_idx(root / img_file, 16).reshape(-1, 28, 28)
        labels = _read_idx(root / lbl_file, 8)
        splits[split] = _to_dataset(images, labels, FASHION_MNIST_CLASSES)
    return datasets.DatasetDict(splits)
