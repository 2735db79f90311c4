"""Shape rules a newcomer relies on, checked on the whole tree: no function longer than a
screen (60 lines), so each one can be read at once, and `ruff` clean with the rules and the
complexity bound (mccabe <= 15) that pyproject.toml sets: CI runs the tests, not `make lint`,
so a lint failure has to fail a test to stop a commit."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("streams", "models", "evaluation", "index", "bench", "tests")
MAX_LINES = 60


def test_no_function_is_longer_than_a_screen() -> None:
    long = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {n}")
    assert not long, long


def test_ruff_is_clean() -> None:
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
