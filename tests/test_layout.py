"""The package layout: core vs applications vs model builders, and module size."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "himap_vlm"
MAX_LINES = 500
REASON = "Why this module is over 500 lines"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_module_size_or_a_stated_reason(path):
    text = path.read_text(encoding="utf-8")
    lines = len(text.splitlines())
    doc = ast.get_docstring(ast.parse(text)) or ""
    assert lines <= MAX_LINES or REASON in doc, f"{path.relative_to(SRC)}: {lines} lines and no stated reason"


def test_core_imports_neither_applications_nor_model_builders():
    offenders = []
    for path in sorted((SRC / "core").rglob("*.py")):
        for name in _imports(path):
            if name.startswith(("himap_vlm.apps", "himap_vlm.models")):
                offenders.append(f"{path.relative_to(SRC)} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_engine_does_not_import_the_methods():
    """The engine and the methods share core/interface.py; the engine never imports a method."""
    offenders = []
    for path in sorted((SRC / "core" / "engine").rglob("*.py")):
        for name in _imports(path):
            if name.startswith("himap_vlm.core.methods"):
                offenders.append(f"{path.relative_to(SRC)} imports {name}")
    assert not offenders, "\n".join(offenders)
