"""Block maps: the units of every supported architecture, and the per-layer fallback."""

from __future__ import annotations

import logging

from tiny_models import tiny_mobilenet, tiny_model

from hf_ptq.calibration.blocks import units_for
from hf_ptq.quant.replace import default_modules_to_not_convert, find_quantizable_layers


def _units(model, granularity="block"):
    layers = find_quantizable_layers(model, default_modules_to_not_convert(model))
    return units_for(model, list(layers), granularity), layers


def test_resnet_units_are_stem_and_residual_layers():
    units, layers = _units(tiny_model("resnet-basic"))
    assert [u.kind for u in units] == ["ResNetConvLayer", "ResNetBasicLayer", "ResNetBasicLayer", "ResNetBasicLayer"]
    assert [u.name for u in units][1:] == [
        "resnet.encoder.stages.0.layers.0", "resnet.encoder.stages.1.layers.0", "resnet.encoder.stages.1.layers.1",
    ]  # fmt: skip
    assert sorted(n for u in units for n in u.layer_names) == sorted(layers)  # every layer in exactly one unit


def test_vit_and_deit_units_are_encoder_layers():
    for name, prefix in (("vit", "vit"), ("deit", "deit")):
        units, _ = _units(tiny_model(name))
        assert [u.name for u in units] == [f"{prefix}.layers.0", f"{prefix}.layers.1"]
        assert len(units[0].layer_names) == 6  # q, k, v, o, fc1, fc2


def test_convnext_units_include_downsampling_and_stem():
    for name in ("convnext", "convnextv2"):
        units, _ = _units(tiny_model(name))
        kinds = [u.kind for u in units]
        assert kinds[0] == "Conv2d" and units[0].name.endswith("embeddings.patch_embeddings")
        assert units[2].name.endswith("stages.1.downsampling_layer.1")
        assert kinds.count("ConvNextLayer" if name == "convnext" else "ConvNextV2Layer") == 2


def test_swin_units_are_layers_and_patch_merging():
    units, _ = _units(tiny_model("swin"))
    assert [u.kind for u in units] == ["SwinPatchEmbeddings", "SwinLayer", "SwinPatchMerging", "SwinLayer"]


def test_unknown_architecture_falls_back_to_layers_with_warning(caplog):
    model = tiny_mobilenet()
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("hf_ptq").propagate = True
    with caplog.at_level(logging.WARNING, logger="hf_ptq"):
        units, layers = _units(model)
    assert len(units) == len(layers) and all(u.layer_names == [u.name] for u in units)
    assert "no block map for model_type='mobilenet_v2'" in caplog.text and "one unit per" in caplog.text


def test_layer_granularity_on_a_mapped_model():
    units, layers = _units(tiny_model("vit"), "layer")
    assert [u.name for u in units] == list(layers)
