"""``hf-ptq`` end to end on the embedded digits model, and its exit-code contract."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForImageClassification

import hf_ptq  # noqa: F401  (registers the quantizer for the reloads below)
from fake_hub import FakeHub
from hf_ptq.cli import EXIT_FAILURE, EXIT_OK, EXIT_UPLOAD, EXIT_USAGE, main
from hf_ptq.quickstart import digits_image_processor

REPO = Path(__file__).resolve().parent.parent


@torch.no_grad()
def _top1(model, split) -> float:
    """Top-1 with a plain torch loop (independent of hf_ptq.evaluate_model)."""
    model.eval()
    pixels = digits_image_processor()(list(split["image"]), return_tensors="pt")["pixel_values"]
    labels = torch.tensor(split["label"])
    return (model(pixel_values=pixels).logits.argmax(-1) == labels).sum().item() / len(labels)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, digits_checkpoint):
    """`python -m hf_ptq.cli quantize digits-resnet-rtn-w4` in a subprocess, as a user would run it."""
    cwd = tmp_path_factory.mktemp("cli")
    proc = subprocess.run(
        [sys.executable, "-m", "hf_ptq.cli", "quantize", "digits-resnet-rtn-w4", "--output-dir", "out"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return proc, cwd / "out"


def test_quantize_evaluate_save_end_to_end(cli_run, digits, digits_checkpoint):
    proc, out = cli_run
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    fp = _top1(AutoModelForImageClassification.from_pretrained(digits_checkpoint), digits["test"])
    quantized = AutoModelForImageClassification.from_pretrained(out)
    q = _top1(quantized, digits["test"])
    assert quantized.config.quantization_config.weight_bits == 4
    # the summary table: FP vs quantized top-1, size, time
    assert "hf-ptq summary: digits-resnet-rtn-w4 (top-1 on builtin:digits [test], 359 images)" in proc.stdout
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith(("float ", "rtn "))}
    assert f"{100 * fp:.2f} %" in rows["float"] and "MiB" in rows["float"]
    assert f"{100 * q:.2f} %" in rows["rtn"] and f"{100 * (q - fp):+.2f} pt" in rows["rtn"]
    assert f"saved: {out}" in proc.stdout
    assert "hf-ptq: quantizing with rtn W4A32" in proc.stderr and "evaluating" in proc.stderr  # progress
    # the folder: card with the measured numbers, recipe beside it
    card = ModelCard.load(out / "README.md")
    values = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert values == {"Top-1 accuracy": round(q, 6), "Top-1 accuracy (float base model)": round(fp, 6)}
    assert (out / "recipe.yaml").read_text() == (REPO / "recipes" / "digits-resnet-rtn-w4.yaml").read_text()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "hf_ptq"


def test_evaluate_command_reports_the_same_top1(cli_run, digits, capsys):
    _, out = cli_run
    assert main(["evaluate", str(out), "--dataset", "builtin:digits", "--json", "-q"]) == EXIT_OK
    result = json.loads(capsys.readouterr().out)
    expected = _top1(AutoModelForImageClassification.from_pretrained(out), digits["test"])
    assert result["top1"] == pytest.approx(expected, abs=1e-12)
    assert (result["quantized"], result["num_samples"], result["split"]) == (True, 359, "test")


def test_quantize_then_failed_push_exits_3_and_keeps_the_checkpoint(tmp_path, capsys, digits_checkpoint):
    out = tmp_path / "pushed"
    with FakeHub(fail={"commit": 403}).installed() as hub:
        code = main(["quantize", "digits-resnet-rtn-w4", "-o", str(out), "--no-eval", "-q",
                     "--push-to-hub", "me/digits", "--private", "--token", "hf_t"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == EXIT_UPLOAD
    assert "hf-ptq summary" in captured.out  # the work done is reported before the upload error
    assert "failed while uploading the files" in captured.err and f"The local checkpoint {out} is intact" in captured.err
    assert hub.repos == {"me/digits": {"visibility": "private"}}
    reloaded = AutoModelForImageClassification.from_pretrained(out)
    assert reloaded.config.quantization_config.method == "rtn"


def test_push_command(cli_run, capsys):
    _, out = cli_run
    with FakeHub().installed() as hub:
        code = main(["push", str(out), "me/digits-w4", "--revision", "w4", "--commit-message", "hello", "--token", "hf_t"])
    assert code == EXIT_OK
    assert capsys.readouterr().out.startswith("pushed: https://huggingface.co/me/digits-w4/commit/")
    assert (hub.commits[0].revision, hub.commits[0].summary) == ("w4", "hello")
    assert set(hub.commits[0].files) == {p.name for p in out.iterdir()}


def test_failed_push_command_exits_3(cli_run, capsys):
    _, out = cli_run
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with FakeHub(fail={"create": 401}).installed():
        assert main(["push", str(out), "me/x", "--token", "bad"]) == EXIT_UPLOAD
    err = capsys.readouterr().err
    assert "401" in err and "hf auth login" in err and "is intact" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# -- help, listing and exit codes --------------------------------------------------------------------------
def test_help_shows_examples_and_exit_codes(capsys):
    assert main(["--help"]) == EXIT_OK
    text = capsys.readouterr().out
    assert "examples:" in text and "hf-ptq quantize digits-resnet-rtn-w4" in text
    assert "0 ok, 1 runtime failure, 2 usage/validation error, 3 upload failed" in text
    for command in ("quantize", "evaluate", "push", "recipes"):
        assert main([command, "--help"]) == EXIT_OK
        assert "examples:" in capsys.readouterr().out


def test_recipes_command(capsys):
    assert main(["recipes"]) == EXIT_OK
    listing = capsys.readouterr().out
    for path in (REPO / "recipes").glob("*.yaml"):
        assert path.stem in listing
    assert main(["recipes", "digits-resnet-rtn-w4"]) == EXIT_OK
    assert capsys.readouterr().out == (REPO / "recipes" / "digits-resnet-rtn-w4.yaml").read_text()
    rows = (main(["recipes", "--json"]), json.loads(capsys.readouterr().out))[1]
    assert {r["name"]: r["status"] for r in rows}["digits-resnet-rtn-w4"] == "ok"


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required"),
        (["quantize"], "RECIPE"),
        (["quantize", "no-such-recipe"], "neither a file nor a shipped recipe"),
        (["quantize", "digits-resnet-rtn-w4", "--set", "weight_bits=5"], "Allowed values: 2, 3, 4 or 8"),
        (["quantize", "digits-resnet-rtn-w4", "--set", "weight_bits"], "expected KEY=VALUE"),
        (["quantize", "digits-resnet-rtn-w4", "--push-to-hub", "not a repo"], "namespace/name"),
        (["evaluate", "x", "--dataset", "builtin:mnist"], "'digits' or 'fashion-mnist'"),
        (["evaluate", "./missing-folder", "--dataset", "builtin:digits"], "does not exist"),
        (["recipes", "nope"], "no shipped recipe"),
    ],
    ids=["no command", "no recipe", "unknown recipe", "bad value", "bad --set", "bad repo id", "bad dataset",
         "missing model", "unknown recipe name"],  # fmt: skip
)
def test_usage_errors_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_existing_output_exits_2_without_touching_it(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["quantize", "digits-resnet-rtn-w4", "-o", str(tmp_path / "out"), "-q"]) == EXIT_USAGE
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_push_of_a_non_checkpoint_exits_2(tmp_path, digits_checkpoint, capsys):
    folder = shutil.copytree(digits_checkpoint, tmp_path / "float")
    with FakeHub().installed() as hub:
        assert main(["push", str(folder), "me/x", "--token", "t"]) == EXIT_USAGE
    assert "not an hf_ptq checkpoint" in capsys.readouterr().err and hub.requests == []


def test_runtime_failure_exits_1(tmp_path, digits_checkpoint, capsys):
    folder = shutil.copytree(digits_checkpoint, tmp_path / "broken")
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["evaluate", str(folder), "--dataset", "builtin:digits", "-q"]) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert err.startswith("hf-ptq: error: ") and "--debug" in err
