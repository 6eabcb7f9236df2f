"""One matrix cell in its own process: quantize a reference model, measure, evaluate, write JSON.

``python -m benchmarks.cell --model resnet --method rtn --setting W4A32 --out cell.json``

Run by ``benchmarks.run`` in a fresh subprocess per cell, so that the peak RSS (``ru_maxrss`` of
this process, read right after quantization, before evaluation) belongs to this run alone and a
crash or a hang in one method cannot take the whole matrix down.

Outcomes (``status``):

* ``ok``: measured;
* ``n/a``: the path is not available in this hf_ptq yet (``NotImplementedError``/``ImportError``,
  e.g. static activation quantization before the calibration runner lands), with the reason;
* ``error``: anything else (config rejected, exception), with the message and traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from . import REPO_ROOT
from .matrix import Cell, parse_setting, ptq_kwargs, size_ratio, source_hash

#: the code a cell result depends on: the library and the benchmark's own measuring code
CODE_ROOTS = (REPO_ROOT / "hf_ptq", REPO_ROOT / "benchmarks" / "cell.py", REPO_ROOT / "benchmarks" / "matrix.py")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _numeric_units(report: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The per-unit report, keeping the unit name and the numeric statistics (JSON-safe)."""
    units = []
    for u in (report or {}).get("units", []) or []:
        row: dict[str, Any] = {"unit": str(u.get("unit"))}
        for k, v in u.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                row[k] = float(v)
        units.append(row)
    return units


def _unavailable(err: BaseException) -> bool:
    return isinstance(err, (NotImplementedError, ImportError))


def run_cell(cell: Cell, *, method_kwargs: dict[str, Any] | None, reload_check: bool = True) -> dict[str, Any]:
    """Quantize, save, evaluate and reload one cell; never raises for a method's failure."""
    import hf_ptq
    from hf_ptq.methods import available_methods, get_method
    from transformers import AutoModelForImageClassification

    from .data import calibration_spec, load_benchmark_dataset
    from .models import MODELS, ensure_reference

    setting = parse_setting(cell.setting)
    out: dict[str, Any] = {
        "cell": cell.label, "model": cell.model, "method": cell.method, "setting": cell.setting,
        "weight_bits": setting.weight_bits, "act_bits": setting.act_bits, "code_hash": source_hash(*CODE_ROOTS),
        "torch_threads": torch.get_num_threads(),
    }  # fmt: skip
    if cell.method not in available_methods():
        return out | {"status": "missing", "reason": f"method {cell.method!r} is not registered in hf_ptq.methods"}
    ckpt, info = ensure_reference(MODELS[cell.model], train=False)
    ds = load_benchmark_dataset()
    out["fp_top1"] = info["fp_top1"]
    needs_data = get_method(cell.method).input_mode != "none"
    try:
        kwargs = ptq_kwargs(
            cell.method, setting, method_needs_data=needs_data, calibration=calibration_spec(ds["train"]),
            method_kwargs=method_kwargs,
        )  # fmt: skip
        config = hf_ptq.PTQConfig(**kwargs)
    except Exception as err:  # the method rejects the options (e.g. kwargs changed)
        return out | {"status": "error", "reason": f"PTQConfig rejected: {err}", "traceback": traceback.format_exc()}
    out["method_kwargs"] = config.method_kwargs
    out["base_rss_mb"] = _current_rss_mb()
    start = time.perf_counter()
    try:
        model = AutoModelForImageClassification.from_pretrained(ckpt, quantization_config=config)
    except Exception as err:
        status = "n/a" if _unavailable(err) else "error"
        return out | {"status": status, "reason": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    out["load_quantize_seconds"] = time.perf_counter() - start
    out["peak_rss_mb"] = _peak_rss_mb()
    report = getattr(model, "hf_ptq_report", None) or {}
    out["quant_seconds"] = float(report.get("seconds", out["load_quantize_seconds"]))
    out["units"] = _numeric_units(report)

    tmp = Path(tempfile.mkdtemp(prefix="hf_ptq-bench-"))
    try:
        model.save_pretrained(tmp)
        out["quant_bytes"] = (tmp / "model.safetensors").stat().st_size
        out["fp_bytes"] = (Path(ckpt) / "model.safetensors").stat().st_size
        out["size_ratio"] = size_ratio(out["quant_bytes"], out["fp_bytes"])
        start = time.perf_counter()
        result = hf_ptq.evaluate_model(model, ds["test"], confusion=True)
        out["eval_seconds"] = time.perf_counter() - start
        out["top1"] = result["top1"]
        out["drop"] = out["fp_top1"] - result["top1"]
        out["per_class_recall"] = result.get("per_class_recall")
        out["test_images"] = result["num_samples"]
        if reload_check:  # the saved checkpoint must give the same outputs after a plain reload
            try:
                reloaded = AutoModelForImageClassification.from_pretrained(tmp).eval()
                from hf_ptq.calibration.data import iterate_image_batches, resolve_image_processor

                processor = resolve_image_processor(model)
                pv, _ = next(iterate_image_batches(ds["test"], processor, batch_size=256))
                with torch.no_grad():
                    diff = (reloaded(pixel_values=pv).logits - model(pixel_values=pv).logits).abs().max()
                out["reload_max_abs_diff"] = float(diff)
            except Exception as err:
                out["reload_error"] = f"{type(err).__name__}: {err}"
    except Exception as err:
        return out | {"status": "error", "reason": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out | {"status": "ok"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--setting", required=True)
    parser.add_argument("--method-kwargs", default=None, help="JSON dict (default: the benchmark's defaults)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True, help="where to write the result JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    kwargs = json.loads(args.method_kwargs) if args.method_kwargs else None
    result = run_cell(Cell(args.model, args.method, args.setting), method_kwargs=kwargs)
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
