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

__all__ = ["cache_root", "REPO_ROOT"]

#: the repository root (benchmarks/ sits directly under it)
REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_root() -> Path:
    """Where trained references, the dataset cache and per-cell results live (outside git)."""
    return Path(os.environ.get("HF_PTQ_CACHE", Path.home() / ".cache" / "hf_ptq")) / "benchmarks"
