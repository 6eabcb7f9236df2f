"""Markdown formatting of the benchmark tables and the targeted edits of the shared docs file."""

from __future__ import annotations

import pytest

from benchmarks.report import (
    DOC_INTRO,
    _Notes,
    cell_text,
    detail_table,
    models_table,
    pct,
    pivot_table,
    replace_section,
    signed_pt,
    stored_weight_bits,
    update_doc,
)

OK = {"model": "resnet", "method": "rtn", "setting": "W4A32", "status": "ok", "top1": 0.9155, "drop": 0.0045,
      "quant_seconds": 0.42, "peak_rss_mb": 612.3, "size_ratio": 0.1875}  # fmt: skip


def test_number_formats():
    assert pct(0.91234) == "91.23" and pct(None) == "–"
    assert signed_pt(0.0045) == "−0.45"  # a drop shows as a negative change
    assert signed_pt(-0.001) == "+0.10"
    assert signed_pt(0.00001) == "±0.00"
    assert signed_pt(None) == "–"


def test_cell_text_statuses():
    notes = _Notes()
    assert cell_text(OK, notes) == "91.55 (−0.45)"
    assert cell_text({"status": "missing"}, notes) == "missing"
    na = {"status": "n/a", "reason": "ImportError: No module named 'x'\ntraceback..."}
    assert cell_text(na, notes) == "n/a [1]"
    assert cell_text(dict(na), notes) == "n/a [1]"  # same reason, same note
    assert cell_text({"status": "error", "reason": "boom"}, notes) == "error [2]"
    assert notes.legend() == "- [1] ImportError: No module named 'x'\n- [2] boom"
    assert cell_text(None) == "not run"


def test_pivot_and_detail_tables():
    results = [OK, {"model": "resnet", "method": "comq", "setting": "W4A32", "status": "missing"}]
    notes = _Notes()
    table = pivot_table(results, "resnet", ["rtn", "comq"], ["W4A32", "W2A32"], notes).splitlines()
    assert table[0] == "| method | W4A32 | W2A32 |"
    assert table[2] == "| rtn | 91.55 (−0.45) | not run |"
    assert table[3] == "| comq | missing | not run |"
    detail = detail_table(results, notes).splitlines()
    assert len(detail) == 3  # header, rule, the one measured cell (missing cells live in the pivots)
    assert detail[2] == "| resnet | rtn | W4A32 | 4 | 91.55 | −0.45 | 0.42 | 612 | 0.188 | ok |"


def test_stored_weight_bits():
    assert stored_weight_bits({"setting": "W2A4"}) == "2"
    assert stored_weight_bits({"setting": "W2A4", "weight_bits": 2, "method_kwargs": {"effective_bits": 4}}) == "4"


def test_models_table_flags_missed_targets():
    info = {"title": "ViT", "architecture": "ViTForImageClassification", "params": 306826, "train": {"epochs": 12},
            "train_seconds": 1500, "torch_threads": 2, "fp_top1": 0.871, "target_top1": 0.88,
            "safetensors_bytes": 1_240_000}  # fmt: skip
    row = models_table({"vit": info}).splitlines()[2]
    assert "**87.10** (below target)" in row and "| 307 k |" in row and "| 25.0 |" in row


def test_replace_section_keeps_other_text_byte_for_byte():
    text = "intro\n\n<!-- other:start -->\ntheirs\n<!-- other:end -->\n\n<!-- matrix:start -->\nold\n<!-- matrix:end -->\ntail\n"
    new = replace_section(text, "matrix", "new table")
    assert new == text.replace("old", "new table")
    appended = replace_section(text, "models", "models table")
    assert appended.startswith(text.rstrip("\n")) and appended.endswith("<!-- models:start -->\nmodels table\n<!-- models:end -->\n")


def test_replace_section_body_with_backslashes_is_literal():
    text = "<!-- matrix:start -->\nx\n<!-- matrix:end -->\n"
    assert "a\\1b" in replace_section(text, "matrix", "a\\1b")


def test_replace_section_refuses_broken_markers():
    with pytest.raises(ValueError, match="only one"):
        replace_section("<!-- matrix:start -->\nno end\n", "matrix", "x")
    with pytest.raises(ValueError, match="more than once"):
        replace_section("<!-- m:start --><!-- m:end --><!-- m:start --><!-- m:end -->", "m", "x")


def test_update_doc_creates_then_edits(tmp_path):
    path = tmp_path / "docs" / "benchmarks.md"
    update_doc(path, {"matrix": "v1"})
    assert path.read_text().startswith(DOC_INTRO)
    path.write_text(path.read_text() + "\n## someone else's section\n")
    update_doc(path, {"matrix": "v2", "models": "m"})
    text = path.read_text()
    assert "v1" not in text and "v2" in text and "## someone else's section" in text and text.count(DOC_INTRO) == 1
