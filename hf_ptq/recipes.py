"""Recipe YAML files: a ``PTQConfig`` plus where the model and data come from and what to do after.

A recipe is the ``PTQConfig`` schema (``hf_ptq.config._Schema``, inherited, so the field rules live
in one place) with five extra sections::

    model: microsoft/resnet-50            # Hub id, local folder, or builtin:digits-resnet
    dataset: {id: ILSVRC/imagenet-1k}     # default source of calibration and evaluation images
    method: comq                          # ... any PTQConfig field ...
    calibration: {split: train, num_samples: 1024}
    evaluation: {split: validation}
    output: {dir: resnet50-comq-w4a32}
    push: {repo_id: me/resnet50-comq-w4a32, private: true}

Unknown keys and bad values are rejected with the file, the line, the key path and the allowed
values. Shipped recipes live in ``recipes/`` at the repository root; ``hf_ptq/recipes`` is a link to
that folder so that the same files are package data in wheels (see docs/publishing.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator, model_validator

from .config import CalibrationConfig, PTQConfig, _Schema

__all__ = [
    "Recipe",
    "RecipeError",
    "RecipeSchema",
    "DatasetSpec",
    "ModelSpec",
    "load_recipe",
    "parse_recipe",
    "shipped_recipes",
    "shipped_recipes_dir",
    "apply_overrides",
]

BUILTIN_DATASETS = ("digits", "fashion-mnist")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class RecipeError(ValueError):
    """A recipe (or a ``--set`` override) is invalid; the message names file, line, key and fix."""


# -- sections ------------------------------------------------------------------------------------
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _dataset_shorthand(value: Any) -> Any:
    """``"builtin:NAME"`` → builtin, an existing folder → ``path``, any other string → Hub ``id``."""
    if not isinstance(value, str):
        return value
    if value.startswith("builtin:"):
        return {"builtin": value.removeprefix("builtin:")}
    return {"path": value} if Path(value).expanduser().is_dir() else {"id": value}


def _model_shorthand(value: Any) -> Any:
    """``"builtin:NAME"`` → builtin, any other string → ``id`` (Hub id or local folder)."""
    if not isinstance(value, str):
        return value
    return {"builtin": value.removeprefix("builtin:")} if value.startswith("builtin:") else {"id": value}


class DatasetSpec(_Section):
    """Where images come from: exactly one of ``builtin``, ``id`` (Hub dataset) or ``path`` (image folder).

    A string is shorthand: ``builtin:digits``, a local folder, or a Hub id.
    """

    builtin: Literal["digits", "fashion-mnist"] | None = None
    id: str | None = None
    path: str | None = None
    config: str | None = None
    data_dir: str | None = None
    image_column: str | None = None
    label_column: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return _dataset_shorthand(value)

    @model_validator(mode="after")
    def _exactly_one_source(self) -> "DatasetSpec":
        given = [k for k in ("builtin", "id", "path") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of `builtin` ({' or '.join(BUILTIN_DATASETS)}), `id` (a Hub dataset id) or "
                f"`path` (a local image folder); got {given or 'none'}"
            )
        return self

    def describe(self) -> str:
        """Short human/ID form: ``builtin:digits``, the Hub id, or the folder."""
        if self.builtin:
            return f"builtin:{self.builtin}"
        text = self.id or str(self.path)
        return f"{text} ({self.config})" if self.config else text


class ModelSpec(_Section):
    """The float model: ``id`` (Hub id or local folder) or ``builtin`` (``digits-resnet``, trained offline)."""

    id: str | None = None
    builtin: Literal["digits-resnet"] | None = None
    revision: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return _model_shorthand(value)

    @model_validator(mode="after")
    def _exactly_one_source(self) -> "ModelSpec":
        if (self.id is None) == (self.builtin is None):
            raise ValueError("give exactly one of `id` (a Hub model id or local folder) or `builtin` ('digits-resnet')")
        return self

    def describe(self) -> str:
        return f"builtin:{self.builtin}" if self.builtin else str(self.id)


class RecipeCalibration(CalibrationConfig):
    """``CalibrationConfig`` with the dataset given as a :class:`DatasetSpec` (default: the recipe's ``dataset``)."""

    dataset: DatasetSpec | None = None  # type: ignore[assignment]
    #: CalibrationConfig fields that a recipe gives in the dataset spec (or not at all) instead.
    REFUSED: ClassVar[tuple[str, ...]] = ("dataset_config", "data_dir", "image_column", "image_processor")

    @field_validator("dataset")
    @classmethod
    def _check_dataset(cls, v: Any) -> Any:  # replaces CalibrationConfig's (None means "the recipe's dataset")
        return v

    @model_validator(mode="before")
    @classmethod
    def _no_runtime_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            moved = {"dataset_config": "config", "data_dir": "data_dir", "image_column": "image_column"}
            for key, target in moved.items():
                if key in data:
                    raise ValueError(f"`{key}` belongs in the dataset spec in a recipe: write calibration.dataset.{target}")
            if "image_processor" in data:
                raise ValueError("`image_processor` cannot be set in a recipe: the model's own processor is used")
        return data


class EvaluationSpec(_Section):
    """Top-1 of the float and quantized models on one split, written into the model card."""

    enabled: StrictBool = True
    dataset: DatasetSpec | None = None
    split: str = "test"
    batch_size: StrictInt = Field(default=64, gt=0)
    max_samples: StrictInt | None = Field(default=None, gt=0)
    fp_baseline: StrictBool = True


class OutputSpec(_Section):
    """Where the checkpoint goes and what the card says about its origin."""

    dir: str | None = None
    overwrite: StrictBool = False
    base_model: str | None = None
    license: str | None = None
    model_name: str | None = None


class PushSpec(_Section):
    """Upload after saving (only when ``repo_id`` is set); mirrors ``hf_ptq.push_to_hub``."""

    repo_id: str | None = None
    private: StrictBool | None = None
    revision: str | None = None
    commit_message: str | None = None
    create_pr: StrictBool = False

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, v: str | None) -> str | None:
        if v is not None and not _REPO_ID.match(v):
            raise ValueError("must look like 'namespace/name' (your user or organization, a slash, the repo name)")
        return v

    @model_validator(mode="after")
    def _pr_xor_branch(self) -> "PushSpec":
        if self.create_pr and self.revision:
            raise ValueError("`create_pr` opens a PR against the default branch; drop `revision` or `create_pr`")
        return self


class RecipeSchema(_Schema):
    """Every ``PTQConfig`` field (inherited) plus the recipe sections."""

    description: str | None = None
    model: ModelSpec
    dataset: DatasetSpec | None = None
    calibration: RecipeCalibration | None = None  # type: ignore[assignment]
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    push: PushSpec = Field(default_factory=PushSpec)

    @model_validator(mode="before")
    @classmethod
    def _no_saved_only_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError(f"a recipe must be a mapping of keys to values, not {type(data).__name__}")
        for key in ("quantized_modules", "quant_method", "format_version"):
            if key in data:
                raise ValueError(f"`{key}` is written by hf_ptq when it saves a checkpoint; remove it from the recipe")
        return data

    @model_validator(mode="after")
    def _datasets_present(self) -> "RecipeSchema":
        if self.calibration is not None and self.calibration.dataset is None and self.dataset is None:
            raise ValueError("`calibration` has no dataset: set the top-level `dataset` or `calibration.dataset`")
        if self.evaluation.enabled and self.evaluation.dataset is None and self.dataset is None:
            raise ValueError(
                "`evaluation` has no dataset: set the top-level `dataset` or `evaluation.dataset`, "
                "or `evaluation.enabled: false`"
            )
        return self

    # -- derived ---------------------------------------------------------------------------------
    def calibration_dataset(self) -> DatasetSpec | None:
        if self.calibration is None:
            return None
        return self.calibration.dataset or self.dataset

    def evaluation_dataset(self) -> DatasetSpec | None:
        if not self.evaluation.enabled:
            return None
        return self.evaluation.dataset or self.dataset

    def ptq_config(self, calibration_dataset: Any = None, image_processor: Any = None) -> PTQConfig:
        """The ``PTQConfig`` of this recipe; ``calibration_dataset`` is the loaded data (else its description)."""
        fields = {name: getattr(self, name) for name in _Schema.model_fields if name not in ("calibration", "quantized_modules")}
        if self.calibration is not None:
            spec = self.calibration_dataset()
            calib = self.calibration.model_dump(exclude={"dataset", "image_processor"})
            calib.update(
                dataset=calibration_dataset if calibration_dataset is not None else spec.describe(),
                dataset_config=spec.config,
                data_dir=spec.data_dir,
                image_column=spec.image_column,
                image_processor=image_processor,
            )
            fields["calibration"] = calib
        return PTQConfig(**fields)


# -- loading -------------------------------------------------------------------------------------
@dataclass
class Recipe:
    """A validated recipe: the schema object, where it came from, and the text to save beside the checkpoint."""

    schema: RecipeSchema
    source: str
    text: str
    overrides: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return Path(self.source).stem if self.source.endswith((".yaml", ".yml")) else self.source

    def ptq_config(self, calibration_dataset: Any = None, image_processor: Any = None) -> PTQConfig:
        return self.schema.ptq_config(calibration_dataset, image_processor)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _line_of(node: yaml.Node | None, loc: tuple) -> int | None:
    """1-based line of the deepest YAML node along ``loc`` (for error messages)."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _allowed_keys(loc: tuple) -> list[str]:
    """Keys allowed in the mapping that holds ``loc[-1]`` (walks the schema along the path)."""
    model: type[BaseModel] | None = RecipeSchema
    for part in loc[:-1]:
        if model is None or part not in model.model_fields:
            return []
        annotation = model.model_fields[part].annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        model = next((a for a in candidates if issubclass(a, BaseModel)), None)
    if model is None:
        return []
    refused = RecipeCalibration.REFUSED if model is RecipeCalibration else ()
    return [k for k, f in model.model_fields.items() if not f.exclude and k not in refused]


def _format_errors(source: str, err: ValidationError, root: yaml.Node | None, overrides: dict[str, str]) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p in ("function-after", "function-before")))
        path = ".".join(str(p) for p in loc) or "(top level)"
        where = f"{source}:{line}" if (line := _line_of(root, loc)) else source
        origin = next((f" (from --set {o})" for k, o in overrides.items() if path == k or path.startswith(k + ".")), "")
        value = e.get("input")
        shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            lines.append(f"{where}: unknown key `{path}`{origin}. Allowed keys here: {', '.join(allowed)}.")
            continue
        if e["type"] == "missing":
            lines.append(f"{where}: missing required key `{path}`.")
            continue
        ctx = e.get("ctx") or {}
        if "expected" in ctx:
            reason = f"Allowed values: {ctx['expected']}"
        else:
            reason = e["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: invalid value for `{path}`{origin}: {shown}. {reason}.")
    return "\n".join(lines)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, str]:
    """Apply ``key.path=value`` strings in place (values parsed as YAML); returns path → original text."""
    applied: dict[str, str] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE with a dotted key path, e.g. --set weight_bits=2")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise RecipeError(f"--set {item!r}: the value is not valid YAML ({err})") from None
        parts = key.split(".")
        target = data
        for i, part in enumerate(parts[:-1]):
            nxt = target.get(part)
            if nxt is None:
                nxt = target[part] = {}
            elif isinstance(nxt, str) and part in ("model", "dataset"):  # expand a shorthand before descending
                nxt = target[part] = _model_shorthand(nxt) if part == "model" else _dataset_shorthand(nxt)
            if not isinstance(nxt, dict):
                raise RecipeError(f"--set {item!r}: `{'.'.join(parts[: i + 1])}` is {nxt!r}, not a section with keys")
            target = nxt
        target[parts[-1]] = value
        applied[key] = item
    return applied


def parse_recipe(text: str, source: str = "<recipe>", overrides: list[str] | None = None) -> Recipe:
    """Validate recipe YAML ``text``; ``source`` names it in error messages. Raises :class:`RecipeError`."""
    overrides = list(overrides or [])
    try:
        root = yaml.compose(text, Loader=_UniqueKeyLoader)
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(err, "problem", None) or str(err)
        raise RecipeError(f"{where}: not valid YAML: {problem}.") from None
    if data is None:
        raise RecipeError(f"{source}: the recipe is empty; it needs at least `model` and `method`.")
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping of keys to values, not a {type(data).__name__}.")
    applied = apply_overrides(data, overrides)
    try:
        schema = RecipeSchema.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_errors(source, err, root, applied)) from None
    try:
        schema.ptq_config()  # the method validates method_kwargs and cross-field rules
    except ValueError as err:
        raise RecipeError("\n".join(f"{source}: {line}" for line in str(err).splitlines())) from None
    if applied:
        header = f"# {source} with " + " ".join(f"--set {o}" for o in applied.values()) + "\n"
        text = header + yaml.safe_dump(data, sort_keys=False)
    return Recipe(schema=schema, source=source, text=text, overrides=list(applied.values()))


def shipped_recipes_dir() -> Path:
    """The shipped recipe folder: ``hf_ptq/recipes`` (package data; a link to ``recipes/`` in a checkout)."""
    packaged = Path(str(files("hf_ptq"))) / "recipes"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "recipes"  # checkout where the link was not created


def shipped_recipes() -> dict[str, Path]:
    """Name (file stem) → path of every shipped recipe."""
    folder = shipped_recipes_dir()
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def load_recipe(recipe: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe file, or a shipped recipe by name (``hf-ptq recipes`` lists them)."""
    path = Path(recipe).expanduser()
    if not path.is_file():
        shipped = shipped_recipes()
        name = path.name.removesuffix(".yaml").removesuffix(".yml")
        if str(recipe) == path.name and name in shipped:
            path = shipped[name]
        else:
            names = ", ".join(shipped) or "none found"
            raise RecipeError(f"recipe {str(recipe)!r} is neither a file nor a shipped recipe. Shipped recipes: {names}.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: cannot read the recipe ({err}).") from None
    return parse_recipe(text, source=str(path), overrides=overrides)
