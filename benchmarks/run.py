"""The benchmark matrix: methods × settings × reference models → top-1, drop, time, RSS, size.

``python -m benchmarks.run``          full matrix (4 methods × 7 settings × 3 models); writes
                                      ``docs/benchmarks.md`` (its ``models``/``matrix`` sections),
                                      ``docs/benchmarks-*.png`` and ``benchmarks/results/matrix-full.json``
``python -m benchmarks.run --quick``  the ``QUICK_CELLS`` subset (≤ 20 min on 2 cores with trained
                                      models); prints the tables, writes ``benchmarks/results/matrix-quick.json``

Each cell runs in a fresh subprocess (``benchmarks.cell``) so peak RSS is per run. Results are
cached per cell under ``$HF_PTQ_CACHE/benchmarks/cells/``, keyed by the cell, the reference
model's fingerprint, the method options and a hash of the ``hf_ptq`` sources: rerunning after an
interruption resumes, and rerunning after a method lands recomputes exactly what changed
(any change under ``hf_ptq/`` recomputes everything). ``--force`` ignores the cache;
``--cached-only`` runs nothing and tabulates what the cache holds, other cells as ``not run``.
Methods not registered in ``hf_ptq.methods`` are reported as ``missing``; paths that raise
``NotImplementedError``/``ImportError`` (e.g. activation quantization before it lands) as ``n/a``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from transformers.utils import logging

from . import REPO_ROOT, cache_root
from .matrix import (
    DEFAULT_METHOD_KWARGS,
    METHODS,
    MODEL_KEYS,
    QUICK_METHOD_KWARGS,
    SETTINGS,
    Cell,
    cell_key,
    full_cells,
    parse_setting,
    quick_cells,
    source_hash,
)

logger = logging.get_logger("hf_ptq.benchmarks")

DOC_PATH = REPO_ROOT / "docs" / "benchmarks.md"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
ACCURACY_PNG = REPO_ROOT / "docs" / "benchmarks-accuracy.png"
#: per-unit error plots: one PNG per weight-only setting where methods differ most
UNIT_PLOT_SETTINGS = ("W4A32", "W2A32")


def units_png(setting: str) -> Path:
    return REPO_ROOT / "docs" / f"benchmarks-units-{setting}.png"


#: execution order of methods: data-free first, the long reconstruction last
EXECUTION_ORDER = ("rtn", "fpxint", "comq", "brecq")
#: fields dropped from the committed JSON (kept in the per-cell cache)
_HEAVY_FIELDS = ("traceback",)


def _csv(text: str | None, allowed: tuple[str, ...], what: str) -> list[str]:
    if not text:
        return list(allowed)
    items = [t.strip() for t in text.split(",") if t.strip()]
    if what == "setting":
        items = [parse_setting(t).name for t in items]
    bad = [t for t in items if t not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}(s) {bad}; known: {', '.join(allowed)}")
    return items


def _method_kwargs(overrides: list[str], quick: bool = False) -> dict[str, dict[str, Any]]:
    """``["fpxint={\"terms\": 3}"]`` → per-method kwargs replacing the benchmark defaults."""
    kwargs = {k: dict(v) for k, v in DEFAULT_METHOD_KWARGS.items()}
    if quick:
        kwargs.update({k: dict(v) for k, v in QUICK_METHOD_KWARGS.items()})
    for item in overrides:
        name, _, blob = item.partition("=")
        try:
            value = json.loads(blob)
        except json.JSONDecodeError as err:
            raise SystemExit(f"--method-kwargs {item!r}: expected METHOD=<JSON dict> ({err})") from None
        if not isinstance(value, dict):
            raise SystemExit(f"--method-kwargs {item!r}: expected a JSON dict")
        kwargs[name.strip()] = value
    return kwargs


def _run_child(cell: Cell, mk: dict[str, Any] | None, threads: int, timeout: float) -> dict[str, Any]:
    """One cell in a fresh interpreter; its stdout/stderr go to a log file under the cache."""
    logs = cache_root() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out = logs / f"{cell.model}-{cell.method}-{cell.setting}.json"
    log = out.with_suffix(".log")
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.cell", "--model", cell.model, "--method", cell.method,
           "--setting", cell.setting, "--threads", str(threads), "--out", str(out)]  # fmt: skip
    if mk is not None:
        cmd += ["--method-kwargs", json.dumps(mk)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    env["HF_HUB_OFFLINE"] = "1"  # nothing may come from the Hub
    base = {"cell": cell.label, "model": cell.model, "method": cell.method, "setting": cell.setting}
    start = time.perf_counter()
    try:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return base | {"status": "error", "reason": f"timed out after {timeout:.0f} s (log: {log})"}
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not out.exists():
        tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
        return base | {"status": "error", "reason": f"cell process exited {proc.returncode}: {tail[0]} (log: {log})"}
    return json.loads(out.read_text()) | {"wall_seconds": wall}


def run_matrix(
    cells: list[Cell],
    *,
    threads: int,
    timeout: float,
    force: bool,
    method_kwargs: dict[str, dict[str, Any]],
    cached_only: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Run (or reuse) every cell; returns the results and the reference models' infos.

    ``cached_only``: run nothing; cells without a cached result for this code are reported as
    ``not run`` (so a table written after an interrupted run says what is missing).
    """
    import hf_ptq  # noqa: F401  (registers the methods)
    from hf_ptq.methods import available_methods

    from .cell import CODE_ROOTS
    from .data import load_benchmark_dataset
    from .models import MODELS, ensure_reference

    ds = load_benchmark_dataset(install=True)
    infos = {}
    for key in dict.fromkeys(c.model for c in cells):
        infos[key] = ensure_reference(MODELS[key], dataset=ds)[1]  # trains missing references first
    available = set(available_methods())
    code = source_hash(*CODE_ROOTS)
    cache = cache_root() / "cells"
    cache.mkdir(parents=True, exist_ok=True)
    results: dict[Cell, dict[str, Any]] = {}
    # Cheap methods first, so an interrupted run has already filled the fast rows; the cache
    # makes the rerun resume. Results are returned in table order.
    order = sorted(cells, key=lambda c: EXECUTION_ORDER.index(c.method) if c.method in EXECUTION_ORDER else 99)
    bar = logging.tqdm(order, desc="benchmark cells", unit="cell")
    for cell in bar:
        bar.set_postfix_str(cell.label)
        base = {"cell": cell.label, "model": cell.model, "method": cell.method, "setting": cell.setting,
                "fp_top1": infos[cell.model]["fp_top1"]}  # fmt: skip
        if cell.method not in available:
            results[cell] = base | {"status": "missing", "reason": f"method {cell.method!r} not registered in hf_ptq"}
            continue
        mk = method_kwargs.get(cell.method)
        fingerprint = infos[cell.model]["fingerprint"]
        path = cache / f"{cell_key(cell, model_fingerprint=fingerprint, code_hash=code, method_kwargs=mk)}.json"
        if path.exists() and not force:
            results[cell] = json.loads(path.read_text()) | {"cached": True}
            continue
        if cached_only:
            results[cell] = base | {"status": "not run", "reason": "no result for this code yet (--cached-only: the "
                                    "cell was not computed in the time the run had; rerun without --cached-only)"}  # fmt: skip
            continue
        result = _run_child(cell, mk, threads, timeout)
        result = base | result
        if result.get("status") in ("ok", "n/a", "missing"):  # deterministic outcomes; errors are retried
            child_code = result.get("code_hash", code)  # the code the child actually imported
            key = cell_key(cell, model_fingerprint=fingerprint, code_hash=child_code, method_kwargs=mk)
            (cache / f"{key}.json").write_text(json.dumps(result, indent=1) + "\n")
        logger.warning(f"{cell.label}: {_summary(result)}")
        results[cell] = result | {"cached": False}
    bar.close()
    return [results[c] for c in cells], infos


def _summary(r: dict[str, Any]) -> str:
    if r.get("status") == "ok":
        return (f"top-1 {100 * r['top1']:.2f} % (drop {100 * r['drop']:.2f} pt), quant {r['quant_seconds']:.1f} s, "
                f"peak RSS {r['peak_rss_mb']:.0f} MB, size ratio {r['size_ratio']:.3f}")  # fmt: skip
    return f"{r.get('status')}: {r.get('reason', '')}"


def _command(argv: list[str]) -> str:
    """The command line as documented; a ``--note`` is shown as ``--note …`` (its text is printed on its own)."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--note":
            shown.append("--note …")
            skip = True
        elif arg.startswith("--note="):
            shown.append("--note …")
        else:
            shown.append(arg)
    return " ".join(["python -m benchmarks.run", *shown]).strip()


def matrix_section(results, infos, meta, methods, settings, command: str, plots: dict[str, Path | None]) -> str:
    """The ``matrix`` section of docs/benchmarks.md."""
    from .report import _Notes, detail_table, pivot_table

    notes = _Notes()
    counts = {s: sum(r.get("status") == s for r in results) for s in ("ok", "missing", "n/a", "error", "not run")}
    base_rss = [r["base_rss_mb"] for r in results if r.get("status") == "ok" and "base_rss_mb" in r]
    dirty = " (with uncommitted changes in hf_ptq/ or benchmarks/)" if meta["dirty"] else ""
    mk = ", ".join(f"{m}: {json.dumps(v)}" for m, v in meta["method_kwargs"].items() if m in methods) or "none"
    parts = [
        "## Quantization matrix (Fashion-MNIST)",
        "",
        f"Produced by `{command}` on {meta['date']} at commit `{meta['commit']}`{dirty}.  ",
        f"Machine: {meta['machine']}.  ",
        f"Versions: Python {meta['python']}, torch {meta['torch']}, transformers {meta['transformers']}; "
        f"hf_ptq source hash `{meta['code_hash']}`.",
        *([f"How the cells were computed: {meta['note']}"] if meta.get("note") else []),
        "",
        "Each cell loads the float reference checkpoint with "
        "`AutoModelForImageClassification.from_pretrained(ckpt, quantization_config=hf_ptq.PTQConfig(method=..., "
        "weight_bits=x, act_bits=None if y == 32 else y, ...))` in a fresh process; everything else stays at hf_ptq's "
        "defaults. Calibration (calibrated methods and every A4/A8 setting): 1024 train images, seed 0. "
        f"Evaluation: the full 10k test split. Method options: {mk}.",
        "",
        "Cells: top-1 % (change vs float, points). `missing` = method not registered in `hf_ptq.methods` at run time; "
        "`n/a` = the path raised NotImplementedError/ImportError (not built yet); `error` = failed (reason below). "
        "`not run` = not computed in the time this run had (see the note).  "
        f"This run: {counts['ok']} measured, {counts['missing']} missing, {counts['n/a']} n/a, {counts['error']} errors, "
        f"{counts['not run']} not run.",
        "",
        "Read the methods on their own terms: `fpxint` stores `terms` integer tensors per weight (2 by default, so W4 "
        "costs 8 stored bits: see the `stored W bits` and `size ratio` columns) and quantizes activations "
        "dynamically per token at run time (no calibration), while `rtn`/`comq`/`brecq` activations use static "
        "per-tensor quantizers calibrated on the 1024 images; `brecq` keeps its first and last layer at 8 bits "
        "(its default, as in the reference). Every model keeps hf_ptq's default float modules (classifier heads; "
        "the ViT patch embedding).",
    ]
    for model, info in infos.items():
        parts += ["", f"### {model}: {info['title']}, float top-1 {100 * info['fp_top1']:.2f} %", "",
                  pivot_table(results, model, methods, settings, notes)]  # fmt: skip
    parts += [
        "",
        "### All measurements",
        "",
        "Quant. time: `quantize_model` wall time (`model.hf_ptq_report['seconds']`; excludes loading). Peak RSS: "
        "the cell process's high-water mark (`ru_maxrss`) right after quantization, including Python + torch + "
        "transformers + the memory-mapped dataset"
        + (f" (about {statistics.median(base_rss):.0f} MB before quantization starts)" if base_rss else "")
        + ". Size ratio: quantized `model.safetensors` bytes / float bytes.",
        "",
        detail_table(results, notes),
    ]
    if notes.reasons:
        parts += ["", "Notes:", "", notes.legend()]
    pics = [f"![{name}]({p.name})" for name, p in plots.items() if p is not None]
    if pics:
        parts += ["", "Plots (same run): " + " ".join(pics)]
    if not any(p for name, p in plots.items() if name.startswith("per-unit")):
        parts += ["", "No cell reported per-unit errors, so there is no per-unit error plot."]
    parts += ["", f"Raw results: `benchmarks/results/{meta['results_file']}`."]
    return "\n".join(parts)


def models_section(infos: dict[str, dict[str, Any]]) -> str:
    from .report import models_table

    dates = sorted({str(i.get("trained_at", "?")) for i in infos.values()})
    return "\n".join([
        "## Float reference models (Fashion-MNIST)",
        "",
        "Trained by `python -m benchmarks.prepare` (or on first use by `benchmarks.run`) from the transformers configs "
        "in `benchmarks/models.py` with fixed seeds (AdamW + one-cycle cosine, batch 128, label smoothing 0.05, random "
        "horizontal flips, native 28×28 grey input, mean/std normalisation), once per machine, and cached as ordinary "
        "HF checkpoints (model + image processor) under `~/.cache/hf_ptq/benchmarks/fmnist-<model>-v1/`. Top-1 on the "
        f"10k test split, measured on the saved checkpoint. Trained {dates[0]}"
        + (f" – {dates[-1]}" if len(dates) > 1 else "")
        + " on the benchmark machine (see the matrix section); training times are wall clock, and other jobs may have "
        "shared the 2 cores, which inflates them.",
        "",
        models_table(infos),
    ])  # fmt: skip


def _print_pivots(results, infos, methods, settings) -> None:
    from .report import _Notes, pivot_table

    notes = _Notes()
    for model, info in infos.items():
        print(f"\n{model} (float top-1 {100 * info['fp_top1']:.2f} %)")
        print(pivot_table(results, model, methods, settings, notes))
    if notes.reasons:
        print("\n" + notes.legend())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the QUICK_CELLS subset (≤ 20 min on 2 cores)")
    parser.add_argument("--models", help=f"comma-separated subset of {','.join(MODEL_KEYS)}")
    parser.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--settings", help=f"comma-separated subset of {','.join(SETTINGS)}")
    parser.add_argument("--method-kwargs", action="append", default=[], metavar="METHOD=JSON",
                        help="method options instead of the defaults, e.g. fpxint='{\"terms\": 3}'")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="ignore cached cell results")
    parser.add_argument("--cached-only", action="store_true",
                        help="run nothing: tabulate cached cells, report the others as 'not run'")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="torch threads per cell (default 2)")
    parser.add_argument("--cell-timeout", type=float, default=3600, help="seconds before a cell counts as failed")
    parser.add_argument("--note", default=None,
                        help="a sentence for the docs on how the cells were computed (e.g. several runs in parallel)")  # fmt: skip
    docs = parser.add_mutually_exclusive_group()
    docs.add_argument("--docs", dest="docs", action="store_true", default=None, help="write docs/ even for a subset")
    docs.add_argument("--no-docs", dest="docs", action="store_false", help="do not touch docs/")
    args = parser.parse_args(argv)
    if args.cached_only and args.force:
        raise SystemExit("--cached-only and --force contradict each other")

    import torch

    torch.set_num_threads(args.threads)
    models = _csv(args.models, MODEL_KEYS, "model")
    methods = _csv(args.methods, METHODS, "method")
    settings = _csv(args.settings, SETTINGS, "setting")
    subset = bool(args.models or args.methods or args.settings)
    cells = (quick_cells if args.quick else full_cells)(models, methods, settings)
    if not cells:
        raise SystemExit("no cells selected")
    write_docs = args.docs if args.docs is not None else not (args.quick or subset)
    method_kwargs = _method_kwargs(args.method_kwargs, quick=args.quick)
    command = _command(argv)
    start = time.perf_counter()
    results, infos = run_matrix(cells, threads=args.threads, timeout=args.cell_timeout, force=args.force,
                                method_kwargs=method_kwargs, cached_only=args.cached_only)  # fmt: skip
    elapsed = time.perf_counter() - start

    from .cell import CODE_ROOTS
    from .provenance import provenance

    mode = "quick" if args.quick else "full"
    results_file = f"matrix-{mode}.json" if not subset or write_docs else f"matrix-{mode}-subset.json"
    meta = provenance(args.threads) | {
        "command": command, "mode": mode, "cells": len(cells), "elapsed_seconds": round(elapsed, 1),
        "code_hash": source_hash(*CODE_ROOTS), "method_kwargs": method_kwargs, "results_file": results_file,
        "calibration": {"split": "train", "num_samples": 1024, "seed": 0}, "evaluation": "test split (10k)",
        "note": args.note,
    }  # fmt: skip
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    slim = [{k: v for k, v in r.items() if k not in _HEAVY_FIELDS} for r in results]
    (RESULTS_DIR / results_file).write_text(json.dumps({"meta": meta, "models": infos, "results": slim}, indent=1) + "\n")
    _print_pivots(results, infos, methods, settings)
    if write_docs:
        from .plots import accuracy_plot, unit_error_plot
        from .report import update_doc

        title = f"{command} @ {meta['commit']} ({meta['date']})"
        plots: dict[str, Path | None] = {
            "accuracy vs bits": accuracy_plot(results, {m: i["fp_top1"] for m, i in infos.items()}, methods,
                                              ACCURACY_PNG, title),  # fmt: skip
        }
        for s in UNIT_PLOT_SETTINGS:
            if s in settings:
                plots[f"per-unit error {s}"] = unit_error_plot(results, list(infos), methods, s,
                                                               units_png(s), title)  # fmt: skip
        update_doc(DOC_PATH, {
            "models": models_section(infos),
            "matrix": matrix_section(results, infos, meta, methods, settings, command, plots),
        })  # fmt: skip
        print(f"\nwrote {DOC_PATH.relative_to(REPO_ROOT)} and {', '.join(str(p.relative_to(REPO_ROOT)) for p in plots.values() if p)}")
    print(f"results: {(RESULTS_DIR / results_file).relative_to(REPO_ROOT)}; {len(cells)} cells in {elapsed / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
