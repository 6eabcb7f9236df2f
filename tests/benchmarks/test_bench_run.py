"""The run command's pure parts: method options and the rendered docs sections."""

from __future__ import annotations

import pytest

from benchmarks.matrix import DEFAULT_METHOD_KWARGS, QUICK_METHOD_KWARGS
from benchmarks.run import _method_kwargs, matrix_section, models_section

INFO = {"title": "ResNet (bottleneck)", "architecture": "ResNetForImageClassification", "params": 500714,
        "train": {"epochs": 10}, "train_seconds": 600.0, "torch_threads": 2, "fp_top1": 0.925, "target_top1": 0.92,
        "safetensors_bytes": 2_031_184, "fingerprint": "f", "trained_at": "2026-01-01 10:00:00 UTC"}  # fmt: skip
META = {"date": "2026-01-01 12:00 UTC", "commit": "abc1234", "dirty": True, "machine": "2 CPU cores (X), 23.5 GiB RAM",
        "python": "3.11.7", "torch": "2.13.0+cpu", "transformers": "5.23.0", "code_hash": "h",
        "method_kwargs": {"fpxint": {"terms": 2}}, "results_file": "matrix-full.json"}  # fmt: skip


def test_method_kwargs_defaults_quick_and_overrides():
    assert _method_kwargs([]) == DEFAULT_METHOD_KWARGS
    quick = _method_kwargs([], quick=True)
    assert quick["brecq"] == QUICK_METHOD_KWARGS["brecq"] and quick["fpxint"] == DEFAULT_METHOD_KWARGS["fpxint"]
    assert _method_kwargs(['brecq={}', 'fpxint={"terms": 3}'])["fpxint"] == {"terms": 3}
    assert _method_kwargs(["brecq={}"])["brecq"] == {}  # the paper's schedule (method defaults)
    with pytest.raises(SystemExit, match="METHOD=<JSON dict>"):
        _method_kwargs(["fpxint=terms:3"])


def test_matrix_section_names_command_commit_and_statuses():
    results = [
        {"model": "resnet", "method": "rtn", "setting": "W4A32", "status": "ok", "top1": 0.92, "drop": 0.005,
         "quant_seconds": 0.3, "peak_rss_mb": 520.0, "size_ratio": 0.166, "base_rss_mb": 500.0},
        {"model": "resnet", "method": "rtn", "setting": "W4A8", "status": "n/a", "reason": "NotImplementedError: later"},
        {"model": "resnet", "method": "comq", "setting": "W4A32", "status": "missing"},
        {"model": "resnet", "method": "comq", "setting": "W4A8", "status": "missing"},
    ]  # fmt: skip
    text = matrix_section(results, {"resnet": INFO}, META, ["rtn", "comq"], ["W4A32", "W4A8"],
                          "python -m benchmarks.run", {"accuracy vs bits": None})  # fmt: skip
    assert "`python -m benchmarks.run`" in text and "`abc1234` (with uncommitted changes" in text
    assert "| rtn | 92.00 (−0.50) | n/a [1] |" in text and "| comq | missing | missing |" in text
    assert "- [1] NotImplementedError: later" in text
    assert "1 measured, 2 missing, 1 n/a, 0 errors, 0 not run" in text
    assert "about 500 MB before quantization" in text
    assert "How the cells were computed" not in text  # no note given
    noted = matrix_section(results, {"resnet": INFO}, META | {"note": "three runs in parallel."}, ["rtn"], ["W4A32"],
                           "python -m benchmarks.run", {"accuracy vs bits": None})  # fmt: skip
    assert "How the cells were computed: three runs in parallel." in noted


def test_command_shows_a_note_as_an_ellipsis():
    from benchmarks.run import _command

    assert _command(["--cached-only", "--note", "long text", "--threads", "1"]) == (
        "python -m benchmarks.run --cached-only --note … --threads 1"
    )
    assert _command(["--note=long text"]) == "python -m benchmarks.run --note …"


def test_models_section_lists_every_model():
    text = models_section({"resnet": INFO})
    assert "**92.50**" in text and "`ResNetForImageClassification`" in text and "2026-01-01" in text


def test_cached_only_reports_uncomputed_cells_as_not_run(tmp_path, monkeypatch):
    """``--cached-only`` runs no cell: cached ones are reused, the others say ``not run`` with the fix."""
    import json

    import benchmarks.run as run_mod
    from benchmarks.matrix import Cell, cell_key

    monkeypatch.setenv("HF_PTQ_CACHE", str(tmp_path))
    info = INFO | {"fingerprint": "fp0"}
    monkeypatch.setattr("benchmarks.models.ensure_reference", lambda spec, dataset=None: (tmp_path, info))
    monkeypatch.setattr("benchmarks.data.load_benchmark_dataset", lambda install=False: None)
    monkeypatch.setattr(run_mod, "_run_child", lambda *a, **k: pytest.fail("--cached-only must not run cells"))
    from benchmarks.cell import CODE_ROOTS
    from benchmarks.matrix import source_hash

    done, todo = Cell("resnet", "rtn", "W4A32"), Cell("resnet", "rtn", "W2A32")
    cache = run_mod.cache_root() / "cells"
    cache.mkdir(parents=True)
    key = cell_key(done, model_fingerprint="fp0", code_hash=source_hash(*CODE_ROOTS), method_kwargs=None)
    (cache / f"{key}.json").write_text(json.dumps({"status": "ok", "top1": 0.9, "model": "resnet", "method": "rtn",
                                                   "setting": "W4A32"}))  # fmt: skip
    results, _ = run_mod.run_matrix([done, todo], threads=1, timeout=1, force=False, method_kwargs={}, cached_only=True)
    assert results[0]["status"] == "ok" and results[0]["cached"] is True
    assert results[1]["status"] == "not run" and "rerun without --cached-only" in results[1]["reason"]
