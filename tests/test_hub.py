"""Model card, atomic save and Hub upload of a quantized checkpoint (digits ResNet, RTN W4; no network)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import httpx2
import pytest
import torch
import transformers
import yaml
from huggingface_hub import ModelCard
from transformers import AutoModelForImageClassification

import hf_ptq
from fake_hub import FakeHub
from hf_ptq.hub import HubUploadError, push_to_hub, save_quantized
from hf_ptq.quickstart import digits_image_processor

EVAL = {"dataset": "digits", "split": "test", "quantized_top1": 0.9721, "fp_top1": 0.9889, "num_samples": 359}
RECIPE_TEXT = "model: builtin:digits-resnet\ndataset: builtin:digits\nmethod: rtn\nweight_bits: 4\n"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, digits_checkpoint):
    """A copy of the digits checkpoint whose own card says `license: mit` (to be carried over)."""
    folder = tmp_path_factory.mktemp("base") / "digits-base"
    shutil.copytree(digits_checkpoint, folder)
    (folder / "README.md").write_text("---\nlicense: mit\ntags: [digits]\n---\n# digits base\n")
    return folder


@pytest.fixture(scope="module")
def quantized(base_dir):
    return AutoModelForImageClassification.from_pretrained(
        base_dir, quantization_config=hf_ptq.PTQConfig(method="rtn", weight_bits=4)
    ).eval()


@pytest.fixture(scope="module")
def pixels(digits):
    return digits_image_processor()(list(digits["test"][:48]["image"]), return_tensors="pt")["pixel_values"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, quantized):
    out = tmp_path_factory.mktemp("saved") / "digits-rtn-w4"
    return save_quantized(
        quantized,
        out,
        image_processor=digits_image_processor(),
        eval_results=EVAL,
        recipe=RECIPE_TEXT,
        base_model="someone/digits-resnet",
    )


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# -- the card ------------------------------------------------------------------------------------------
def test_card_metadata_parses_and_carries_the_fields(saved):
    card = ModelCard.load(saved / "README.md")
    data = card.data
    assert data.base_model == "someone/digits-resnet"
    assert data.to_dict()["base_model_relation"] == "quantized"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-classification"
    assert data.license == "mit"  # carried over from the base model's own card
    assert {"hf-ptq", "rtn", "w4a32"} <= set(data.tags)
    results = {r.metric_name: r for r in data.eval_results}
    assert set(results) == {"Top-1 accuracy", "Top-1 accuracy (float base model)"}
    q, fp = results["Top-1 accuracy"], results["Top-1 accuracy (float base model)"]
    assert (q.metric_value, fp.metric_value) == (EVAL["quantized_top1"], EVAL["fp_top1"])
    for r in (q, fp):
        assert (r.task_type, r.dataset_type, r.dataset_split, r.metric_type) == ("image-classification", "digits", "test", "accuracy")
    raw = yaml.safe_load(card.content.split("---")[1])  # the model-index block itself, as the Hub reads it
    assert raw["model-index"][0]["results"][0]["dataset"] == {"name": "digits", "type": "digits", "split": "test"}


def test_card_body_says_what_was_done(saved, quantized):
    text = (saved / "README.md").read_text()
    assert "import hf_ptq" in text.split("from_pretrained")[0]  # the plugin import comes before loading
    for needle in (
        "| method | `rtn` |",
        "| weight bits | 4 |",
        "| weight granularity | per-channel |",
        "| calibration data | none (data-free) |",
        f"hf_ptq {hf_ptq.__version__}",
        f"transformers {transformers.__version__}",
        "97.21 %",
        "98.89 %",
        "-1.68 pt",
        RECIPE_TEXT.strip(),
        "![per-unit reconstruction error](reconstruction_errors.png)",
    ):
        assert needle in text, needle
    units = quantized.hf_ptq_report["units"]
    assert len(units) == len(quantized.config.quantization_config.quantized_modules)
    for unit in units:  # one table row per unit, with the error the quantizer measured
        row = next(line for line in text.splitlines() if f"| `{unit['unit']}` |" in line)
        assert f"{unit['weight_rel_error']:.4g}" in row


def test_folder_contents(saved):
    names = {p.name for p in saved.iterdir()}
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json", "recipe.yaml",
            "hf_ptq_report.json", "reconstruction_errors.png"} <= names  # fmt: skip
    assert (saved / "reconstruction_errors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (saved / "recipe.yaml").read_text() == RECIPE_TEXT
    report = json.loads((saved / "hf_ptq_report.json").read_text())
    assert report["method"] == "rtn" and report["evaluation"]["fp_top1"] == EVAL["fp_top1"]
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_saved_checkpoint_reloads_bitwise(saved, quantized, pixels):
    reloaded = AutoModelForImageClassification.from_pretrained(saved).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixels).logits, quantized(pixel_values=pixels).logits)


def test_card_without_evaluation_or_report(tmp_path, quantized):
    """A reloaded model has no per-unit report; the card says so and has no model-index."""
    folder = save_quantized(quantized, tmp_path / "a", license="apache-2.0")
    reloaded = AutoModelForImageClassification.from_pretrained(folder)
    out = save_quantized(reloaded, tmp_path / "b")
    card = ModelCard.load(out / "README.md")
    assert card.data.eval_results is None and "model-index" not in card.content
    assert "No evaluation was run" in card.content and "No per-unit report" in card.content
    assert not (out / "reconstruction_errors.png").exists()


def test_float_model_is_refused(tmp_path, digits_checkpoint):
    model = AutoModelForImageClassification.from_pretrained(digits_checkpoint)
    with pytest.raises(ValueError, match="not quantized by hf_ptq"):
        save_quantized(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# -- atomic save ---------------------------------------------------------------------------------------
def test_existing_folder_needs_overwrite(tmp_path, quantized, saved):
    target = shutil.copytree(saved, tmp_path / "ckpt")
    before = _digest(target)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_quantized(quantized, target)
    assert _digest(target) == before


def test_overwrite_replaces_the_folder(tmp_path, quantized, saved):
    target = shutil.copytree(saved, tmp_path / "ckpt")
    (target / "stale.txt").write_text("from an older save")
    save_quantized(quantized, target, overwrite=True, license="apache-2.0")
    assert not (target / "stale.txt").exists()
    assert ModelCard.load(target / "README.md").data.license == "apache-2.0"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no backup or temp folder left


def test_a_crash_while_saving_leaves_the_old_checkpoint(tmp_path, quantized, saved, monkeypatch):
    target = shutil.copytree(saved, tmp_path / "ckpt")
    before = _digest(target)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("hf_ptq.hub.build_model_card", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_quantized(quantized, target, overwrite=True)
    with pytest.raises(RuntimeError, match="disk full"):
        save_quantized(quantized, tmp_path / "new")
    assert _digest(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # nothing half-written


def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(tmp_path, quantized):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="no config.json"):
        save_quantized(quantized, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


# -- upload through the real huggingface_hub client ------------------------------------------------------
def test_push_folder_records_upload_that_reloads_bitwise(tmp_path, saved, quantized, pixels):
    with FakeHub().installed() as hub:
        info = push_to_hub(saved, "me/digits-rtn-w4", private=True, token="hf_explicit", commit_message="W4 digits")
    assert info.commit_url.startswith("https://huggingface.co/me/digits-rtn-w4/commit/")
    assert hub.repos == {"me/digits-rtn-w4": {"visibility": "private"}}
    assert [r for r in hub.routes() if r != "other"] == ["create", "validate", "preupload", "commit"]
    assert all(auth == "Bearer hf_explicit" for _, path, auth, _ in hub.requests if path.startswith("/api/") and "harness" not in path)
    (commit,) = hub.commits
    assert (commit.repo_id, commit.revision, commit.summary) == ("me/digits-rtn-w4", "main", "W4 digits")
    assert set(commit.files) == {p.name for p in saved.iterdir()}
    assert hub.validated_yaml == [(saved / "README.md").read_text()]
    remote = hub.materialize(tmp_path / "remote")
    assert _digest(remote) == _digest(saved)
    reloaded = AutoModelForImageClassification.from_pretrained(remote).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixels).logits, quantized(pixel_values=pixels).logits)
    assert ModelCard.load(remote / "README.md").data.base_model == "someone/digits-resnet"


def test_push_to_a_branch_with_the_env_token(saved, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    with FakeHub().installed() as hub:
        push_to_hub(saved, "org/model", revision="w4")
    assert ("org/model", "w4") in hub.branches
    assert hub.commits[0].revision == "w4"
    assert hub.repos["org/model"] == {"visibility": None}  # private=None leaves visibility to the Hub
    assert {auth for _, path, auth, _ in hub.requests if "harness" not in path} == {"Bearer hf_from_env"}


def test_push_as_pull_request(saved):
    with FakeHub().installed() as hub:
        info = push_to_hub(saved, "org/model", create_pr=True, token="t", commit_message="W4 variant")
    assert hub.pull_requests == [("org/model", "W4 variant")]
    assert hub.commits[0].revision == "refs/pr/1" and info.pr_url.endswith("org/model/discussions/1")
    with pytest.raises(ValueError, match="do not pass revision"):
        push_to_hub(saved, "org/model", create_pr=True, revision="dev")


def test_push_a_model_object(tmp_path, quantized):
    with FakeHub().installed() as hub:
        push_to_hub(quantized, "me/direct", token="t", save_directory=tmp_path / "kept", eval_results=EVAL)
    assert set(hub.commits[0].files) == {p.name for p in (tmp_path / "kept").iterdir()}
    card = hub.commits[0].files["README.md"].decode()
    assert 'from_pretrained("me/direct")' in card  # the card's snippet names the repo it was pushed to


@pytest.mark.parametrize(
    "fail, hint",
    [
        ({"commit": 403}, "cannot write to 'me'"),
        ({"create": 401}, "hf auth login"),
        ({"preupload": 400}, "The reason given by the Hub is quoted above"),
        ({"create": httpx2.ConnectError("no route to host")}, "could not be reached"),
    ],
    ids=["forbidden", "unauthorized", "bad request", "offline"],
)
def test_failed_upload_leaves_the_checkpoint_and_says_why(tmp_path, saved, fail, hint):
    folder = shutil.copytree(saved, tmp_path / "ckpt")
    before = _digest(folder)
    with FakeHub(fail=fail).installed() as hub, pytest.raises(HubUploadError) as info:
        push_to_hub(folder, "me/x", token="t")
    message = str(info.value)
    assert hint in message
    assert f"The local checkpoint {folder} is intact" in message and f"hf-ptq push {folder} me/x" in message
    route, status = next(iter(fail.items()))
    if isinstance(status, int):  # the Hub's own reason and status are quoted
        assert f"(HTTP {status})" in message and f"fake hub: {route} refused with {status}" in message
    else:
        assert "no route to host" in message
    assert _digest(folder) == before
    assert hub.commits == []


def test_failed_push_of_a_model_keeps_the_staged_folder(quantized, pixels):
    with FakeHub(fail={"commit": 403}).installed(), pytest.raises(HubUploadError) as info:
        push_to_hub(quantized, "me/x", token="t")
    staged = info.value.folder
    assert str(staged) in str(info.value) and (staged / "README.md").is_file()
    reloaded = AutoModelForImageClassification.from_pretrained(staged).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixels).logits, quantized(pixel_values=pixels).logits)
    shutil.rmtree(staged.parent)


@pytest.mark.parametrize(
    "prepare, match",
    [
        (lambda d: shutil.rmtree(d), "is not a folder"),
        (lambda d: (d / "README.md").unlink(), "no README.md model card"),
        (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "resnet"})), "not an hf_ptq checkpoint"),
    ],
    ids=["missing", "no card", "float checkpoint"],
)
def test_push_refuses_folders_that_are_not_hf_ptq_checkpoints(tmp_path, saved, prepare, match):
    folder = shutil.copytree(saved, tmp_path / "ckpt")
    prepare(folder)
    with FakeHub().installed() as hub, pytest.raises((ValueError, FileNotFoundError), match=match):
        push_to_hub(folder, "me/x", token="t")
    assert hub.requests == []


def test_card_states_calibration_and_format_tags():
    """Card fields for a calibrated W4A8 config and a multi-term (FP=xINT-style) layer, without a model."""
    from hf_ptq.card import build_model_card

    config = hf_ptq.PTQConfig(
        method="rtn",
        weight_bits=4,
        act_bits=8,
        calibration={"dataset": "someone/calib-images", "num_samples": 64, "batch_size": 16, "seed": 3},
        quantized_modules={"a": {}, "b": {"terms": 2}},
    )
    card = build_model_card(config, base_model="org/base", license="apache-2.0", calibration_dataset="someone/calib-images")
    data = card.data
    assert {"w4x2a8", "rtn", "4-bit"} <= set(data.tags)
    assert data.datasets == ["someone/calib-images"]
    for needle in (
        "| calibration data | someone/calib-images, split `train` |",
        "| calibration size / seed | 64 images, batch 16, seed 3 |",
        "| activations | 8 bit, static per-tensor, asymmetric, mse observer |",
        "| weight bits | 4 x 2 terms (8 effective bits) |",
        "| quantized layers | 2 |",
        "[`org/base`](https://huggingface.co/org/base)",
    ):
        assert needle in card.content, needle
