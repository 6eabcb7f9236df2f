"""Pure helpers of the benchmark matrix: setting parsing, PTQConfig mapping, cell selection, cache keys."""

from __future__ import annotations

import pytest

from benchmarks.matrix import (
    METHODS,
    MODEL_KEYS,
    QUICK_CELLS,
    SETTINGS,
    Cell,
    cell_key,
    full_cells,
    parse_setting,
    ptq_kwargs,
    quick_cells,
    size_ratio,
    source_hash,
)


@pytest.mark.parametrize(
    "text, w, a",
    [("W8A8", 8, 8), ("W4A32", 4, None), ("w3a32", 3, None), ("W2A4", 2, 4), (" W4A8 ", 4, 8)],
)
def test_parse_setting(text, w, a):
    s = parse_setting(text)
    assert (s.weight_bits, s.act_bits) == (w, a)
    assert s.needs_calibration == (a is not None)
    assert s.name == text.strip().upper()


@pytest.mark.parametrize("text", ["W4", "A8W4", "W5A32", "W4A16", "W4A", ""])
def test_parse_setting_rejects(text):
    with pytest.raises(ValueError, match="setting"):
        parse_setting(text)


def test_every_matrix_setting_parses():
    assert [parse_setting(s).name for s in SETTINGS] == list(SETTINGS)


def test_ptq_kwargs_weight_only_data_free_has_no_calibration():
    kw = ptq_kwargs("rtn", parse_setting("W4A32"), method_needs_data=False, calibration={"dataset": "x"})
    assert kw == {"method": "rtn", "weight_bits": 4, "act_bits": None}


def test_ptq_kwargs_activation_setting_gets_calibration():
    calib = {"dataset": "x", "num_samples": 1024, "seed": 0}
    kw = ptq_kwargs("rtn", parse_setting("W4A8"), method_needs_data=False, calibration=calib)
    assert kw["act_bits"] == 8 and kw["calibration"] is calib


def test_ptq_kwargs_calibrated_method_and_defaults():
    kw = ptq_kwargs("fpxint", parse_setting("W2A32"), method_needs_data=True, calibration={"dataset": "x"})
    assert kw["method_kwargs"] == {"terms": 2} and "calibration" in kw
    kw = ptq_kwargs("fpxint", parse_setting("W2A32"), method_needs_data=False, calibration=None, method_kwargs={})
    assert "method_kwargs" not in kw  # an explicit empty override drops the default


def test_ptq_kwargs_requires_data_when_needed():
    with pytest.raises(ValueError, match="calibration"):
        ptq_kwargs("brecq", parse_setting("W4A32"), method_needs_data=True, calibration=None)


def test_full_and_quick_cells():
    cells = full_cells()
    assert len(cells) == len(METHODS) * len(SETTINGS) * len(MODEL_KEYS) == 84
    assert len(set(cells)) == 84
    quick = quick_cells()
    assert set(quick) <= set(cells)
    assert len(quick) == len(QUICK_CELLS) * len(METHODS)
    assert {c.method for c in quick} == set(METHODS)  # every method appears, including unregistered ones
    assert quick_cells(models=("vit",), methods=("rtn",)) == [Cell("vit", "rtn", "W4A32")]


def test_size_ratio():
    assert size_ratio(250, 1000) == 0.25
    with pytest.raises(ValueError):
        size_ratio(1, 0)


def test_cell_key_changes_with_every_input():
    c = Cell("resnet", "rtn", "W4A32")
    base = cell_key(c, model_fingerprint="m", code_hash="h", method_kwargs=None)
    assert base == cell_key(c, model_fingerprint="m", code_hash="h", method_kwargs={})
    others = {
        cell_key(Cell("resnet", "rtn", "W2A32"), model_fingerprint="m", code_hash="h", method_kwargs=None),
        cell_key(c, model_fingerprint="m2", code_hash="h", method_kwargs=None),
        cell_key(c, model_fingerprint="m", code_hash="h2", method_kwargs=None),
        cell_key(c, model_fingerprint="m", code_hash="h", method_kwargs={"terms": 3}),
    }
    assert base not in others and len(others) == 4


def test_source_hash_tracks_content(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("x = 1\n")
    h1 = source_hash(pkg)
    assert h1 == source_hash(pkg)
    (pkg / "a.py").write_text("x = 2\n")
    assert source_hash(pkg) != h1
