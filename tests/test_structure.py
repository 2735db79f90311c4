"""Shape rules a newcomer relies on, checked on the whole tree: no function longer than a
screen (60 lines), so each one can be read at once."""

from __future__ import annotations

import ast
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
