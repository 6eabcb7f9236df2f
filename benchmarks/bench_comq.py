"""COMQ cost: Gram vs direct formulation on one ViT-Base fc1 layer, and whole-model COMQ time.

``python -m benchmarks.bench_comq [--tokens 50000] [--direct-rows N] [--images 64] [--write-docs]``

1. Layer: a 768→3072 Linear (ViT-Base ``intermediate.dense``) with ``--tokens`` calibration rows of
   correlated synthetic activations (a random mixing matrix, log-normal channel scales and a few
   outlier channels, like LayerNorm outputs). Times the Gram accumulation, the Gram-form sweep and
   the reference-style direct sweep (same grid: per-channel asymmetric 4-bit min-max, one greedy
   sweep, no scale step), and counts identical codes. ``--direct-rows`` times the direct form on
   the first N output rows only and scales the time by 3072/N (rows are independent, so the
   per-row cost is constant); the default runs all rows.
2. Models: ResNet-50 and ViT-Base/16 (transformers default configs, random weights), ``--images``
   random 224×224 images; whole ``quantize_model`` COMQ W4A32 time vs one FP forward over the same
   images (batch 32).

``--write-docs`` replaces the ``<!-- comq:start -->``…``<!-- comq:end -->`` section of
``docs/benchmarks.md`` (appends it if missing) and touches nothing else in the file.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn

from . import REPO_ROOT
from .provenance import provenance

START, END = "<!-- comq:start -->", "<!-- comq:end -->"


def synthetic_activations(tokens: int, n: int, seed: int = 0) -> torch.Tensor:
    """Correlated, unequally scaled columns with a few outlier channels (LayerNorm-output-like)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(n) + torch.randn(n, n, generator=gen) * (0.5 / math.sqrt(n))
    scales = torch.exp(torch.randn(n, generator=gen) * 0.5)
    scales[torch.randperm(n, generator=gen)[:6]] *= 8.0
    x = torch.empty(tokens, n)
    for r0 in range(0, tokens, 8192):
        r1 = min(tokens, r0 + 8192)
        x[r0:r1] = (torch.randn(r1 - r0, n, generator=gen) @ mix) * scales
    return x


def bench_layer(tokens: int, direct_rows: int | None) -> dict:
    from hf_ptq.methods.comq import GramAccumulator, comq_grid
    from hf_ptq.methods.comq_solver import ComqGrid, comq_direct, comq_gram, layer_error
    from hf_ptq.quant.scheme import LayerScheme

    n, m = 768, 3072
    layer = nn.Linear(n, m)
    nn.init.trunc_normal_(layer.weight, std=0.02)
    w = layer.weight.detach()
    x = synthetic_activations(tokens, n)
    grid, _ = comq_grid(w, LayerScheme(bits=4), "minmax", 1.0)

    t0 = time.perf_counter()
    acc = GramAccumulator(layer, torch.device("cpu"))
    for r0 in range(0, tokens, 64 * 197):  # calibration batches of 64 ViT images
        acc.add(x[r0 : r0 + 64 * 197])
    t_gram_acc = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = comq_gram(w, acc.gram, grid, update_scale=False)
    t_gram_solve = time.perf_counter() - t0

    rows = m if direct_rows is None else min(m, direct_rows)
    sub = ComqGrid(step=grid.step[:rows], kmin=grid.kmin[:rows], kmax=grid.kmax[:rows])
    t0 = time.perf_counter()
    slow = comq_direct(w[:rows], x, sub, update_scale=False, chunk_size=512)
    t_direct_rows = time.perf_counter() - t0
    t_direct = t_direct_rows * m / rows

    same = (fast.codes[:rows] == slow.codes).double().mean().item()
    e_fast = layer_error(w[:rows], fast.dequantize()[:rows], acc.gram)
    e_slow = layer_error(w[:rows], slow.dequantize(), acc.gram)
    return {
        "tokens": tokens,
        "rows": rows,
        "gram_accumulate_s": t_gram_acc,
        "gram_solve_s": t_gram_solve,
        "direct_rows_s": t_direct_rows,
        "direct_s": t_direct,
        "speedup_solve": t_direct / t_gram_solve,
        "speedup_total": t_direct / (t_gram_solve + t_gram_acc),
        "identical": same,
        "error_rel_diff": abs(e_fast - e_slow) / e_slow,
    }


def _models():
    from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

    yield "ResNet-50", lambda: ResNetForImageClassification(ResNetConfig())
    yield "ViT-Base/16", lambda: ViTForImageClassification(ViTConfig())


@torch.no_grad()
def bench_models(images: int, batch: int = 32) -> list[dict]:
    from hf_ptq import PTQConfig, quantize_model

    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(images, 3, 224, 224, generator=gen)
    batches = list(pixels.split(batch))
    out = []
    for name, build in _models():
        torch.manual_seed(0)
        model = build().eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        t0 = time.perf_counter()
        for b in batches:
            model(pixel_values=b)
        t_fp = time.perf_counter() - t0
        config = PTQConfig(
            method="comq", weight_bits=4, calibration={"dataset": batches, "num_samples": images, "batch_size": batch}
        )
        t0 = time.perf_counter()
        quantize_model(model, config)
        t_q = time.perf_counter() - t0
        units = model.hf_ptq_report["units"]
        out.append(
            {
                "model": name,
                "params_m": params,
                "layers": sum(len(u["layers"]) for u in units),
                "units": len(units),
                "fp_forward_s": t_fp,
                "comq_total_s": t_q,
                "comq_method_s": sum(u["comq_seconds"] for u in units),
                "ratio": t_q / t_fp,
            }
        )
        print(out[-1], flush=True)
        del model
    return out


def render(layer: dict | None, models: list[dict], prov: dict, command: str, images: int, load: tuple) -> str:
    lines = [START, "## COMQ (coordinate-wise minimization)", ""]
    lines.append(f"Command: `{command}` — commit `{prov['commit']}`{' (uncommitted changes in hf_ptq/ or benchmarks/)' if prov['dirty'] else ''}, {prov['date']}.")
    lines.append(
        f"Machine: {prov['machine']}; torch {prov['torch']}, transformers {prov['transformers']}. "
        f"The 2 cores were shared with other jobs (1-min load average {load[0]:.1f} at start, {load[1]:.1f} at end): "
        "times are from one run and carry that noise."
    )
    lines.append("")
    if layer is not None:
        lines += [
            "### One layer: Gram vs direct formulation (ViT-Base fc1, 768→3072)",
            "",
            f"{layer['tokens']:,} calibration tokens of synthetic correlated activations (random mixing, log-normal channel "
            "scales, 6 outlier channels); per-channel asymmetric W4 min-max grid, one greedy sweep, no scale step "
            "(the reference code's setting). The direct form is the reference algorithm (N×rows residual buffers, one "
            "gathered input column per row per step), chunked by 512 rows.",
            "",
            "| step | seconds |",
            "|---|---:|",
            f"| Gram accumulation G = XᵀX (float32 pieces, float64 sum) | {layer['gram_accumulate_s']:.2f} |",
            f"| Gram-form sweep (`comq_gram`) | {layer['gram_solve_s']:.2f} |",
        ]
        if layer["rows"] == 3072:
            lines.append(f"| direct-form sweep (`comq_direct`), all 3072 rows | {layer['direct_s']:.1f} |")
        else:
            lines.append(
                f"| direct-form sweep (`comq_direct`), first {layer['rows']} rows measured: {layer['direct_rows_s']:.1f} s → "
                f"scaled to 3072 rows | {layer['direct_s']:.1f} |"
            )
        lines += [
            "",
            f"**Speed-up: {layer['speedup_solve']:.0f}× for the sweep, {layer['speedup_total']:.0f}× including the Gram "
            f"accumulation.** Identical codes: {100 * layer['identical']:.3f} % of {layer['rows'] * 768:,}; layer errors "
            f"differ by {layer['error_rel_diff']:.1e} (relative).",
            "",
        ]
    if models:
        lines += [
            f"### Whole model: COMQ W4A32 vs one FP forward ({images} random 224×224 images, batch 32, random weights)",
            "",
            "Defaults: `input_source=\"fp\"`, one greedy sweep with the scale step, per-channel asymmetric min-max grid; "
            "classifier (and ViT patch embedding) kept in float. `quantize_model` time includes the calibration runner "
            "(input capture, float targets, the per-unit RTN baseline and error report, packing); the method column is "
            "COMQ's own share (Gram accumulation + solver).",
            "",
            "| model | params (M) | quantized layers | units | FP forward (s) | `quantize_model` COMQ (s) | of which COMQ method (s) | × FP forward |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in models:
            lines.append(
                f"| {r['model']} | {r['params_m']:.1f} | {r['layers']} | {r['units']} | {r['fp_forward_s']:.1f} | "
                f"{r['comq_total_s']:.1f} | {r['comq_method_s']:.1f} | {r['ratio']:.0f} |"
            )
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_section(text: str, path: Path) -> None:
    """Replace only the COMQ section (or append it); other sections are left byte-for-byte."""
    if not path.exists():
        path.write_text("# hf_ptq benchmarks\n\nMeasured results; each section names the command that produced it.\n\n" + text)
        return
    doc = path.read_text()
    if START in doc and END in doc:
        a, b = doc.index(START), doc.index(END) + len(END)
        doc = doc[:a] + text.rstrip("\n") + doc[b:]
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    path.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    import os

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=50_000)
    parser.add_argument("--direct-rows", type=int, default=None, help="time the direct form on the first N rows only")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--skip-layer", action="store_true")
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    load0 = os.getloadavg()[0]
    prov = provenance(torch.get_num_threads())
    layer = None if args.skip_layer else bench_layer(args.tokens, args.direct_rows)
    if layer is not None:
        print(layer, flush=True)
    models = [] if args.skip_models else bench_models(args.images)
    command = "python -m benchmarks.bench_comq" + (" " + " ".join(argv) if argv else "")
    if argv is None:
        import sys

        command = "python -m benchmarks.bench_comq" + ("" if len(sys.argv) < 2 else " " + " ".join(sys.argv[1:]))
    text = render(layer, models, prov, command, args.images, (load0, os.getloadavg()[0]))
    print(text)
    if args.write_docs:
        write_section(text, REPO_ROOT / "docs" / "benchmarks.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
