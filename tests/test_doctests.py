"""The examples in the docstrings are true: every module of the learner core, the index and
the evaluation package that has examples runs them."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ("models", "index", "evaluation", "streams")


def _modules() -> list[str]:
    names = []
    for pkg in PACKAGES:
        path = importlib.import_module(pkg).__path__
        names += [f"{pkg}.{m.name}" for m in pkgutil.iter_modules(path)]
    return names


def _with_examples() -> list[str]:
    finder = doctest.DocTestFinder()
    return [name for name in _modules()
            if any(t.examples for t in finder.find(importlib.import_module(name)))]


@pytest.mark.parametrize("name", _with_examples())
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0, result


def test_the_model_classes_carry_examples() -> None:
    """Each class a newcomer reads first shows what it computes."""
    assert {"models.two_tower", "models.lr_rules", "models.covisit", "models.snapshot",
            "models.examples", "models.user_state", "models.model",
            "models.trainer", "models.personal", "models.serving"} <= set(_with_examples())
