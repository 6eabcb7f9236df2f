"""The README's set-up and test commands are exactly the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[list[str]]:
    return [[line.strip() for line in b.strip().splitlines()] for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    blocks = _bash_blocks(readme)
    setup = next(b for b in blocks if any(line.startswith("pip install torch==2.13.0") for line in b))
    tests = next(b for b in blocks if b == ["python -m pytest"])
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci_commands = [line for line in ci if line and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci_commands == setup + tests
