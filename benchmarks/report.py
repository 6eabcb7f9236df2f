"""Markdown for ``docs/benchmarks.md``: tables from cell results, and targeted section edits.

``docs/benchmarks.md`` is shared: other engineers own other sections. This module only ever
replaces the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` for its own names
(``models``, ``matrix``), appending the section when it does not exist yet.
Pure functions (strings and dicts), unit-tested without running anything.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DOC_INTRO",
    "pct",
    "signed_pt",
    "cell_text",
    "pivot_table",
    "detail_table",
    "stored_weight_bits",
    "models_table",
    "replace_section",
    "update_doc",
]

DOC_INTRO = """# hf_ptq benchmarks

Measured results of hf_ptq on real data. Each section names the command that produced it; sections
are maintained by different benchmarks (between `<!-- name:start -->` / `<!-- name:end -->` markers),
so edit or regenerate only your own.
"""


def pct(x: float | None, digits: int = 2) -> str:
    """0.9123 → ``"91.23"`` (percent, no sign); None → ``"–"``."""
    return "–" if x is None else f"{100 * x:.{digits}f}"


def signed_pt(x: float | None, digits: int = 2) -> str:
    """An accuracy *drop* in points, shown as a signed change: drop 0.0045 → ``"−0.45"``; gain → ``"+0.10"``."""
    if x is None:
        return "–"
    change = -100 * x
    if round(change, digits) == 0:
        return f"±{0:.{digits}f}"
    return f"{change:+.{digits}f}".replace("-", "−")


class _Notes:
    """Numbers distinct reasons (``n/a``/``error``) so tables show ``n/a [1]`` with a legend."""

    def __init__(self) -> None:
        self.reasons: dict[str, int] = {}

    def ref(self, reason: str) -> str:
        short = reason.strip().splitlines()[0] if reason.strip() else "no reason given"
        short = short if len(short) <= 220 else short[:217] + "..."
        if short not in self.reasons:
            self.reasons[short] = len(self.reasons) + 1
        return f"[{self.reasons[short]}]"

    def legend(self) -> str:
        return "\n".join(f"- [{n}] {r}" for r, n in self.reasons.items())


def cell_text(result: dict[str, Any] | None, notes: _Notes | None = None) -> str:
    """The pivot-table text of one cell: ``"91.55 (−0.45)"``, ``"missing"``, ``"n/a [1]"``, ``"error [2]"``."""
    if result is None:
        return "not run"
    status = result.get("status")
    if status == "ok":
        return f"{pct(result['top1'])} ({signed_pt(result.get('drop'))})"
    if status == "missing":
        return "missing"
    tag = "n/a" if status == "n/a" else (status or "error")
    return f"{tag} {notes.ref(result.get('reason', ''))}" if notes is not None else tag


def _by_key(results: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(r["model"], r["method"], r["setting"]): r for r in results}


def pivot_table(
    results: Sequence[dict[str, Any]], model: str, methods: Sequence[str], settings: Sequence[str], notes: _Notes
) -> str:
    """Methods × settings for one model; each cell is top-1 % and the change vs float in points."""
    idx = _by_key(results)
    lines = ["| method | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for method in methods:
        row = [cell_text(idx.get((model, method, s)), notes) for s in settings]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def detail_table(results: Sequence[dict[str, Any]], notes: _Notes) -> str:
    """Every cell with all measurements (only measured or failed cells; ``missing`` ones are in the pivots)."""
    lines = [
        "| model | method | setting | stored W bits | top-1 % | change (pt) | quant. time (s) | peak RSS (MB) | size ratio | status |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if r.get("status") == "missing":
            continue
        ok = r.get("status") == "ok"
        status = "ok" if ok else cell_text(r, notes)
        lines.append(
            f"| {r['model']} | {r['method']} | {r['setting']} | {stored_weight_bits(r)} | {pct(r.get('top1')) if ok else '–'} | "
            f"{signed_pt(r.get('drop')) if ok else '–'} | "
            f"{_seconds(r.get('quant_seconds'))} | {_num(r.get('peak_rss_mb'), 0)} | {_num(r.get('size_ratio'), 3)} | {status} |"
        )
    return "\n".join(lines)


def stored_weight_bits(result: dict[str, Any]) -> str:
    """Bits stored per weight: ``weight_bits × terms`` for FP=xINT (its ``effective_bits``), else ``weight_bits``."""
    eff = (result.get("method_kwargs") or {}).get("effective_bits")
    bits = eff if eff is not None else result.get("weight_bits")
    if bits is None:
        from .matrix import parse_setting

        bits = parse_setting(result["setting"]).weight_bits
    return str(bits)


def _num(x: float | None, digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _seconds(x: float | None) -> str:
    """Two decimals below 10 s (RTN takes hundredths of a second), one above."""
    return "–" if x is None else f"{x:.2f}" if x < 10 else f"{x:.1f}"


def models_table(infos: dict[str, dict[str, Any]]) -> str:
    """The float reference models: architecture, size, training cost and measured top-1 vs target."""
    lines = [
        "| model | transformers class | params | epochs | train time (min) | threads | FP top-1 % | target % | checkpoint (KB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, info in infos.items():
        met = "" if info["fp_top1"] >= info["target_top1"] else " (below target)"
        lines.append(
            f"| {key} ({info['title']}) | `{info['architecture']}` | {info['params'] / 1e3:.0f} k | "
            f"{info['train']['epochs']:g} | {info['train_seconds'] / 60:.1f} | {info.get('torch_threads', '?')} | "
            f"**{pct(info['fp_top1'])}**{met} | {info['target_top1'] * 100:.0f} | {info['safetensors_bytes'] / 1024:.0f} |"
        )
    return "\n".join(lines)


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with the ``name`` section's content replaced by ``body`` (appended when absent).

    Only the text between the markers changes; everything else in the file is kept byte for byte.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if len(pattern.findall(text)) > 1:
        raise ValueError(f"section {name!r} appears more than once; fix the markers by hand")
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    if (start in text) != (end in text):
        raise ValueError(f"section {name!r} has only one of its markers; fix them by hand")
    return text.rstrip("\n") + "\n\n" + block + "\n"


def update_doc(path: Path, sections: dict[str, str]) -> None:
    """Create ``path`` with a short intro if missing, then replace (or append) each named section."""
    text = path.read_text() if path.exists() else DOC_INTRO
    for name, body in sections.items():
        text = replace_section(text, name, body)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
