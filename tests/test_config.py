"""PTQConfig validation messages and exact serialization round trips."""

from __future__ import annotations

import json

import pytest

from hf_ptq import PTQConfig
from hf_ptq.config import FORMAT_VERSION


@pytest.mark.parametrize(
    "kwargs, field, allowed",
    [
        (dict(weight_bits=0), "weight_bits", "2, 3, 4 or 8"),
        (dict(weight_bits=1), "weight_bits", "2, 3, 4 or 8"),
        (dict(weight_bits=5), "weight_bits", "2, 3, 4 or 8"),
        (dict(weight_bits=16), "weight_bits", "2, 3, 4 or 8"),
        (dict(weight_bits="4"), "weight_bits", "2, 3, 4 or 8"),
        (dict(weight_bits=True), "weight_bits", "2, 3, 4 or 8"),
        (dict(act_bits=16), "act_bits", "4 or 8"),
        (dict(method="gptq"), "method", "'rtn'"),
        (dict(weight_granularity="group"), "weight_granularity", "'channel' or 'tensor'"),
        (dict(weight_observer="max"), "weight_observer", "'minmax' or 'mse'"),
        (dict(act_observer="kl"), "act_observer", "'minmax', 'percentile' or 'mse'"),
        (dict(modules_to_not_convert="classifier"), "modules_to_not_convert", "list of module names"),
        (dict(modules_to_not_convert=[1, 2]), "modules_to_not_convert", "list of module names"),
    ],
)
def test_invalid_field_names_field_value_and_allowed(kwargs, field, allowed):
    with pytest.raises(ValueError) as err:
        PTQConfig(**kwargs)
    message = str(err.value)
    value = next(iter(kwargs.values()))
    assert f"`{field}`" in message
    assert repr(value) in message
    assert allowed in message


def test_unknown_argument_lists_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown argument\(s\) `bits`.*Allowed arguments: method, weight_bits"):
        PTQConfig(bits=4)


def test_unknown_method_kwarg():
    with pytest.raises(ValueError, match=r"method_kwargs \(method='rtn'\): unknown argument `sweeps`=3"):
        PTQConfig(method_kwargs={"sweeps": 3})


def test_act_bits_without_calibration_says_how_to_fix():
    with pytest.raises(ValueError, match=r"`calibration` is required by static activation quantization.*calibration="):
        PTQConfig(act_bits=8)


def test_positional_arguments_are_refused():
    with pytest.raises(TypeError):
        PTQConfig("rtn")  # keyword-only, like transformers' configs


def test_other_format_version_is_refused_with_fix():
    with pytest.raises(ValueError, match=r"storage format 999.*reads format"):
        PTQConfig.from_dict({**PTQConfig().to_dict(), "format_version": 999})


def test_dict_and_json_round_trip_exact():
    cfg = PTQConfig(
        method="rtn",
        weight_bits=3,
        weight_granularity="tensor",
        weight_symmetric=True,
        weight_observer="mse",
        act_bits=8,
        act_observer="percentile",
        modules_to_not_convert=["classifier", "re:.*fc2"],
        calibration={"dataset": "some/dataset", "split": "validation", "num_samples": 64, "seed": 3},
        seed=7,
    )
    data = cfg.to_dict()
    assert data["quant_method"] == "hf_ptq" and data["format_version"] == FORMAT_VERSION
    again = PTQConfig.from_dict(json.loads(cfg.to_json_string()))
    assert again.to_dict() == data
    assert again == cfg


def test_in_memory_calibration_dataset_is_described_not_serialized():
    cfg = PTQConfig(act_bits=8, calibration={"dataset": [[0.0]] * 5})
    desc = cfg.to_dict()["calibration"]["dataset"]
    assert desc.startswith("<in-memory builtins.list") and "5 rows" in desc
    json.dumps(cfg.to_dict())  # always JSON-serializable
