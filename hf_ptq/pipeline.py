"""Run a recipe end to end: load float model and data → evaluate FP → quantize → evaluate → save.

This is ``hf-ptq quantize`` without the command line: ``run_recipe(load_recipe("name"))``. Uploading
is a separate step (``hf_ptq.push_to_hub``) so that a failed upload never hides a finished checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .card import EvalReport, is_hub_id, quantization_tag
from .hub import state_dict_bytes
from .recipes import DatasetSpec, ModelSpec, Recipe

__all__ = ["RunSummary", "UsageError", "run_recipe", "resolve_model", "load_split", "dataset_card_names"]


class UsageError(ValueError):
    """Bad input found while running (missing folder, missing dataset files); the message says the fix."""


@dataclass
class RunSummary:
    """What ``run_recipe`` did, for the CLI summary table and scripts (``--json``)."""

    recipe: str
    output_dir: str
    label: str
    eval_dataset: str | None
    eval_split: str | None
    eval_samples: int | None
    fp_top1: float | None
    quantized_top1: float | None
    fp_bytes: int
    quantized_bytes: int
    quantize_seconds: float
    fp_eval_seconds: float | None
    quantized_eval_seconds: float | None
    total_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_model(spec: ModelSpec) -> str:
    """A path or Hub id ``from_pretrained`` accepts; ``builtin:digits-resnet`` is trained once and cached."""
    if spec.builtin == "digits-resnet":
        from .quickstart import train_digits_checkpoint

        return str(train_digits_checkpoint())
    model_id = str(spec.id)
    path = Path(model_id).expanduser()
    if path.exists() or model_id.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise UsageError(f"model folder {model_id!r} does not exist or holds no config.json; give a checkpoint folder or a Hub id.")
        return str(path)
    return model_id


def load_split(spec: DatasetSpec, split: str, _cache: dict | None = None):
    """One split of a dataset spec as a ``datasets.Dataset`` (only that split is loaded for Hub/folder data)."""
    import datasets

    key = (spec.describe(), spec.data_dir, split)
    if _cache is not None and key in _cache:
        return _cache[key]
    if spec.builtin is not None:
        from .builtin_data import load_digits_dataset, load_fashion_mnist

        try:
            full = load_digits_dataset() if spec.builtin == "digits" else load_fashion_mnist()
        except (FileNotFoundError, ImportError) as err:
            raise UsageError(str(err)) from None
        if split not in full:
            raise UsageError(f"builtin:{spec.builtin} has splits {sorted(full)}, not {split!r}; set the split.")
        ds = full[split]
    elif spec.path is not None:
        if not Path(spec.path).expanduser().is_dir():
            raise UsageError(f"dataset folder {spec.path!r} does not exist.")
        ds = datasets.load_dataset("imagefolder", data_dir=str(Path(spec.path).expanduser()), split=split)
    else:
        ds = datasets.load_dataset(spec.id, spec.config, data_dir=spec.data_dir, split=split)
    if _cache is not None:
        _cache[key] = ds
    return ds


def dataset_card_names(spec: DatasetSpec) -> tuple[str, str]:
    """(``model-index`` dataset type, pretty name) of a dataset spec."""
    if spec.builtin == "digits":
        return "digits", "scikit-learn digits (hf_ptq builtin, 20 % stratified test split)"
    if spec.builtin == "fashion-mnist":
        return "zalando-datasets/fashion_mnist", "Fashion-MNIST"
    if spec.path is not None:
        return Path(spec.path).name, f"local image folder {Path(spec.path).name}"
    return str(spec.id), str(spec.id)


def _fetch_base_card(model_id: str, revision: str | None) -> None:
    """Put the base model's README in the Hub cache so its license can be carried over (best effort)."""
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(model_id, "README.md", revision=revision)
    except Exception:
        pass


def run_recipe(
    recipe: Recipe,
    *,
    output_dir: str | Path | None = None,
    overwrite: bool | None = None,
    evaluate: bool | None = None,
    log: Callable[[str], None] = print,
) -> RunSummary:
    """Quantize, evaluate and save as ``recipe`` says; arguments override the recipe's ``output``/``evaluation``."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from .evaluation import evaluate_model
    from .hub import save_quantized

    start = time.perf_counter()
    schema = recipe.schema
    out = Path(output_dir or schema.output.dir or recipe.name)
    overwrite = schema.output.overwrite if overwrite is None else overwrite
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite (or output.overwrite: true) or another --output-dir.")
    source = resolve_model(schema.model)
    revision = schema.model.revision
    if is_hub_id(source):
        _fetch_base_card(source, revision)
    log(f"loading {schema.model.describe()} ({source})")
    try:
        processor = AutoImageProcessor.from_pretrained(source, revision=revision)
    except Exception as err:
        raise UsageError(f"could not load the image processor of {source!r}: {type(err).__name__}: {err}") from None

    cache: dict = {}
    eval_spec = schema.evaluation_dataset() if (evaluate is None or evaluate) else None
    ev = schema.evaluation
    eval_ds = load_split(eval_spec, ev.split, cache) if eval_spec is not None else None
    eval_kwargs = dict(
        image_processor=processor,
        batch_size=ev.batch_size,
        max_samples=ev.max_samples,
        image_column=eval_spec.image_column if eval_spec else None,
        label_column=eval_spec.label_column if eval_spec else None,
    )

    fp_model = AutoModelForImageClassification.from_pretrained(source, revision=revision)
    fp_bytes = state_dict_bytes(fp_model)
    fp_top1 = fp_seconds = None
    if eval_ds is not None and ev.fp_baseline:
        log(f"evaluating the float model on {eval_spec.describe()} [{ev.split}]")
        t = time.perf_counter()
        fp_top1 = evaluate_model(fp_model, eval_ds, **eval_kwargs)["top1"]
        fp_seconds = time.perf_counter() - t
    del fp_model

    calib_spec = schema.calibration_dataset()
    calib_ds = load_split(calib_spec, schema.calibration.split, cache) if calib_spec is not None else None
    config = recipe.ptq_config(calibration_dataset=calib_ds, image_processor=processor)
    label = f"{config.method} {quantization_tag(config).upper()}"
    log(f"quantizing with {label}")
    qmodel = AutoModelForImageClassification.from_pretrained(source, revision=revision, quantization_config=config)
    if calib_spec is not None:  # record where the images came from, not "<in-memory Dataset>"
        qmodel.config.quantization_config.calibration.dataset = calib_spec.describe()
    quant_seconds = qmodel.hf_ptq_report["seconds"]
    label = f"{config.method} {quantization_tag(qmodel.config.quantization_config).upper()}"

    q_top1 = q_seconds = None
    evaluation = None
    if eval_ds is not None:
        log(f"evaluating the quantized model on {eval_spec.describe()} [{ev.split}]")
        t = time.perf_counter()
        q_top1 = evaluate_model(qmodel, eval_ds, **eval_kwargs)["top1"]
        q_seconds = time.perf_counter() - t
        dataset_type, dataset_name = dataset_card_names(eval_spec)
        n = min(len(eval_ds), ev.max_samples) if ev.max_samples else len(eval_ds)
        evaluation = EvalReport(
            dataset=dataset_type,
            dataset_name=dataset_name,
            dataset_config=eval_spec.config,
            split=ev.split,
            quantized_top1=q_top1,
            fp_top1=fp_top1,
            num_samples=n,
        )

    log(f"saving to {out}")
    folder = save_quantized(qmodel, out, image_processor=processor, eval_results=evaluation, recipe=recipe, overwrite=overwrite)
    return RunSummary(
        recipe=recipe.name,
        output_dir=str(folder),
        label=label,
        eval_dataset=eval_spec.describe() if eval_spec else None,
        eval_split=ev.split if eval_spec else None,
        eval_samples=evaluation.num_samples if evaluation else None,
        fp_top1=fp_top1,
        quantized_top1=q_top1,
        fp_bytes=fp_bytes,
        quantized_bytes=state_dict_bytes(qmodel),
        quantize_seconds=quant_seconds,
        fp_eval_seconds=fp_seconds,
        quantized_eval_seconds=q_seconds,
        total_seconds=time.perf_counter() - start,
    )
