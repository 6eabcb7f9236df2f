"""hf_ptq benchmarks on real data: Fashion-MNIST reference models and the method × bit-width matrix.

No pretrained weights or ImageNet images can be installed on the project's machines
(``docs/data.md`` in the shared docs), so the benchmark trains its own float reference models on
Fashion-MNIST (Debian package ``dataset-fashion-mnist``) and quantizes them through
``from_pretrained(ckpt, quantization_config=hf_ptq.PTQConfig(...))`` exactly like a user's Hub model.

Commands:

* ``python -m benchmarks.prepare``   install/check the dataset and train the reference models (once per machine)
* ``python -m benchmarks.run --quick``  a subset of the matrix (≤ 20 min on 2 CPU cores, models trained)
* ``python -m benchmarks.run``          the full matrix; writes ``docs/benchmarks.md`` and ``docs/*.png``

Everything heavy (dataset arrow cache, checkpoints, per-cell results) lives outside git under
``$HF_PTQ_CACHE/benchmarks`` (default ``~/.cache/hf_ptq/benchmarks``).
"""

from __future__ import annotations

import os
from pathlib import Path

# The 2 CPU cores are shared with other jobs. With OpenMP's default (spinning) wait policy, two
# torch threads competing with other processes slowed training 10-20x here (2.4 s/step instead of
# 0.12); passive waiting kept it at ~0.3 s/step under the same load. It must be set before torch
# initialises OpenMP, i.e. before any benchmarks module imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["cache_root", "REPO_ROOT"]

#: the repository root (benchmarks/ sits directly under it)
REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_root() -> Path:
    """Where trained references, the dataset cache and per-cell results live (outside git)."""
    return Path(os.environ.get("HF_PTQ_CACHE", Path.home() / ".cache" / "hf_ptq")) / "benchmarks"
