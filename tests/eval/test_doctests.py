"""The examples in the docstrings of the metric modules run and hold."""

from __future__ import annotations

import doctest

import pytest

import himap.eval.metrics.cider
import himap.eval.metrics.vqa
import himap.eval.tasks


@pytest.mark.parametrize("module", [himap.eval.metrics.vqa, himap.eval.metrics.cider, himap.eval.tasks])
def test_docstring_examples(module: object) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)  # type: ignore[arg-type]
    assert result.attempted > 0
    assert result.failed == 0
