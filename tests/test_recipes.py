"""Recipe schema: shipped recipes validate, bad recipes are rejected with file, line, key path and allowed values."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from hf_ptq.recipes import RecipeError, load_recipe, parse_recipe, shipped_recipes, shipped_recipes_dir

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"

VALID = {
    "model": "builtin:digits-resnet",
    "dataset": "builtin:digits",
    "method": "rtn",
    "weight_bits": 4,
    "evaluation": {"split": "test"},
    "output": {"dir": "out"},
}


def _write(tmp_path: Path, data, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _with(**changes):
    data = copy.deepcopy(VALID)
    for dotted, value in changes.items():
        parts = dotted.split("__")
        target = data
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        if value is _DELETE:
            target.pop(parts[-1])
        else:
            target[parts[-1]] = value
    return data


_DELETE = object()


# -- shipped recipes ------------------------------------------------------------------------------------
def test_shipped_recipes_are_the_repo_root_files():
    """One source of truth: hf_ptq/recipes (package data) is the recipes/ folder of the checkout."""
    found = shipped_recipes()
    on_disk = sorted(p.name for p in RECIPES.glob("*.yaml"))
    assert sorted(p.name for p in found.values()) == on_disk
    assert shipped_recipes_dir().resolve() == RECIPES.resolve()
    assert len(on_disk) >= 13


# The required grid (issue 8): family × method × bits, read from each file with plain YAML.
REQUIRED = {
    "comq-w4a32": ("comq", 4, None),
    "brecq-w4a4": ("brecq", 4, 4),
    "brecq-w2a4": ("brecq", 2, 4),
    "fpxint-w4x2": ("fpxint", 4, None),
    "rtn-w4a32": ("rtn", 4, None),
}
FAMILIES = {"resnet50": "microsoft/resnet-50", "vit-base": "google/vit-base-patch16-224", "convnext-tiny": "facebook/convnext-tiny-224"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("setting", sorted(REQUIRED))
def test_required_recipe_exists_and_says_what_its_name_says(family, setting):
    path = RECIPES / f"{family}-{setting}.yaml"
    raw = yaml.safe_load(path.read_text())
    method, wbits, abits = REQUIRED[setting]
    assert (raw["method"], raw["weight_bits"], raw.get("act_bits")) == (method, wbits, abits)
    assert raw["model"] == FAMILIES[family]
    if method == "fpxint":
        assert raw["method_kwargs"]["terms"] == 2  # "x2"
    needs_data = method in ("comq", "brecq") or abits is not None
    assert ("calibration" in raw) == needs_data
    assert raw["output"]["dir"] == path.stem


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.yaml")))
def test_every_shipped_recipe_validates(name):
    """Fails for recipes whose method is not registered yet (comq, brecq until they land)."""
    recipe = load_recipe(name)
    config = recipe.ptq_config()
    raw = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    assert config.method == raw["method"] and config.weight_bits == raw["weight_bits"]
    assert recipe.text == (RECIPES / f"{name}.yaml").read_text()


def test_digits_recipe_is_offline():
    schema = load_recipe("digits-resnet-rtn-w4").schema
    assert schema.model.builtin == "digits-resnet"
    assert schema.evaluation_dataset().builtin == "digits"
    assert schema.calibration is None


# -- bad recipes ----------------------------------------------------------------------------------------
BAD = [
    # (id, recipe data, substrings every one of which must appear in the message)
    ("unknown top-level key", _with(weight_bit=4), ["unknown key `weight_bit`", "Allowed keys here:", "weight_bits", "evaluation"]),
    ("bits not allowed", _with(weight_bits=5), ["`weight_bits`", "5", "Allowed values: 2, 3, 4 or 8"]),
    ("bits as string", _with(weight_bits="4"), ["`weight_bits`", "must be an int"]),
    ("unknown method", _with(method="gptq"), ["`method`", "'gptq'", "Allowed values:", "'rtn'"]),
    ("granularity", _with(weight_granularity="row"), ["`weight_granularity`", "'channel' or 'tensor'"]),
    ("act bits", _with(act_bits=6), ["`act_bits`", "Allowed values: 4 or 8"]),
    ("nested unknown key", _with(evaluation__batchsize=8), ["unknown key `evaluation.batchsize`", "batch_size", "max_samples"]),
    ("bad builtin dataset", _with(dataset="builtin:mnist"), ["`dataset.builtin`", "'mnist'", "'digits' or 'fashion-mnist'"]),
    ("missing model", _with(model=_DELETE), ["missing required key `model`"]),
    ("model id and builtin", _with(model={"id": "a/b", "builtin": "digits-resnet"}), ["`model`", "exactly one of `id`", "`builtin`"]),
    ("bad builtin model", _with(model="builtin:imagenet-resnet"), ["`model.builtin`", "'digits-resnet'"]),
    ("negative calibration size", _with(calibration={"num_samples": -5}), ["`calibration.num_samples`", "-5", "greater than 0"]),
    ("calibration dataset_config", _with(calibration={"dataset_config": "x"}), ["`calibration`", "calibration.dataset.config"]),
    ("calibration processor", _with(calibration={"image_processor": "x"}), ["`calibration`", "`image_processor` cannot be set"]),
    ("cache dtype", _with(calibration={"cache_dtype": "int8"}), ["`calibration.cache_dtype`", "'float32' or 'float16'"]),
    ("saved-only key", _with(quantized_modules={"a": {}}), ["`quantized_modules` is written by hf_ptq"]),
    ("repo id", _with(push={"repo_id": "no-namespace"}), ["`push.repo_id`", "'no-namespace'", "namespace/name"]),
    ("pr and branch", _with(push={"repo_id": "me/x", "create_pr": True, "revision": "dev"}), ["`push`", "drop `revision` or `create_pr`"]),
    ("private not bool", _with(push={"private": "yes please"}), ["`push.private`", "valid boolean"]),
    ("eval max_samples", _with(evaluation__max_samples=0), ["`evaluation.max_samples`", "greater than 0"]),
    ("no eval dataset", _with(dataset=_DELETE), ["`evaluation` has no dataset", "evaluation.enabled: false"]),
    ("no calib dataset", _with(dataset=_DELETE, evaluation={"enabled": False}, calibration={"num_samples": 8}), ["`calibration` has no dataset"]),
    ("method kwargs", _with(method_kwargs={"iters": 3}), ["method_kwargs", "unknown argument `iters`"]),
    ("act bits need calibration", _with(act_bits=8), ["`calibration` is required", "act_bits"]),
    ("not a mapping", ["model", "method"], ["must be a mapping"]),
]


@pytest.mark.parametrize("data, expected", [pytest.param(d, e, id=i) for i, d, e in BAD])
def test_bad_recipe_is_rejected_with_a_clear_message(tmp_path, data, expected):
    path = _write(tmp_path, data)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message, f"{part!r} not in:\n{message}"


def test_error_names_the_line(tmp_path):
    path = _write(tmp_path, "model: builtin:digits-resnet\ndataset: builtin:digits\nmethod: rtn\nweight_bits: 7\n")
    with pytest.raises(RecipeError, match=re.escape(f"{path}:4: invalid value for `weight_bits`")):
        load_recipe(path)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("model: builtin:digits-resnet\nweight_bits: 4\nweight_bits: 2\n", ["duplicate key 'weight_bits'", ":3", "first on line 2"]),
        ("model: [unclosed\n", ["not valid YAML"]),
        ("", ["the recipe is empty"]),
    ],
    ids=["duplicate key", "yaml syntax", "empty"],
)
def test_malformed_yaml_is_rejected(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(path) in str(info.value)
    for part in expected:
        assert part in str(info.value)


def test_several_problems_are_reported_together(tmp_path):
    path = _write(tmp_path, _with(weight_bits=5, evaluation__foo=1, weight_granularity="row"))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert all(line.startswith(str(path)) for line in lines)


def test_unknown_recipe_name_lists_shipped_ones():
    with pytest.raises(RecipeError, match="digits-resnet-rtn-w4"):
        load_recipe("no-such-recipe")


# -- overrides -----------------------------------------------------------------------------------------
def test_set_overrides_are_parsed_as_yaml_and_recorded(tmp_path):
    path = _write(tmp_path, VALID)
    recipe = load_recipe(path, overrides=["weight_bits=2", "evaluation.max_samples=100", "output.dir=elsewhere", "act_bits=null"])
    s = recipe.schema
    assert (s.weight_bits, s.evaluation.max_samples, s.output.dir, s.act_bits) == (2, 100, "elsewhere", None)
    saved = yaml.safe_load(recipe.text)  # the text saved beside the checkpoint is the effective recipe
    assert saved["weight_bits"] == 2 and saved["evaluation"]["max_samples"] == 100
    assert recipe.text.startswith(f"# {path} with --set weight_bits=2")


def test_set_override_into_a_shorthand_section(tmp_path):
    path = _write(tmp_path, VALID)
    recipe = load_recipe(path, overrides=["model.revision=v1"])
    assert (recipe.schema.model.builtin, recipe.schema.model.revision) == ("digits-resnet", "v1")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("weight_bits", "expected KEY=VALUE"),
        ("=4", "expected KEY=VALUE"),
        ("weight_bits.x=1", "`weight_bits` is 4, not a section"),
        ("weight_bits=5", "(from --set weight_bits=5)"),
        ("evaluation.nope=1", "unknown key `evaluation.nope` (from --set evaluation.nope=1)"),
    ],
)
def test_bad_overrides(tmp_path, override, expected):
    path = _write(tmp_path, VALID)
    with pytest.raises(RecipeError, match=re.escape(expected)):
        load_recipe(path, overrides=[override])


def test_dataset_shorthands(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    recipe = parse_recipe(yaml.safe_dump(_with(dataset=str(folder), evaluation={"dataset": "someone/data"})))
    assert recipe.schema.dataset.path == str(folder)
    assert recipe.schema.evaluation.dataset.id == "someone/data"


# -- packaging -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_wheel_ships_the_recipes(tmp_path):
    """A wheel built from the checkout carries recipes/*.yaml as hf_ptq/recipes/*.yaml, and finds them installed."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "recipes", src / "recipes")
    shutil.copytree(REPO / "hf_ptq", src / "hf_ptq", symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
        check=True,
        cwd=src,
    )
    wheel = next((tmp_path / "dist").glob("hf_ptq-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        shipped = {Path(n).name: zf.read(n) for n in zf.namelist() if n.startswith("hf_ptq/recipes/")}
        zf.extractall(tmp_path / "site")
    assert shipped == {p.name: p.read_bytes() for p in RECIPES.glob("*.yaml")}
    out = subprocess.run(
        [sys.executable, "-c", "from hf_ptq.recipes import shipped_recipes as s; print(sorted(s()))"],
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert eval(out.stdout.strip().splitlines()[-1]) == sorted(p.stem for p in RECIPES.glob("*.yaml"))
