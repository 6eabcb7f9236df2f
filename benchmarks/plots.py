"""PNG plots of the matrix (matplotlib, headless): accuracy vs bits, per-unit errors.

* ``accuracy_plot``: one panel per model, settings on the x axis ordered from most to fewest
  bits, one line per method, the float top-1 as a dashed line. Cells without a measurement
  (missing / n/a / error) leave gaps instead of being drawn as zero.
* ``unit_error_plot``: per-unit errors from ``model.hf_ptq_report["units"]`` at one setting (RTN
  reports ``weight_rel_error`` per layer; calibrated methods add reconstruction errors per unit),
  one panel per (model, method), one line per error statistic.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PLOT_SETTING_ORDER", "accuracy_plot", "unit_error_plot", "error_keys"]

#: x-axis order: from the most bits to the fewest (weights first, then activations)
PLOT_SETTING_ORDER = ("W8A8", "W4A32", "W4A8", "W4A4", "W3A32", "W2A32", "W2A4")
_MARKERS = {"rtn": "o", "comq": "s", "brecq": "^", "fpxint": "D"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_plot(
    results: Sequence[dict[str, Any]], fp_top1: dict[str, float], methods: Sequence[str], out: Path, title: str = ""
) -> Path:
    """Top-1 vs setting per model (one panel each); returns ``out``."""
    plt = _plt()
    models = [m for m in fp_top1 if any(r["model"] == m for r in results)]
    settings = [s for s in PLOT_SETTING_ORDER if any(r["setting"] == s for r in results)]
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 3.8), squeeze=False, sharey=False)
    for ax, model in zip(axes[0], models):
        ax.axhline(100 * fp_top1[model], color="grey", ls="--", lw=1, label="float")
        for method in methods:
            ys = []
            for s in settings:
                r = next((r for r in results if (r["model"], r["method"], r["setting"]) == (model, method, s)), None)
                ys.append(100 * r["top1"] if r and r.get("status") == "ok" else float("nan"))
            if all(y != y for y in ys):  # nothing measured: keep it in the legend as missing
                ax.plot([], [], marker=_MARKERS.get(method, "x"), ls="none", label=f"{method} (no data)")
                continue
            ax.plot(range(len(settings)), ys, marker=_MARKERS.get(method, "x"), label=method)
        ax.set_xticks(range(len(settings)), settings, rotation=35)
        ax.set_title(model)
        ax.set_ylabel("top-1 % (Fashion-MNIST test)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def error_keys(units: Sequence[dict[str, Any]]) -> list[str]:
    """Numeric per-unit statistics named ``*error*`` (e.g. ``weight_rel_error``, ``recon_error``), first-seen order.

    Other statistics (losses along the optimisation, timings) are not comparable across methods.
    """
    keys: list[str] = []
    for u in units:
        for k, v in u.items():
            if k != "unit" and "error" in k and isinstance(v, (int, float)) and k not in keys:
                keys.append(k)
    return keys


def _short(unit: str) -> str:
    """``resnet.encoder.stages.1.layers.0`` → ``stages.1.layers.0`` (tick labels must stay short)."""
    parts = unit.split(".")
    return ".".join(parts[-4:]) if len(parts) > 4 else unit


def unit_error_plot(
    results: Sequence[dict[str, Any]], models: Sequence[str], methods: Sequence[str], setting: str, out: Path,
    title: str = "",
) -> Path | None:
    """Per-unit errors at one setting: a panel per (model, method), a line per error statistic.

    Methods have different units (RTN: every layer; block methods: blocks), so each gets its own
    panel and x axis. Returns None when no cell at ``setting`` reported per-unit errors.
    """
    plt = _plt()
    cells = {(r["model"], r["method"]): r for r in results
             if r["setting"] == setting and r.get("status") == "ok" and error_keys(r.get("units") or [])}  # fmt: skip
    rows = [m for m in models if any(k[0] == m for k in cells)]
    cols = [m for m in methods if any(k[1] == m for k in cells)]
    if not rows or not cols:
        return None
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(4.8 * len(cols), 3.4 * len(rows)), squeeze=False)
    for i, model in enumerate(rows):
        for j, method in enumerate(cols):
            ax = axes[i][j]
            r = cells.get((model, method))
            ax.set_title(f"{model} · {method} · {setting}", fontsize=9)
            if r is None:
                ax.text(0.5, 0.5, "no per-unit report", ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            units = r["units"]
            for key in error_keys(units):
                ys = [u.get(key, float("nan")) for u in units]
                ax.plot(range(len(ys)), ys, marker=_MARKERS.get(method, "x"), ms=3, label=key)
            ax.set_yscale("log")
            step = max(1, len(units) // 12)
            ticks = list(range(0, len(units), step))
            ax.set_xticks(ticks, [_short(units[t]["unit"]) for t in ticks], rotation=60, ha="right", fontsize=6)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
