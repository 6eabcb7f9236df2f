"""BRECQ cost and accuracy: time per iteration per block, total time, peak RSS vs depth.

``python -m benchmarks.bench_brecq`` measures, on this machine:

1. **time per iteration per block** — each Fashion-MNIST reference model (``benchmarks.prepare``)
   quantized at W4A4 with a short schedule (``--iters``/``--act-iters``); every unit reports its
   seconds per Adam iteration of the rounding stage and of the activation step-size stage, and the
   total time is extrapolated to the reference schedule (20 000 + 5 000 iterations per unit) and to
   the benchmark matrix's (2 000 + 500) as ``Σ_units iters · s/iter + the measured fixed part``;
2. **peak RSS vs depth** — random-weight ViTs of the same width with 4 and 8 layers quantized with
   BRECQ in fresh subprocesses: with the sequential engine the cached activations of one unit at a
   time dominate, so peak RSS must stay flat in depth (also with ``recon_loss="fisher_diag"``,
   whose per-unit Fisher weights are spilled to temporary files; both losses are measured);
3. with ``--accuracy``: BRECQ W4A4 and W2A4 on the reference models through ``benchmarks.cell`` (the
   matrix's own cell runner, 1 024 calibration images), at ``--acc-iters``/``--acc-act-iters``,
   next to the matrix's RTN/COMQ cells at the same setting when they exist; ``--long-cell resnet/W2A4``
   adds that cell at the reference schedule (20 000 + 5 000), to show what the matrix's shorter
   schedule gives up.

Results go to ``docs/benchmarks.md`` between ``<!-- brecq:start -->`` and ``<!-- brecq:end -->``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import REPO_ROOT, cache_root
from .report import update_doc

DOC = REPO_ROOT / "docs" / "benchmarks.md"
SECTION = "brecq"
REFERENCE_SCHEDULE = (20_000, 5_000)
MATRIX_SCHEDULE = (2_000, 500)
MODEL_KEYS = ("resnet", "convnext", "vit")


# -- 1. time per iteration ------------------------------------------------------------------------


def bench_timing(keys: list[str], iters: int, act_iters: int) -> list[dict[str, Any]]:
    """Quantize each available reference model at W4A4 with a short schedule; per-unit timings."""
    import hf_ptq
    from transformers import AutoModelForImageClassification

    from .data import calibration_spec, load_benchmark_dataset
    from .models import MODELS, ensure_reference

    ds = load_benchmark_dataset()
    rows = []
    for key in keys:
        try:
            ckpt, _ = ensure_reference(MODELS[key], train=False)
        except FileNotFoundError as err:
            print(f"skip {key}: {err}", file=sys.stderr)
            continue
        config = hf_ptq.PTQConfig(
            method="brecq", weight_bits=4, act_bits=4, calibration=calibration_spec(ds["train"]),
            method_kwargs={"iters": iters, "act_iters": act_iters},
        )  # fmt: skip
        start = time.perf_counter()
        model = AutoModelForImageClassification.from_pretrained(ckpt, quantization_config=config)
        total = time.perf_counter() - start
        units = model.hf_ptq_report["units"]
        learned = [u for u in units if u.get("reconstructed")]
        loop = sum(u.get("sec_per_iter", 0) * iters + u.get("act_sec_per_iter", 0) * act_iters for u in learned)
        fixed = total - loop

        def extrapolate(schedule: tuple[int, int]) -> float:
            w, a = schedule
            return fixed + sum(u.get("sec_per_iter", 0) * w + u.get("act_sec_per_iter", 0) * a for u in learned)

        rows.append(
            {
                "model": key,
                "title": MODELS[key].title,
                "units": [
                    {
                        "unit": u["unit"],
                        "kind": u["kind"],
                        "layers": len(u["layers"]),
                        "sec_per_iter": u.get("sec_per_iter"),
                        "act_sec_per_iter": u.get("act_sec_per_iter"),
                    }
                    for u in units
                ],
                "reconstructed_units": len(learned),
                "measured_seconds": total,
                "fixed_seconds": fixed,
                "reference_schedule_seconds": extrapolate(REFERENCE_SCHEDULE),
                "matrix_schedule_seconds": extrapolate(MATRIX_SCHEDULE),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


# -- 2. peak RSS vs depth -------------------------------------------------------------------------


def _vit(layers: int, hidden: int = 96):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=32, patch_size=4, num_channels=3, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=3, intermediate_size=4 * hidden, num_labels=10,
    )  # fmt: skip
    return ViTForImageClassification(cfg).eval()


def _rss_child(layers: int, samples: int, recon_loss: str) -> dict[str, Any]:
    """In a fresh process: build a random ViT of ``layers`` layers, quantize with BRECQ, peak RSS.

    A warm-up quantization of a 1-layer model first loads every lazily imported module
    (datasets, transformers submodules, ...), so the baseline RSS excludes import growth.
    """
    import torch

    from hf_ptq import PTQConfig, quantize_model

    def config(n: int, data: list, iters: int) -> PTQConfig:
        return PTQConfig(
            method="brecq", weight_bits=4, act_bits=4, calibration={"dataset": data, "num_samples": n, "batch_size": 32},
            method_kwargs={"iters": iters, "act_iters": iters, "recon_loss": recon_loss},
        )  # fmt: skip

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    warm = [torch.randn(32, 3, 32, 32, generator=gen)]
    quantize_model(_vit(1), config(32, warm, 2))
    model = _vit(layers)
    params = sum(p.numel() for p in model.parameters())
    data = [torch.randn(32, 3, 32, 32, generator=gen) for _ in range(samples // 32)]
    base = _current_rss_mb()
    start = time.perf_counter()
    quantize_model(model, config(samples, data, 20))
    tokens = (32 // 4) ** 2 + 1
    return {
        "layers": layers,
        "samples": samples,
        "recon_loss": recon_loss,
        "params_m": params / 1e6,
        "base_rss_mb": base,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "seconds": time.perf_counter() - start,
        "unit_cache_mb": samples * tokens * model.config.hidden_size * 4 / 2**20,
    }


def _current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def bench_rss(depths: list[int], samples: int, threads: int) -> list[dict[str, Any]]:
    rows = []
    for recon_loss in ("mse", "fisher_diag"):
        for layers in depths:
            cmd = [sys.executable, "-m", "benchmarks.bench_brecq", "--rss-child", f"{layers},{samples},{recon_loss}",
                   "--threads", str(threads)]  # fmt: skip
            out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    return rows


# -- 3. accuracy on the reference models ------------------------------------------------------------


def _cell_path(key: str, setting: str, tag: str, iters: int, act_iters: int) -> Path:
    """This benchmark's own cell cache, keyed like the matrix's by the reference model and the code."""
    from .cell import CODE_ROOTS
    from .matrix import source_hash
    from .models import MODELS, load_info

    fingerprint = (load_info(MODELS[key]) or {}).get("fingerprint", "untrained")
    name = f"{key}-{setting}-{tag}-{iters}-{act_iters}-{fingerprint}-{source_hash(*CODE_ROOTS)}.json"
    return cache_root() / "brecq-cells" / name


#: (setting, tag, extra method_kwargs): the references' 8-bit first/last layer, and every layer low-bit
ACCURACY_VARIANTS = (("W4A4", "default", {}), ("W2A4", "default", {}), ("W2A4", "all-low", {"keep_first_last_8bit": False}))


def _matrix_cell_path(key: str, setting: str, method_kwargs: dict[str, Any]) -> Path:
    """Where ``benchmarks.run`` caches the same BRECQ cell (same model, code and options)."""
    from .cell import CODE_ROOTS
    from .matrix import Cell, cell_key, source_hash
    from .models import MODELS, load_info

    info = load_info(MODELS[key]) or {}
    key_ = cell_key(Cell(key, "brecq", setting), model_fingerprint=info.get("fingerprint", ""),
                    code_hash=source_hash(*CODE_ROOTS), method_kwargs=method_kwargs)  # fmt: skip
    return cache_root() / "cells" / f"{key_}.json"


def accuracy_jobs(
    keys: list[str], schedule: tuple[int, int], tags: tuple[str, ...], long_cells: list[str]
) -> list[tuple[str, str, str, dict[str, Any], tuple[int, int]]]:
    """(model, setting, tag, extra kwargs, schedule) of every accuracy cell: each model × variant at
    ``schedule``, plus each ``MODEL/SETTING`` of ``long_cells`` (default variant) at the reference schedule."""
    jobs = [(key, setting, tag, extra, schedule) for key in keys for setting, tag, extra in ACCURACY_VARIANTS if tag in tags]
    for item in long_cells:
        key, _, setting = item.partition("/")
        if key not in MODEL_KEYS or not setting:
            raise SystemExit(f"--long-cell {item!r}: expected MODEL/SETTING with MODEL in {MODEL_KEYS}, e.g. resnet/W2A4")
        jobs.append((key, setting, "default", {}, REFERENCE_SCHEDULE))
    return jobs


def bench_accuracy(jobs: list[tuple[str, str, str, dict[str, Any], tuple[int, int]]], threads: int) -> list[dict[str, Any]]:
    """Run (or reuse) the BRECQ accuracy cells of :func:`accuracy_jobs` through ``benchmarks.cell``.

    A cell the matrix (``benchmarks.run``) already computed with the same code and options is
    read from its cache instead of being run again.
    """
    from .models import MODELS, load_info

    rows = []
    for key, setting, tag, extra, (iters, act_iters) in jobs:
        if load_info(MODELS[key]) is None:
            print(f"skip {key}: reference model not trained (python -m benchmarks.prepare)", file=sys.stderr)
            continue
        path = _cell_path(key, setting, tag, iters, act_iters)
        matrix_path = _matrix_cell_path(key, setting, {"iters": iters, "act_iters": act_iters, **extra})
        if matrix_path.exists():
            path = matrix_path
        elif not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            kwargs = json.dumps({"iters": iters, "act_iters": act_iters, **extra})
            cmd = [sys.executable, "-m", "benchmarks.cell", "--model", key, "--method", "brecq", "--setting", setting,
                   "--method-kwargs", kwargs, "--threads", str(threads), "--out", str(path)]  # fmt: skip
            subprocess.run(cmd, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cell = json.loads(path.read_text())
        rows.append({"model": key, "setting": setting, "tag": tag, "iters": iters, "act_iters": act_iters, **_cell_summary(cell)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _cell_summary(cell: dict[str, Any]) -> dict[str, Any]:
    keep = ("status", "top1", "fp_top1", "quant_seconds", "peak_rss_mb", "method_kwargs", "torch_threads", "reason")
    return {k: cell.get(k) for k in keep}


def matrix_baselines(keys: list[str], settings: tuple[str, ...] = ("W4A4", "W2A4")) -> dict[tuple[str, str, str], float]:
    """top-1 of the matrix's RTN/COMQ cells (``benchmarks.run``) computed with the current code, when they exist."""
    from .cell import CODE_ROOTS
    from .matrix import source_hash

    code = source_hash(*CODE_ROOTS)
    found: dict[tuple[str, str, str], float] = {}
    for path in sorted((cache_root() / "cells").glob("*.json"), key=lambda p: p.stat().st_mtime):
        try:
            cell = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if cell.get("code_hash") != code:
            continue
        if cell.get("status") == "ok" and cell.get("method") in ("rtn", "comq") and cell.get("setting") in settings:
            if cell.get("model") in keys:
                found[(cell["model"], cell["method"], cell["setting"])] = cell["top1"]
    return found


# -- report ----------------------------------------------------------------------------------------


def _fmt_s(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def markdown(meta: dict[str, Any], args, timing, rss, accuracy, baselines) -> str:
    out = ["## BRECQ (block reconstruction, AdaRound + LSQ activation steps)", ""]
    out.append(f"Command: `{meta['command']}` — commit `{meta['commit']}`{' (uncommitted changes in hf_ptq/ or benchmarks/)' if meta['dirty'] else ''}, {meta['date']}.")
    load = f"1-min load average {meta['load_start']:.1f} at start, {meta['load_end']:.1f} at end"
    busy = max(meta["load_start"], meta["load_end"]) > 0.5 + meta["threads"]
    out.append(f"Machine: {meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}; {load}"
               + (" (other jobs shared the cores, so times are upper bounds of a quiet machine)." if busy else "."))  # fmt: skip
    out.append("")
    if timing:
        out += [
            f"### Time per iteration per block (W4A4, 1 024 calibration images, batch 32, {args.iters} + {args.act_iters} iterations measured)",
            "",
            "| model | unit | kind | layers | s/iter rounding (weights) | s/iter act steps |",
            "|---|---|---|---:|---:|---:|",
        ]
        for row in timing:
            for u in row["units"]:
                w = f"{u['sec_per_iter'] * 1e3:.1f} ms" if u["sec_per_iter"] else "— (8-bit stem: not reconstructed)"
                a = f"{u['act_sec_per_iter'] * 1e3:.1f} ms" if u["act_sec_per_iter"] else "—"
                out.append(f"| {row['title']} | `{u['unit']}` | {u['kind']} | {u['layers']} | {w} | {a} |")
        out += [
            "",
            "Total per model (measured run, and extrapolated: fixed part of the measured run + Σ units iterations × s/iter):",
            "",
            "| model | reconstructed units | measured, short schedule | fixed part (init, calibration passes, packing) | matrix schedule 2 000 + 500 | reference schedule 20 000 + 5 000 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in timing:
            out.append(
                f"| {row['title']} | {row['reconstructed_units']} | {_fmt_s(row['measured_seconds'])} | "
                f"{_fmt_s(row['fixed_seconds'])} | {_fmt_s(row['matrix_schedule_seconds'])} | {_fmt_s(row['reference_schedule_seconds'])} |"
            )
        out.append("")
    if rss:
        out += [
            "### Peak RSS vs depth (random ViT, width 96, 65 tokens, W4A4, 20 + 20 iterations, fresh process per row)",
            "",
            "| recon_loss | layers | params (M) | calibration images | one unit's input cache (MiB) | RSS before quantizing (MiB) | peak RSS (MiB) | peak − before (MiB) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rss:
            out.append(
                f"| {r['recon_loss']} | {r['layers']} | {r['params_m']:.2f} | {r['samples']} | {r['unit_cache_mb']:.0f} | "
                f"{r['base_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['base_rss_mb']:.0f} |"
            )
        out += ["", _rss_note(rss), ""]
    if accuracy:
        out += [
            "### Accuracy on the Fashion-MNIST reference models",
            "",
            "Through `benchmarks.cell` (the matrix's runner: 1 024 calibration images, seed 0, full 10 000-image test split). "
            "`default` = the references' 8-bit first and last quantized layer (weights and inputs); `all-low` = every "
            "layer at the setting, like RTN/COMQ in the matrix. RTN/COMQ columns: the matrix's own cells, when present. A BRECQ cell the matrix already computed with the same code and options is read from the matrix's cache, its quantize time included (the matrix section states the load it ran under).",
            "",
            "| model | setting | BRECQ variant | iterations per unit | float top-1 | BRECQ top-1 | Δ vs float (pt) | RTN | COMQ | quantize time | peak RSS (MiB) |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in accuracy:
            schedule = f"{r['iters']:,} + {r['act_iters']:,}".replace(",", " ")
            if r["status"] != "ok":
                out.append(f"| {r['model']} | {r['setting']} | {r['tag']} | {schedule} | | {r['status']}: {r.get('reason')} | | | | | |")
                continue
            rtn = baselines.get((r["model"], "rtn", r["setting"]))
            comq = baselines.get((r["model"], "comq", r["setting"]))
            out.append(
                f"| {r['model']} | {r['setting']} | {r['tag']} | {schedule} | {r['fp_top1'] * 100:.2f} | {r['top1'] * 100:.2f} | "
                f"{(r['top1'] - r['fp_top1']) * 100:+.2f} | {f'{rtn * 100:.2f}' if rtn is not None else '—'} | "
                f"{f'{comq * 100:.2f}' if comq is not None else '—'} | {_fmt_s(r['quant_seconds'])} | {r['peak_rss_mb']:.0f} |"
            )
        out.append("")
    return "\n".join(out)


def _rss_note(rss: list[dict[str, Any]]) -> str:
    """How much the peak grew from the shallowest to the deepest model, per loss (measured, not assumed)."""
    parts = []
    for loss in dict.fromkeys(r["recon_loss"] for r in rss):
        rows = sorted((r for r in rss if r["recon_loss"] == loss), key=lambda r: r["layers"])
        lo, hi = rows[0], rows[-1]
        growth = (hi["peak_rss_mb"] - hi["base_rss_mb"]) / max(lo["peak_rss_mb"] - lo["base_rss_mb"], 1e-9)
        parts.append(
            f"`{loss}`: peak − before {lo['peak_rss_mb'] - lo['base_rss_mb']:.0f} MiB at {lo['layers']} layers, "
            f"{hi['peak_rss_mb'] - hi['base_rss_mb']:.0f} MiB at {hi['layers']} layers (×{growth:.2f})"
        )
    return (
        "The engine holds one unit's cached inputs/targets (float and quantized chains) at a time; `fisher_diag` "
        "writes every unit's Fisher weights (N × Σ_units |z| × 2 bytes, float16) to one temporary file per unit and "
        "memory-maps the rows of each mini-batch. Measured: " + "; ".join(parts) + "."
    )


def write_doc(body: str) -> None:
    update_doc(DOC, {SECTION: body})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODEL_KEYS), help="reference models (resnet,convnext,vit)")
    parser.add_argument("--iters", type=int, default=200, help="rounding iterations per unit for the timing run")
    parser.add_argument("--act-iters", type=int, default=100, help="act step-size iterations per unit for the timing run")
    parser.add_argument("--depths", default="4,8", help="ViT depths for the RSS measurement")
    parser.add_argument("--rss-samples", type=int, default=1024)
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--no-rss", action="store_true")
    parser.add_argument("--accuracy", action="store_true", help="also run BRECQ W4A4/W2A4 cells (long)")
    parser.add_argument("--acc-iters", type=int, default=MATRIX_SCHEDULE[0])
    parser.add_argument("--acc-act-iters", type=int, default=MATRIX_SCHEDULE[1])
    parser.add_argument("--long-cell", action="append", default=[], metavar="MODEL/SETTING",
                        help="also run this accuracy cell at the reference schedule 20 000 + 5 000 (repeatable)")  # fmt: skip
    parser.add_argument("--acc-variants", default="default,all-low",
                        help="BRECQ variants of the accuracy cells: default (8-bit first/last layer), all-low")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the 2 cores are shared)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.rss_child:
        layers, samples, recon_loss = args.rss_child.split(",")
        print(json.dumps(_rss_child(int(layers), int(samples), recon_loss)))
        return 0
    from transformers.utils import logging as hf_logging

    from .provenance import provenance

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    keys = [k for k in args.models.split(",") if k]
    meta = provenance(args.threads) | {"command": "python -m benchmarks.bench_brecq " + " ".join(argv or sys.argv[1:])}
    meta["command"] = meta["command"].strip()
    meta["load_start"] = os.getloadavg()[0]
    meta["threads"] = args.threads
    timing = [] if args.no_timing else bench_timing(keys, args.iters, args.act_iters)
    rss = [] if args.no_rss else bench_rss([int(d) for d in args.depths.split(",")], args.rss_samples, args.threads)
    accuracy = (
        bench_accuracy(
            accuracy_jobs(keys, (args.acc_iters, args.acc_act_iters), tuple(args.acc_variants.split(",")), args.long_cell),
            args.threads,
        )
        if args.accuracy
        else []
    )
    meta["load_end"] = os.getloadavg()[0]
    body = markdown(meta, args, timing, rss, accuracy, matrix_baselines(keys) if accuracy else {})
    print(body)
    if not args.no_write:
        write_doc(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
