"""The benchmark plots render from synthetic results, leaving gaps for unmeasured cells."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from benchmarks.plots import accuracy_plot, error_keys, unit_error_plot  # noqa: E402


def _results():
    units = [{"unit": "a.b.c.d.e", "weight_rel_error": 0.05}, {"unit": "b", "weight_rel_error": 0.08}]
    return [
        {"model": "resnet", "method": "rtn", "setting": "W4A32", "status": "ok", "top1": 0.91, "units": units},
        {"model": "resnet", "method": "rtn", "setting": "W2A32", "status": "ok", "top1": 0.60, "units": units},
        {"model": "resnet", "method": "rtn", "setting": "W4A8", "status": "n/a"},
        {"model": "resnet", "method": "comq", "setting": "W4A32", "status": "missing"},
    ]


def test_error_keys():
    units = _results()[0]["units"] + [{"unit": "c", "recon_error": 0.1, "loss_final": 3.0, "seconds": 2.0}]
    assert error_keys(units) == ["weight_rel_error", "recon_error"]


def test_plots_write_png(tmp_path):
    acc = accuracy_plot(_results(), {"resnet": 0.92}, ["rtn", "comq"], tmp_path / "acc.png", title="t")
    assert acc.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    units = unit_error_plot(_results(), ["resnet"], ["rtn", "comq"], "W2A32", tmp_path / "units.png")
    assert units is not None and units.stat().st_size > 1000
    assert unit_error_plot(_results(), ["resnet"], ["rtn"], "W4A8", tmp_path / "none.png") is None
