"""The examples in the docstrings of the metric modules run and hold."""

from __future__ import annotations

import doctest

import pytest

import himap_vlm.apps.eval.metrics.cider
import himap_vlm.apps.eval.metrics.vqa
import himap_vlm.apps.eval.tasks


@pytest.mark.parametrize("module", [himap_vlm.apps.eval.metrics.vqa, himap_vlm.apps.eval.metrics.cider, himap_vlm.apps.eval.tasks])
def test_docstring_examples(module: object) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)  # type: ignore[arg-type]
    assert result.attempted > 0
    assert result.failed == 0
