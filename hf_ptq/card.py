"""The model card of a quantized checkpoint: Hub metadata (``ModelCardData``) and a body that says what was done.

Built with ``huggingface_hub.ModelCard`` so the YAML header is what the Hub expects: ``base_model`` +
``base_model_relation: quantized`` (the Hub's "quantized from" link), ``library_name: transformers``
(the checkpoint loads with ``from_pretrained``), ``pipeline_tag``, ``tags`` and, when an evaluation
was run, a ``model-index`` with measured top-1. Nothing here touches the network.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .config import PTQConfig

__all__ = ["EvalReport", "build_model_card", "quantization_tag", "plot_unit_errors", "base_model_license"]

PLOT_FILENAME = "reconstruction_errors.png"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class EvalReport:
    """Measured top-1 (fractions in [0, 1]) of the float and quantized model on one dataset split.

    ``dataset`` is the Hub dataset id when there is one (it becomes ``model-index`` ``dataset.type``).
    """

    dataset: str
    split: str
    quantized_top1: float
    fp_top1: float | None = None
    num_samples: int | None = None
    dataset_name: str | None = None
    dataset_config: str | None = None

    @classmethod
    def coerce(cls, value: "EvalReport | dict[str, Any] | None") -> "EvalReport | None":
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            try:
                return cls(**value)
            except TypeError as err:
                raise ValueError(
                    f"eval_results: {err}. Expected keys: dataset, split, quantized_top1 and optionally fp_top1, "
                    "num_samples, dataset_name, dataset_config."
                ) from None
        raise TypeError(f"eval_results must be an hf_ptq.EvalReport or a dict, not {type(value).__name__}")


def is_hub_id(name: str | None) -> bool:
    """True for ``org/name`` or ``name`` strings that are not local paths."""
    return bool(name) and _HUB_ID.match(name) is not None and not Path(name).expanduser().exists()


def max_terms(config: PTQConfig) -> int:
    """Most series terms of any layer (FP=xINT stores ``terms`` integer tensors per weight; others 1)."""
    recorded = [int(o.get("terms", 1)) for o in config.quantized_modules.values()]
    return max(recorded + [int(config.method_kwargs.get("terms", 1))])


def quantization_tag(config: PTQConfig) -> str:
    """``w4a32``, ``w4a8``, ``w4x2a32`` (FP=xINT terms): weight bits [× terms], activation bits (32 = float)."""
    terms = max_terms(config)
    act_terms = int(config.method_kwargs.get("act_terms", 1))
    weights = f"w{config.weight_bits}" + (f"x{terms}" if terms > 1 else "")
    acts = f"a{config.act_bits}" + (f"x{act_terms}" if act_terms > 1 else "") if config.act_bits else "a32"
    return weights + acts


def base_model_license(base_model: str | None, source_dir: str | Path | None = None) -> str | None:
    """The license in the base model's card, read from a local folder or the local Hub cache (no network)."""
    candidates: list[Path] = []
    if source_dir is not None:
        candidates.append(Path(source_dir) / "README.md")
    if base_model and Path(base_model).expanduser().is_dir():
        candidates.append(Path(base_model).expanduser() / "README.md")
    elif is_hub_id(base_model):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base_model, "README.md")
        if isinstance(cached, str):
            candidates.append(Path(cached))
    for readme in candidates:
        if readme.is_file():
            try:
                license_ = ModelCard.load(readme, ignore_metadata_errors=True).data.license
            except Exception:  # a malformed third-party card must not stop the save
                continue
            if license_:
                return license_
    return None


# -- per-unit errors ------------------------------------------------------------------------------
def _numeric_columns(units: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for unit in units:
        for key, value in unit.items():
            if key not in ("unit", "layers") and isinstance(value, (int, float)) and not isinstance(value, bool):
                if key not in cols:
                    cols.append(key)
    return cols


def unit_table(units: list[dict[str, Any]]) -> str:
    """Markdown table: one row per unit, one column per numeric statistic the method reported."""
    cols = _numeric_columns(units)
    head = "| # | unit | layers | " + " | ".join(f"`{c}`" for c in cols) + " |"
    rule = "|---|---|---|" + "---|" * len(cols)
    rows = []
    for i, unit in enumerate(units):
        cells = [_fmt(unit.get(c)) for c in cols]
        rows.append(f"| {i} | `{unit.get('unit', '?')}` | {len(unit.get('layers', []))} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def plot_unit_errors(units: list[dict[str, Any]], path: str | Path, title: str = "") -> bool:
    """Save a PNG of the error statistics per unit (log scale); False when matplotlib is missing or nothing to plot."""
    cols = [c for c in _numeric_columns(units) if "err" in c or "loss" in c] or _numeric_columns(units)
    if not units or not cols:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(units) + 2), 3.6), dpi=110)
    x = list(range(len(units)))
    positive = False
    for col in cols:
        ys = [u.get(col) if isinstance(u.get(col), (int, float)) else float("nan") for u in units]
        positive |= any(isinstance(y, (int, float)) and y > 0 for y in ys)
        ax.plot(x, ys, marker="o", markersize=3, linewidth=1.2, label=col)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("unit (quantization order)")
    ax.set_ylabel("error")
    ax.set_title(title or "per-unit reconstruction error")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# -- the card ---------------------------------------------------------------------------------------
_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ intro }}

> **Load it with `import hf_ptq` first.** hf_ptq registers its quantizer with transformers on import;
> without it `from_pretrained` fails with a size-mismatch error instead of running wrong weights.

## How to use

```python
import hf_ptq  # registers quant_method="hf_ptq" with transformers
from transformers import AutoImageProcessor, AutoModelForImageClassification

model = AutoModelForImageClassification.from_pretrained("{{ model_ref }}")
processor = AutoImageProcessor.from_pretrained("{{ model_ref }}")
inputs = processor(images=image, return_tensors="pt")
predicted = model(**inputs).logits.argmax(-1)
```

Weights are stored as packed integers with per-{{ granularity }} scales and dequantized in the forward
pass (integer storage, simulated integer arithmetic: no integer kernels).

## Quantization

| setting | value |
|---|---|
{{ settings_rows }}

{{ results_section }}

## Per-unit reconstruction error

{{ units_section }}

## Recipe

{{ recipe_section }}

## Reproducibility

Quantized with hf_ptq {{ versions.hf_ptq }}, transformers {{ versions.transformers }}, torch {{ versions.torch }}
(hf_ptq storage format {{ format_version }}). The full `quantization_config` is in `config.json`; the per-unit
report is in `hf_ptq_report.json`.
"""


def _settings_rows(config: PTQConfig, report: dict | None, calibration: str | None, size_bytes: int | None) -> str:
    terms = max_terms(config)
    act = f"{config.act_bits} bit, static per-tensor, {'symmetric' if config.act_symmetric else 'asymmetric'}, {config.act_observer} observer" if config.act_bits else "float (not quantized)"
    rows = [
        ("method", f"`{config.method}`" + (f" ({config.method_kwargs})" if config.method_kwargs else "")),
        ("weight bits", f"{config.weight_bits}" + (f" x {terms} terms ({config.weight_bits * terms} effective bits)" if terms > 1 else "")),
        ("weight granularity", f"per-{config.weight_granularity}"),
        ("weight grid", "symmetric" if config.weight_symmetric else "asymmetric"),
        ("weight observer", config.weight_observer or "method default"),
        ("activations", act),
        ("quantized layers", str(len(config.quantized_modules))),
        ("kept in float", ", ".join(f"`{m}`" for m in config.modules_to_not_convert) if config.modules_to_not_convert else "hf_ptq defaults (classifier head, ViT patch embedding)"),
    ]
    cal = config.calibration
    if cal is not None:
        rows.append(("calibration data", f"{calibration or cal.to_json_dict()['dataset']}, split `{cal.split}`"))
        rows.append(("calibration size / seed", f"{cal.num_samples} images, batch {cal.batch_size}, seed {cal.seed}" + (", augmented" if cal.augment else "")))
    else:
        rows.append(("calibration data", "none (data-free)"))
    rows.append(("seed", str(config.seed)))
    if report and "seconds" in report:
        rows.append(("quantization time", f"{report['seconds']:.1f} s"))
    if size_bytes is not None:
        rows.append(("weights size", f"{size_bytes / 2**20:.2f} MiB"))
    return "\n".join(f"| {k} | {v} |" for k, v in rows)


def _results_section(ev: EvalReport | None, label: str) -> str:
    if ev is None:
        return "## Results\n\nNo evaluation was run for this checkpoint."
    name = ev.dataset_name or ev.dataset
    n = f", {ev.num_samples} images" if ev.num_samples else ""
    lines = [f"## Results\n\nTop-1 accuracy on {name} (split `{ev.split}`{n}), measured by hf_ptq:\n", "| model | top-1 |", "|---|---|"]
    if ev.fp_top1 is not None:
        lines.append(f"| float base model | {100 * ev.fp_top1:.2f} % |")
    lines.append(f"| {label} (this model) | {100 * ev.quantized_top1:.2f} % |")
    if ev.fp_top1 is not None:
        lines.append(f"| change | {100 * (ev.quantized_top1 - ev.fp_top1):+.2f} pt |")
    return "\n".join(lines)


def _units_section(report: dict | None, plot_name: str | None) -> str:
    units = (report or {}).get("units") or []
    if not units:
        return "No per-unit report is available (the model was not quantized in this process)."
    parts = [
        "Relative error of each quantized unit (a layer, or a block for block-wise methods), in the order it was "
        "quantized. `weight_rel_error` = ‖Ŵ − W‖ / ‖W‖; other columns are the method's own statistics."
    ]
    if plot_name:
        parts.append(f"![per-unit reconstruction error]({plot_name})")
    table = unit_table(units)
    if len(units) > 20:
        table = f"<details><summary>table ({len(units)} units)</summary>\n\n{table}\n\n</details>"
    parts.append(table)
    return "\n\n".join(parts)


def build_model_card(
    config: PTQConfig,
    *,
    report: dict | None = None,
    eval_results: EvalReport | None = None,
    recipe_text: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    model_name: str | None = None,
    model_ref: str | None = None,
    calibration_dataset: str | None = None,
    versions: dict[str, str] | None = None,
    plot_name: str | None = None,
    size_bytes: int | None = None,
) -> ModelCard:
    """The card of a checkpoint quantized with ``config`` (``config.quantized_modules`` must be filled)."""
    import torch
    import transformers

    from . import __version__

    tag = quantization_tag(config)
    label = f"{config.method} {tag.upper()}"
    base_name = base_model.rsplit("/", 1)[-1] if base_model else None
    model_name = model_name or (f"{base_name}-hf_ptq-{config.method}-{tag}" if base_name else f"hf_ptq-{config.method}-{tag}")
    versions = versions or {"hf_ptq": __version__, "transformers": transformers.__version__, "torch": torch.__version__}

    results = None
    if eval_results is not None:
        common = dict(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=eval_results.dataset,
            dataset_name=eval_results.dataset_name or eval_results.dataset,
            dataset_split=eval_results.split,
            dataset_config=eval_results.dataset_config,
            metric_type="accuracy",
        )
        results = [EvalResult(metric_value=round(eval_results.quantized_top1, 6), metric_name="Top-1 accuracy", **common)]
        if eval_results.fp_top1 is not None:
            results.append(
                EvalResult(
                    metric_value=round(eval_results.fp_top1, 6),
                    metric_name="Top-1 accuracy (float base model)",
                    metric_config="float-baseline",
                    **common,
                )
            )
    datasets = [calibration_dataset] if calibration_dataset and is_hub_id(calibration_dataset) else None
    data = ModelCardData(
        base_model=base_model,
        base_model_relation="quantized" if base_model else None,
        library_name="transformers",
        license=license,
        pipeline_tag="image-classification",
        tags=["hf-ptq", "quantized", config.method, tag, f"{config.weight_bits}-bit"],
        datasets=datasets,
        model_name=model_name,
        eval_results=results,
    )
    if base_model:
        intro = (
            f"[`{base_model}`](https://huggingface.co/{base_model}) quantized after training with "
            f"hf_ptq `{config.method}` to **{tag.upper()}**."
        )
    else:
        intro = f"An image classifier quantized after training with hf_ptq `{config.method}` to **{tag.upper()}**."
    if recipe_text:
        recipe_section = "Produced by `hf-ptq quantize` with this recipe (also saved as `recipe.yaml`):\n\n```yaml\n" + recipe_text.rstrip() + "\n```"
    else:
        recipe_section = "Quantized from Python (no recipe file); the settings above and `config.json` describe it fully."
    return ModelCard.from_template(
        data,
        template_str=_TEMPLATE,
        title=model_name,
        intro=intro,
        model_ref=model_ref or model_name,
        granularity=config.weight_granularity,
        settings_rows=_settings_rows(config, report, calibration_dataset, size_bytes),
        results_section=_results_section(eval_results, label),
        units_section=_units_section(report, plot_name),
        recipe_section=recipe_section,
        versions=versions,
        format_version=config.format_version,
    )
