"""Fashion-MNIST loader: counts, dtypes, image size and labels.

The real-data test reads the Debian package's 70k images (~15 s, marked slow; run with
``pytest -m slow``); the fast tests check the IDX parsing on a tiny file written here.
"""

from __future__ import annotations

import gzip
from collections import Counter

import numpy as np
import pytest

from hf_ptq.builtin_data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_fashion_mnist


def _write_idx(root, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write images/labels in the IDX format (magic, dims, big-endian) like the original files."""
    n, h, w = images.shape
    header = np.array([0x00000803, n, h, w], dtype=">u4").tobytes()
    with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + images.astype(np.uint8).tobytes())
    with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(np.array([0x00000801, n], dtype=">u4").tobytes() + labels.astype(np.uint8).tobytes())


def test_loader_parses_idx_files(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    train_x, train_y = rng.integers(0, 256, (20, 28, 28)), np.arange(20) % 10
    test_x, test_y = rng.integers(0, 256, (7, 28, 28)), np.array([9, 8, 7, 6, 5, 4, 3])
    _write_idx(tmp_path, "train", train_x, train_y)
    _write_idx(tmp_path, "t10k", test_x, test_y)
    ds = load_fashion_mnist(tmp_path)
    assert {k: len(v) for k, v in ds.items()} == {"train": 20, "test": 7}
    assert isinstance(ds["train"].features["image"], datasets.Image)
    assert ds["train"].features["label"].names == FASHION_MNIST_CLASSES
    assert ds["test"]["label"] == test_y.tolist()
    img = ds["test"][2]["image"]
    assert img.mode == "L" and img.size == (28, 28)
    np.testing.assert_array_equal(np.asarray(img), test_x[2])  # pixels survive the PNG round trip exactly


def test_loader_names_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_real_files():
    import datasets

    ds = load_fashion_mnist()
    assert {k: len(v) for k, v in ds.items()} == {"train": 60_000, "test": 10_000}
    for split in ds.values():
        assert isinstance(split.features["image"], datasets.Image)
        assert isinstance(split.features["label"], datasets.ClassLabel)
        assert split.features["label"].names == FASHION_MNIST_CLASSES
    assert Counter(ds["train"]["label"]) == {c: 6_000 for c in range(10)}
    assert Counter(ds["test"]["label"]) == {c: 1_000 for c in range(10)}
    arr = np.stack([np.asarray(ds["test"][i]["image"]) for i in range(0, 10_000, 10)])
    assert arr.dtype == np.uint8 and arr.shape == (1_000, 28, 28)
    assert ds["test"][0]["image"].mode == "L"
    # documented statistics of x/255 (data.md: mean 0.286, std 0.353); a decoding bug would move them
    assert abs(arr.mean() / 255 - 0.286) < 0.01 and abs(arr.std() / 255 - 0.353) < 0.01
    # the first test image of the official release is an ankle boot (label 9)
    assert ds["test"][0]["label"] == 9
