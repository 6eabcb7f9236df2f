"""Setup step: install/check Fashion-MNIST and train the float reference models (once per machine).

``python -m benchmarks.prepare [--models resnet,convnext,vit] [--threads 2]``

Installs the Debian package ``dataset-fashion-mnist`` when it is missing (needs root; otherwise
prints the command), builds the arrow cache, and trains every reference model whose checkpoint
is missing or stale. Finished checkpoints are reused, so rerunning is cheap.
"""

from __future__ import annotations

import argparse
import sys

import torch


def parse_models(text: str | None) -> list[str]:
    """``"resnet,vit"`` → ``["resnet", "vit"]``, checked against the known references."""
    from .models import MODELS

    if not text:
        return list(MODELS)
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    return keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="comma-separated subset of the reference models")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the project's machines have 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from .data import ensure_fashion_mnist, load_benchmark_dataset
    from .models import MODELS, ensure_reference

    try:
        root = ensure_fashion_mnist(install=True)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Fashion-MNIST: {root}")
    ds = load_benchmark_dataset()
    print(f"dataset: train {len(ds['train'])}, test {len(ds['test'])}")
    for key in parse_models(args.models):
        path, info = ensure_reference(MODELS[key], dataset=ds)
        print(
            f"{key:9s} top-1 {info['fp_top1'] * 100:.2f} % (target {info['target_top1'] * 100:.0f} %), "
            f"{info['params'] / 1e3:.0f}k params, trained in {info['train_seconds'] / 60:.1f} min → {path}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
