"""transformers integration: from_pretrained quantizes, save → reload is bitwise, un-plugged loads fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from tiny_models import TINY, tiny_model
from transformers import AutoModelForImageClassification, pipeline

import hf_ptq
from hf_ptq import PTQConfig
from hf_ptq.quant.modules import QuantConv2d, QuantLinear, QuantModuleMixin


def _save(model, path):
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("name", sorted(TINY))
def test_quantize_save_reload_bitwise(name, tmp_path):
    fp = tiny_model(name)
    ckpt = _save(fp, tmp_path / "fp")
    q = AutoModelForImageClassification.from_pretrained(ckpt, quantization_config=PTQConfig(weight_bits=4))
    qmods = [m for m in q.modules() if isinstance(m, QuantModuleMixin)]
    assert qmods, "nothing was quantized"
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and "classifier" not in n and "patch_embeddings" not in n
                   for n, m in q.named_modules()), "a quantizable layer was left in float"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, out = fp(pixel_values=x).logits, q(pixel_values=x).logits
    assert torch.isfinite(out).all()
    assert not torch.equal(ref, out)  # 4-bit weights do change the logits ...
    assert torch.allclose(ref, out, atol=0.5 * float(ref.abs().max()) + 1e-3)  # ... but stay close
    qdir = _save(q, tmp_path / "q")
    reloaded = AutoModelForImageClassification.from_pretrained(qdir)
    with torch.no_grad():
        again = reloaded(pixel_values=x).logits
    assert torch.equal(out, again)
    assert len([m for m in reloaded.modules() if isinstance(m, QuantModuleMixin)]) == len(qmods)


def test_config_json_records_what_reload_needs(tmp_path):
    ckpt = _save(tiny_model("resnet-bottleneck"), tmp_path / "fp")
    q = AutoModelForImageClassification.from_pretrained(ckpt, quantization_config=PTQConfig(weight_bits=2))
    _save(q, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "hf_ptq" and cfg["format_version"] == 1 and cfg["weight_bits"] == 2
    assert "resnet.embedder.embedder.convolution" in cfg["quantized_modules"]
    assert "classifier.1" not in cfg["quantized_modules"]
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("resnet.embedder.embedder.convolution.weight_packed")
    assert {"resnet.embedder.embedder.convolution." + s for s in
            ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight")} <= keys
    assert packed.dtype == torch.int32 and packed.shape == (8, -(-3 * 7 * 7 * 2 // 32))


def test_loading_without_plugin_fails_loudly(tmp_path):
    ckpt = _save(tiny_model("vit"), tmp_path / "fp")
    q = AutoModelForImageClassification.from_pretrained(ckpt, quantization_config=PTQConfig(weight_bits=8))
    qdir = _save(q, tmp_path / "q")
    code = f"from transformers import AutoModelForImageClassification as A; A.from_pretrained({str(qdir)!r})"
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "ignore_mismatched_sizes" in proc.stderr or "size mismatch" in proc.stderr.lower()


def test_default_skips_and_override(tmp_path):
    ckpt = _save(tiny_model("vit"), tmp_path / "fp")
    q = AutoModelForImageClassification.from_pretrained(ckpt, quantization_config=PTQConfig(weight_bits=8))
    assert type(q.classifier) is torch.nn.Linear
    assert type(q.vit.embeddings.patch_embeddings.projection) is torch.nn.Conv2d
    everything = AutoModelForImageClassification.from_pretrained(
        ckpt, quantization_config=PTQConfig(weight_bits=8, modules_to_not_convert=[])
    )
    assert isinstance(everything.classifier, QuantLinear)
    assert isinstance(everything.vit.embeddings.patch_embeddings.projection, QuantConv2d)
    with torch.no_grad():  # ViT casts pixel_values to the patch-embedding weight dtype: still float
        assert torch.isfinite(everything(pixel_values=torch.randn(1, 3, 32, 32)).logits).all()
    some = AutoModelForImageClassification.from_pretrained(
        ckpt, quantization_config=PTQConfig(weight_bits=8, modules_to_not_convert=["vit.layers.1", "classifier"])
    )
    assert type(some.vit.layers[1].mlp.fc1) is torch.nn.Linear and isinstance(some.vit.layers[0].mlp.fc1, QuantLinear)


def test_pipeline_runs_on_quantized_model(tmp_path):
    from PIL import Image
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    ckpt = _save(tiny_model("convnext"), tmp_path / "fp")
    q = AutoModelForImageClassification.from_pretrained(ckpt, quantization_config=PTQConfig(weight_bits=4))
    processor = ViTImageProcessorPil(size={"height": 32, "width": 32})
    clf = pipeline("image-classification", model=q, image_processor=processor)
    out = clf(Image.new("RGB", (40, 40), color=(120, 30, 200)))
    assert len(out) == 3 and abs(sum(o["score"] for o in out) - 1) < 1e-4


@pytest.mark.parametrize("bits", [4, 2])
def test_checkpoint_size_follows_packing_arithmetic(tmp_path, bits):
    fp = tiny_model("resnet-bottleneck")
    ckpt = _save(fp, tmp_path / "fp")
    q = AutoModelForImageClassification.from_pretrained(ckpt, quantization_config=PTQConfig(weight_bits=bits))
    _save(q, tmp_path / "q")
    with safe_open(tmp_path / "fp" / "model.safetensors", "pt") as f:
        fp_bytes = {k: f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()}
    # expected: every quantized conv stores ceil(n*b/32) int32 words per output channel, plus scale,
    # zero point (4 B each per channel), a 4-D shape (4 * 8 B) and an empty guard tensor
    expected = dict(fp_bytes)
    for name, module in q.named_modules():
        if isinstance(module, QuantModuleMixin):
            out, *rest = module.weight_shape_tuple
            n = 1
            for d in rest:
                n *= d
            expected.pop(f"{name}.weight")
            expected[f"{name}.weight_packed"] = out * -(-n * bits // 32) * 4
            expected[f"{name}.weight_scale"] = out * 4
            expected[f"{name}.weight_zero_point"] = out * 4
            expected[f"{name}.weight_shape"] = 4 * 8
            expected[f"{name}.weight"] = 0
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        q_bytes = {k: f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()}
    assert q_bytes == expected
    weight_ratio = sum(v for k, v in q_bytes.items() if k.endswith("weight_packed")) / sum(
        v for k, v in fp_bytes.items() if k.endswith("convolution.weight")
    )
    fp_file = (tmp_path / "fp" / "model.safetensors").stat().st_size
    q_file = (tmp_path / "q" / "model.safetensors").stat().st_size
    print(f"W{bits}: packed/fp32 weight bytes {weight_ratio:.4f} (ideal {bits / 32:.4f}; rows of tiny convs pad to "
          f"whole 32-bit words), whole file {q_file / fp_file:.3f}")
    assert weight_ratio >= bits / 32
    # the file is the tensors plus a JSON header: within a few KB of the arithmetic
    assert abs(q_file - sum(q_bytes.values())) < 16_384 and abs(fp_file - sum(fp_bytes.values())) < 16_384


def test_digits_accuracy_rtn(digits_checkpoint, digits):
    fp = AutoModelForImageClassification.from_pretrained(digits_checkpoint)
    fp_top1 = hf_ptq.evaluate_model(fp, digits["test"])["top1"]
    results = {}
    for bits in (8, 4):
        q = AutoModelForImageClassification.from_pretrained(
            digits_checkpoint, quantization_config=PTQConfig(weight_bits=bits, weight_granularity="channel")
        )
        results[bits] = hf_ptq.evaluate_model(q, digits["test"])["top1"]
    print(f"digits top-1: fp {fp_top1:.4f}, RTN W8 {results[8]:.4f}, RTN W4 {results[4]:.4f}")
    assert fp_top1 > 0.97
    assert fp_top1 - results[8] <= 0.005
    assert fp_top1 - results[4] <= 0.03
