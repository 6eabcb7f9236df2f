"""Where a result came from: machine, library versions, git commit and whether the tree was dirty.

The working tree is shared with other engineers, so the commit alone may not describe the code
that ran; ``git_state`` also says whether ``hf_ptq/`` or ``benchmarks/`` had uncommitted changes.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from . import REPO_ROOT

__all__ = ["machine_description", "git_state", "provenance"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return None


def machine_description(threads: int) -> str:
    """E.g. ``"2 CPU cores (Intel Xeon ...), 23.5 GiB RAM, torch threads 2, Linux x86_64"``."""
    ram = _ram_gib()
    ram_text = f"{ram:.1f} GiB RAM" if ram is not None else "RAM unknown"
    return (
        f"{os.cpu_count()} CPU cores ({_cpu_model()}), {ram_text}, torch threads {threads}, "
        f"{platform.system()} {platform.machine()}; no GPU"
    )


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def git_state(paths: tuple[str, ...] = ("hf_ptq", "benchmarks")) -> dict[str, Any]:
    """Commit of HEAD and whether the measured code (``paths``) had uncommitted changes."""
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = bool(_git("status", "--porcelain", "--", *paths))
    return {"commit": commit, "dirty": dirty}


def provenance(threads: int, paths: tuple[str, ...] = ("hf_ptq", "benchmarks")) -> dict[str, Any]:
    """Date, machine, versions and git state; ``paths`` = the code whose uncommitted changes matter."""
    import torch
    import transformers

    import hf_ptq

    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine_description(threads),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_ptq": hf_ptq.__version__,
        **git_state(paths),
    }
