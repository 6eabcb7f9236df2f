"""Quickstart on an embedded default: digits → tiny ResNet → hf_ptq → FP vs quantized top-1.

``python -m hf_ptq.quickstart [--bits 4] [--out DIR]`` trains a small transformers ResNet on
scikit-learn's bundled digits images (seconds), saves it as an ordinary Hugging Face checkpoint,
reloads it through ``from_pretrained(..., quantization_config=PTQConfig(...))``, prints float vs
quantized top-1 on the held-out split, and saves the quantized checkpoint. No network needed.
Real users replace the checkpoint path with a Hub id and the dataset with their own.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

DIGITS_CACHE = Path(os.environ.get("HF_PTQ_CACHE", Path.home() / ".cache" / "hf_ptq")) / "digits-resnet-v1"


def digits_image_processor():
    """8×8 grey digits → 32×32, normalised to [-1, 1] (a ViT-style processor; no torchvision needed)."""
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    return ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5], image_std=[0.5])


def digits_resnet_config():
    from transformers import ResNetConfig

    return ResNetConfig(
        num_channels=1,
        embedding_size=32,
        hidden_sizes=[32, 64, 128],
        depths=[1, 1, 1],
        layer_type="basic",
        downsample_in_first_stage=False,
        num_labels=10,
        id2label={i: str(i) for i in range(10)},
        label2id={str(i): i for i in range(10)},
    )


def train_digits_checkpoint(path: str | os.PathLike = DIGITS_CACHE, epochs: int = 30, seed: int = 0) -> Path:
    """Train (once; cached at ``path``) the digits ResNet and save it with its image processor."""
    from transformers import ResNetForImageClassification

    from .builtin_data import load_digits_dataset
    from .training import preprocess_split, train_image_classifier

    path = Path(path)
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    torch.manual_seed(seed)
    processor = digits_image_processor()
    ds = load_digits_dataset()
    x, y = preprocess_split(ds["train"], processor)
    model = ResNetForImageClassification(digits_resnet_config())
    train_image_classifier(model, x, y, epochs=epochs, batch_size=64, lr=3e-3, seed=seed)
    tmp = Path(tempfile.mkdtemp(dir=path.parent if path.parent.exists() else None, prefix=".tmp-digits-"))
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, path) if not path.exists() else None
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=4, help="weight bits (2, 3, 4, 8)")
    parser.add_argument("--method", default="rtn", help="quantization method (see hf_ptq.methods)")
    parser.add_argument("--out", default="digits-resnet-hf_ptq", help="where to save the quantized checkpoint")
    args = parser.parse_args(argv)

    from transformers import AutoModelForImageClassification

    import hf_ptq
    from .builtin_data import load_digits_dataset

    ckpt = train_digits_checkpoint()
    ds = load_digits_dataset()
    fp = AutoModelForImageClassification.from_pretrained(ckpt)
    fp_top1 = hf_ptq.evaluate_model(fp, ds["test"])["top1"]
    config = hf_ptq.PTQConfig(
        method=args.method,
        weight_bits=args.bits,
        calibration={"dataset": ds["train"], "num_samples": 256} if args.method != "rtn" else None,
    )
    qmodel = AutoModelForImageClassification.from_pretrained(ckpt, quantization_config=config)
    q_top1 = hf_ptq.evaluate_model(qmodel, ds["test"])["top1"]
    qmodel.save_pretrained(args.out)
    print(f"float checkpoint : {ckpt}")
    print(f"float top-1      : {fp_top1 * 100:.2f} %  (digits test split, {len(ds['test'])} images)")
    print(f"{args.method} W{args.bits} top-1   : {q_top1 * 100:.2f} %  (drop {100 * (fp_top1 - q_top1):+.2f} pt)")
    print(f"saved quantized  : {args.out}  (reload: import hf_ptq; AutoModelForImageClassification.from_pretrained)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
