"""Fashion-MNIST for the benchmarks: install check (Debian package) and a fast, cached DatasetDict.

``hf_ptq.builtin_data.load_fashion_mnist`` decodes the IDX files into 70k PIL images, which takes
~13 s and ~700 MB of RSS. Every matrix cell runs in a fresh subprocess (so that peak RSS is per
run), so the benchmark converts the dataset once into an arrow copy (``save_to_disk``) and the
cells memory-map it (``load_from_disk``: milliseconds, no RSS spike that would hide the
quantization's own peak).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from hf_ptq.builtin_data import FASHION_MNIST_DIR, load_fashion_mnist

from . import cache_root

__all__ = ["DEBIAN_PACKAGE", "ensure_fashion_mnist", "load_benchmark_dataset", "calibration_spec"]

DEBIAN_PACKAGE = "dataset-fashion-mnist"
_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
#: calibration: 1024 training images (the papers' size), fixed seed; evaluation is always the test split
CALIBRATION_SAMPLES = 1024
CALIBRATION_SEED = 0


def _present(root: Path) -> bool:
    return all((root / f).exists() for f in _FILES)


def ensure_fashion_mnist(root: Path = FASHION_MNIST_DIR, *, install: bool = True) -> Path:
    """Make sure the IDX files exist, installing the Debian package when allowed and possible.

    Raises ``RuntimeError`` with the command to run when the files are missing and cannot be
    installed here (not root, no apt-get, or the install failed).
    """
    if _present(root):
        return root
    how = f"apt-get update && apt-get install -y {DEBIAN_PACKAGE}"
    if root != Path("/usr/share/datasets/fashion-mnist"):
        raise RuntimeError(
            f"Fashion-MNIST files not found under HF_PTQ_FASHION_MNIST_DIR={root}; expected {list(_FILES)}."
        )
    if not install:
        raise RuntimeError(f"Fashion-MNIST is not installed; run (as root): {how}")
    if shutil.which("apt-get") is None:
        raise RuntimeError(
            f"Fashion-MNIST is not installed and apt-get is not available on this machine. Install the Debian "
            f"package {DEBIAN_PACKAGE} or copy the four IDX files into a folder and set HF_PTQ_FASHION_MNIST_DIR."
        )
    if os.geteuid() != 0:
        raise RuntimeError(f"Fashion-MNIST is not installed and installing it needs root. Run: sudo sh -c '{how}'")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install_cmd = ["apt-get", "install", "-y", DEBIAN_PACKAGE]
    if subprocess.run(install_cmd, env=env).returncode != 0:  # package lists may be stale or empty
        subprocess.run(["apt-get", "update"], env=env, check=False)
        if subprocess.run(install_cmd, env=env).returncode != 0:
            raise RuntimeError(f"`{' '.join(install_cmd)}` failed (see apt's output above); run: {how}")
    if not _present(root):
        raise RuntimeError(f"{DEBIAN_PACKAGE} installed but the files are not under {root}: {list(_FILES)}")
    return root


def _arrow_cache() -> Path:
    return cache_root() / "fashion-mnist-arrow"


def load_benchmark_dataset(*, install: bool = False):
    """``DatasetDict(train=60k, test=10k)`` (Image + ClassLabel), memory-mapped from the arrow cache.

    The first call builds the cache from the Debian package's files (via
    ``hf_ptq.builtin_data.load_fashion_mnist``, the one loader of the project).
    """
    import datasets

    path = _arrow_cache()
    if (path / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(path))
    ensure_fashion_mnist(install=install)
    ds = load_fashion_mnist()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-fmnist-"))
    ds.save_to_disk(str(tmp))
    try:
        os.replace(tmp, path)
    except OSError:  # another process won the race: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(path))


def calibration_spec(train_split) -> dict:
    """The calibration dict every calibrated cell passes to ``PTQConfig(calibration=...)``."""
    return {"dataset": train_split, "num_samples": CALIBRATION_SAMPLES, "seed": CALIBRATION_SEED}
