"""Calibration data: sources, determinism, and a clear error for every bad input."""

from __future__ import annotations

import logging

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from hf_ptq import CalibrationConfig, PTQConfig
from hf_ptq.calibration.data import calibration_batches, find_image_column

PROCESSOR = ViTImageProcessorPil(size={"height": 16, "width": 16})


def _image_dataset(n=20, seed=0):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)) for _ in range(n)]
    return datasets.Dataset.from_dict(
        {"img": images, "label": [i % 3 for i in range(n)]},
        features=datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)}),
    )


def test_dataset_source_is_deterministic_and_batched():
    ds = _image_dataset()
    spec = CalibrationConfig(dataset=ds, num_samples=10, batch_size=4, seed=5)
    a = calibration_batches(spec, image_processor=PROCESSOR)
    b = calibration_batches(spec, image_processor=PROCESSOR)
    assert [x.shape[0] for x in a] == [4, 4, 2] and a[0].shape[1:] == (3, 16, 16)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = calibration_batches(CalibrationConfig(dataset=ds, num_samples=10, batch_size=4, seed=6), image_processor=PROCESSOR)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))  # another seed picks other images


def test_preprocessing_equals_the_processor_on_the_chosen_rows():
    ds = _image_dataset(n=6)
    batches = calibration_batches(CalibrationConfig(dataset=ds, num_samples=6, batch_size=6), image_processor=PROCESSOR)
    expected = PROCESSOR([ds[i]["img"] for i in range(6)], return_tensors="pt")["pixel_values"]
    assert torch.equal(batches[0], expected)  # all rows, in index order


def test_augmentation_changes_images_deterministically():
    ds = _image_dataset(n=8)
    spec = CalibrationConfig(dataset=ds, num_samples=8, batch_size=8, augment=True, seed=1)
    a, b = calibration_batches(spec, image_processor=PROCESSOR), calibration_batches(spec, image_processor=PROCESSOR)
    plain = calibration_batches(CalibrationConfig(dataset=ds, num_samples=8, batch_size=8, seed=1), image_processor=PROCESSOR)
    assert torch.equal(a[0], b[0]) and a[0].shape == plain[0].shape
    assert not torch.equal(torch.sort(a[0].flatten()).values, torch.sort(plain[0].flatten()).values)


def test_local_image_folder(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (10, 10), color=(i * 40, 0, 0)).save(tmp_path / "train" / cls / f"{i}.png")
    batches = calibration_batches(CalibrationConfig(dataset=str(tmp_path), num_samples=6, batch_size=4), image_processor=PROCESSOR)
    assert sum(b.shape[0] for b in batches) == 6


def test_iterables_of_tensors_dicts_and_tuples():
    tensors = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    for source in (tensors, [{"pixel_values": t} for t in tensors], [(t, torch.zeros(4)) for t in tensors]):
        batches = calibration_batches(CalibrationConfig(dataset=source, num_samples=10, batch_size=5))
        assert [b.shape[0] for b in batches] == [5, 5]
        assert torch.equal(torch.cat(batches), torch.cat(tensors)[:10])


def test_num_samples_larger_than_dataset_warns_and_uses_all(caplog):
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("hf_ptq").propagate = True
    with caplog.at_level(logging.WARNING, logger="hf_ptq"):
        batches = calibration_batches(CalibrationConfig(dataset=_image_dataset(n=5), num_samples=50, batch_size=4), image_processor=PROCESSOR)
    assert sum(b.shape[0] for b in batches) == 5
    assert "larger than the dataset (5 rows); using all 5" in caplog.text


def test_missing_image_column_lists_columns():
    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    with pytest.raises(ValueError, match=r"no image column found; columns: text \(Value\), label \(Value\)"):
        calibration_batches(CalibrationConfig(dataset=ds, num_samples=2), image_processor=PROCESSOR)


def test_named_non_image_column_says_how_to_fix():
    ds = _image_dataset(n=3)
    with pytest.raises(ValueError, match=r"column 'label' holds ClassLabel, not images.*cast_column"):
        find_image_column(ds, "label")
    with pytest.raises(ValueError, match=r"image_column='photo' is not a column"):
        find_image_column(ds, "photo")


def test_empty_dataset():
    ds = _image_dataset(n=3).select([])
    with pytest.raises(ValueError, match="empty"):
        calibration_batches(CalibrationConfig(dataset=ds, num_samples=2), image_processor=PROCESSOR)


def test_wrong_types():
    with pytest.raises(ValueError, match=r"calibration.dataset.*unsupported type int"):
        PTQConfig(act_bits=8, calibration={"dataset": 3})
    with pytest.raises(ValueError, match=r"calibration.num_samples"):
        PTQConfig(act_bits=8, calibration={"dataset": "x", "num_samples": 0})
    with pytest.raises(ValueError, match=r"calibration iterable yielded str"):
        calibration_batches(CalibrationConfig(dataset=["not", "tensors"], num_samples=2))
    with pytest.raises(ValueError, match="yielded no data"):
        calibration_batches(CalibrationConfig(dataset=iter([]), num_samples=2))


def test_missing_image_processor_says_how_to_pass_one(tmp_path):
    class NoProcessorModel(torch.nn.Module):
        name_or_path = str(tmp_path)

    with pytest.raises(ValueError, match=r"could not load an image processor.*image_processor="):
        calibration_batches(CalibrationConfig(dataset=_image_dataset(n=2), num_samples=2), model=NoProcessorModel())
