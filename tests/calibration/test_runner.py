"""The sequential runner: inputs it hands to methods equal the model's own forward, offload parity."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_mobilenet, tiny_model
from transformers import AutoModelForImageClassification

from hf_ptq import PTQConfig, quantize_model
from hf_ptq.calibration.blocks import units_for
from hf_ptq.methods.base import PTQMethod, UnitResult, register_method
from hf_ptq.quant.modules import QuantModuleMixin
from hf_ptq.quant.replace import default_modules_to_not_convert, find_quantizable_layers
from hf_ptq.quant.scheme import rtn_quantize_weight

RECORDED: dict[str, list[torch.Tensor]] = {}


class _Recorder(PTQMethod):
    """RTN that records the first positional input of every unit it is given."""

    unit_granularity = "block"

    def quantize_unit(self, work):
        RECORDED[work.name] = [args[0].clone() for args, _ in work.inputs]
        return UnitResult(weights={n: rtn_quantize_weight(m.weight, work.schemes[n]) for n, m in work.layers.items()})


@register_method("test-record-fp")
class _RecordFP(_Recorder):
    input_mode = "fp"


@register_method("test-record-q")
class _RecordQ(_Recorder):
    input_mode = "quantized"


def _batches(n=3, bs=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, 3, 32, 32, generator=gen) for _ in range(n)]


def _unit_inputs(model, unit_names, batches):
    """Inputs of each unit in an ordinary forward of ``model`` (hooks, written independently)."""
    seen = {n: [] for n in unit_names}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach().clone()))
        for n in unit_names
    ]
    with torch.no_grad():
        for b in batches:
            model(pixel_values=b)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("arch", ["resnet-bottleneck", "vit", "swin", "convnext"])
def test_fp_mode_inputs_equal_float_forward(arch):
    model = tiny_model(arch)
    float_copy = copy.deepcopy(model)
    batches = _batches()
    RECORDED.clear()
    quantize_model(model, PTQConfig(method="test-record-fp", weight_bits=4, calibration={"dataset": batches, "batch_size": 4, "num_samples": 12}))
    units = list(RECORDED)
    expected = _unit_inputs(float_copy, units, batches)
    assert len(units) >= 2
    for name in units:
        assert len(RECORDED[name]) == len(batches)
        for got, want in zip(RECORDED[name], expected[name]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["resnet-basic", "vit", "swin", "convnext"])
def test_quantized_mode_inputs_equal_quantized_model_forward(arch):
    model = tiny_model(arch)
    float_copy = copy.deepcopy(model)
    batches = _batches(seed=1)
    RECORDED.clear()
    quantize_model(
        model, PTQConfig(method="test-record-q", weight_bits=3, act_bits=8, calibration={"dataset": batches, "batch_size": 4, "num_samples": 12})
    )
    units = list(RECORDED)
    expected_q = _unit_inputs(model, units, batches)  # the final quantized model's own forward
    expected_fp = _unit_inputs(float_copy, units, batches)
    for name in units:
        for got, want in zip(RECORDED[name], expected_q[name]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    later = units[-1]  # inputs really are the quantized chain, not the float one
    assert not torch.allclose(RECORDED[later][0], expected_fp[later][0], atol=1e-4)


def _make_weights_representable(model, bits=4):
    """Put every quantizable weight on its own min-max grid, so quantization is exactly the identity."""
    layers = find_quantizable_layers(model, default_modules_to_not_convert(model))
    with torch.no_grad():
        for m in layers.values():
            w = m.weight.reshape(m.weight.shape[0], -1)
            gen = torch.Generator().manual_seed(m.weight.numel())
            codes = torch.randint(0, 2**bits, w.shape, generator=gen).float()
            codes[:, 0], codes[:, 1] = 0, 2**bits - 1  # the grid spans exactly [min, max] (zero at code 8)
            m.weight.copy_(((codes - 8) * 2.0**-5).reshape(m.weight.shape))


@pytest.mark.parametrize("method", ["test-record-q", "test-record-fp"])
def test_identity_quantization_reproduces_float_forward_exactly(method):
    model = tiny_model("resnet-bottleneck")
    _make_weights_representable(model)
    batches = _batches(seed=2)
    with torch.no_grad():
        ref = [model(pixel_values=b).logits for b in batches]
    quantize_model(model, PTQConfig(method=method, weight_bits=4, calibration={"dataset": batches, "batch_size": 4, "num_samples": 12}))
    assert any(isinstance(m, QuantModuleMixin) for m in model.modules())
    with torch.no_grad():
        for b, r in zip(batches, ref):
            torch.testing.assert_close(model(pixel_values=b).logits, r, rtol=0, atol=1e-6)
    errors = [u["recon_error"] for u in model.hf_ptq_report["units"]]
    assert max(errors) < 1e-10


def test_report_has_before_and_after_errors():
    model = tiny_model("vit")
    quantize_model(model, PTQConfig(weight_bits=4, act_bits=8, calibration={"dataset": _batches(), "batch_size": 4, "num_samples": 12}))
    report = model.hf_ptq_report
    assert report["method"] == "rtn" and report["seconds"] > 0
    assert [u["unit"] for u in report["units"]] == ["vit.layers.0", "vit.layers.1"]
    for u in report["units"]:
        assert u["recon_error"] > 0 and u["recon_error_rtn"] > 0


def test_fallback_architecture_quantizes_with_activations():
    model = tiny_mobilenet()
    float_copy = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    calibration = {"dataset": _batches(n=1), "batch_size": 4, "num_samples": 4}
    quantize_model(model, PTQConfig(weight_bits=8, act_bits=8, act_observer="minmax", calibration=calibration))
    units = model.hf_ptq_report["units"]
    assert all(u["layers"] == [u["unit"]] for u in units) and len(units) > 10
    with torch.no_grad():
        out, ref = model(pixel_values=x).logits, float_copy(pixel_values=x).logits
    assert torch.allclose(out, ref, atol=0.2 * float(ref.abs().max()) + 1e-3)
    qmods = [m for m in model.modules() if isinstance(m, QuantModuleMixin)]
    assert qmods and all(float(m.input_scale) != 1.0 for m in qmods)  # every input quantizer was calibrated


def test_activation_ranges_come_from_observed_inputs():
    model = tiny_model("vit")
    float_copy = copy.deepcopy(model)
    batches = _batches(n=2)
    quantize_model(
        model,
        PTQConfig(weight_bits=8, act_bits=8, act_observer="minmax", calibration={"dataset": batches, "batch_size": 4, "num_samples": 12}),
    )
    # fc1 of layer 0 sees layernorm_after outputs; with min-max the grid must span exactly their range
    seen = []
    h = float_copy.vit.layers[0].mlp.fc1.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for b in batches:
            float_copy(pixel_values=b)
    h.remove()
    x = torch.cat(seen)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    q = model.vit.layers[0].mlp.fc1
    # observed on the weight-quantized model: the range matches the float one closely
    assert abs(float(q.input_scale) - (hi - lo) / 255) / ((hi - lo) / 255) < 0.05


def test_disk_offload_gives_the_same_quantized_weights(tmp_path):
    model = tiny_model("vit")
    model.save_pretrained(tmp_path / "fp")
    batches = _batches()

    def cfg():
        return PTQConfig(weight_bits=4, act_bits=8, calibration={"dataset": batches, "batch_size": 4, "num_samples": 12})

    in_memory = AutoModelForImageClassification.from_pretrained(tmp_path / "fp", quantization_config=cfg())
    offloaded = AutoModelForImageClassification.from_pretrained(
        tmp_path / "fp",
        quantization_config=cfg(),
        device_map={"vit.embeddings": "cpu", "vit.layers.0": "disk", "vit.layers.1": "disk", "vit.layernorm": "cpu",
                    "classifier": "cpu"},
        offload_folder=str(tmp_path / "offload"),
    )  # fmt: skip
    fc1 = offloaded.vit.layers[1].mlp.fc1
    assert isinstance(fc1, QuantModuleMixin) and fc1.weight_packed.device.type == "meta"  # still offloaded
    x = batches[0]
    with torch.no_grad():
        torch.testing.assert_close(offloaded(pixel_values=x).logits, in_memory(pixel_values=x).logits, rtol=0, atol=1e-6)
    in_memory.save_pretrained(tmp_path / "a")
    offloaded.save_pretrained(tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_units_cover_all_layers_once():
    model = tiny_model("swin")
    layers = find_quantizable_layers(model, default_modules_to_not_convert(model))
    names = [n for u in units_for(model, list(layers)) for n in u.layer_names]
    assert sorted(names) == sorted(layers) and len(set(names)) == len(names)


def test_selected_layer_inputs_stay_float_and_reload(tmp_path):
    model = tiny_model("vit")
    model.save_pretrained(tmp_path / "fp")
    cfg = PTQConfig(
        weight_bits=4,
        act_bits=8,
        act_modules_to_not_convert=["mlp.fc2"],
        calibration={"dataset": _batches(n=1), "batch_size": 4, "num_samples": 4},
    )
    q = AutoModelForImageClassification.from_pretrained(tmp_path / "fp", quantization_config=cfg)
    for layer in q.vit.layers:
        assert layer.mlp.fc2.scheme.act_bits is None and not hasattr(layer.mlp.fc2, "input_scale")
        assert layer.mlp.fc1.scheme.act_bits == 8 and hasattr(layer.mlp.fc1, "input_scale")
    x = torch.randn(2, 3, 32, 32)
    # fc2 really runs on the float GELU output: feeding it unquantized input gives the same result
    fc2 = q.vit.layers[0].mlp.fc2
    h = torch.randn(3, fc2.in_features)
    torch.testing.assert_close(fc2(h), torch.nn.functional.linear(h, fc2.dequantized_weight(), fc2.bias))
    q.save_pretrained(tmp_path / "q")
    again = AutoModelForImageClassification.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(again(pixel_values=x).logits, q(pixel_values=x).logits)
