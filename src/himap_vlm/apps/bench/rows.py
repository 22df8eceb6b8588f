"""Benchmark rows: which method configurations run, by our engine or reference-style.

Rows are written in the one spec syntax of :mod:`himap_vlm.core.methods.spec`
(``"dense,himap,fastv(r=0.75)"``); a bare name takes the method's paper setting scaled to the
model's depth (:meth:`~himap_vlm.core.methods.base.PruningMethod.defaults_for`), and ``"all"``
stands for every registered method. Nothing here knows any method by name except ``dense``, the
baseline every other row is compared with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from himap_vlm.apps.bench.reference_style import ReferenceStyle
from himap_vlm.core.methods import get_method, method_names
from himap_vlm.core.methods.base import PruningMethod
from himap_vlm.core.methods.spec import MethodSpec, MethodSpecError, resolve_methods

__all__ = ["ALL", "BASELINE", "REFERENCE_SUFFIX", "RowSpec", "build_rows", "expand_all", "reference_capable"]

BASELINE = "dense"
"""The method every row is compared with (always run, first unless listed elsewhere)."""
REFERENCE_SUFFIX = " (reference-style)"
ALL = "all"
"""Method-list keyword: every registered method (:func:`himap_vlm.core.methods.method_names`)."""


@dataclass(frozen=True)
class RowSpec:
    """One row of the benchmark: a method with its arguments, run by our engine or reference-style.

    Attributes
    ----------
    name : str
        Label (``"himap"``, ``"himap(k2=4)"``, ``"himap (reference-style)"``).
    method : str
        Registered method name.
    args : dict
        Constructor arguments.
    style : {"engine", "reference"}
        ``"engine"``: our engine, SDPA (or the model's kernel), KV cache. ``"reference"``: the
        authors' approach (:class:`~himap_vlm.apps.bench.reference_style.ReferenceStyle`).
    """

    name: str
    method: str
    args: dict[str, Any] = field(default_factory=dict)
    style: str = "engine"

    @classmethod
    def from_spec(cls, spec: MethodSpec, style: str = "engine") -> RowSpec:
        """The row of a parsed configuration (its label, its full resolved configuration)."""
        name = spec.label + (REFERENCE_SUFFIX if style == "reference" else "")
        return cls(name, spec.name, dict(spec.config), style)

    def build(self) -> PruningMethod:
        """A fresh method instance (wrapped in :class:`ReferenceStyle` for reference rows)."""
        method = get_method(self.method)(**self.args)
        return ReferenceStyle(method) if self.style == "reference" else method


def expand_all(methods: str) -> str:
    """``"all"`` -> every registered method, comma-separated; any other method list unchanged."""
    return ",".join(method_names()) if methods.strip().lower() == ALL else methods


def reference_capable(spec: MethodSpec) -> bool:
    """Whether a configuration has a reference-style counterpart (static, no attention edits, not dense)."""
    method = spec.build()
    return spec.name != BASELINE and not method.dynamic and not method.attention_edits()


def _reference_specs(
    reference: str | Sequence[str | MethodSpec], engine: list[MethodSpec], num_layers: int
) -> list[MethodSpec]:
    """The configurations (among ``engine``) that also get a reference-style row.

    ``reference`` is parsed like a method list. An entry without parameters (``himap``) picks
    every listed configuration of that method; one with parameters must be one of the listed
    configurations; ``"all"`` picks every listed configuration :func:`reference_capable`
    accepts; ``"none"`` or an empty list picks none.
    """
    if isinstance(reference, str):
        text = reference.strip().lower()
        if text in ("", "none"):
            return []
        if text == ALL:
            return [s for s in engine if reference_capable(s)]
    elif not reference:
        return []
    listed = ", ".join(s.label for s in engine)
    wanted: list[MethodSpec] = []
    for spec in resolve_methods(reference, num_layers):
        if spec.params:
            matches = [s for s in engine if s.slug == spec.slug]
            what = f"configuration {spec.label!r}"
        else:
            matches = [s for s in engine if s.name == spec.name]
            what = f"method {spec.name!r}"
        if not matches:
            raise MethodSpecError(
                f"reference-style rows asked for {what}, which is not in the methods to run ({listed}); "
                "add it to the methods"
            )
        wanted.extend(m for m in matches if m not in wanted)
    return wanted


def build_rows(
    methods: str | Sequence[str | MethodSpec | PruningMethod],
    num_layers: int,
    reference: str | Sequence[str | MethodSpec] = (),
) -> list[RowSpec]:
    """Rows for ``methods`` (dense first, added when missing) and their reference-style rows.

    Parameters
    ----------
    methods : str or sequence
        A method list in the spec syntax (``"dense,himap,fastv(r=0.75)"``, or ``"all"``), or
        parsed :class:`~himap_vlm.core.methods.spec.MethodSpec` / built methods. Bare names take
        :meth:`defaults_for` ``num_layers``.
    num_layers : int
        Decoder layers of the model (defaults scale to it; every configuration is checked
        against it).
    reference : str or sequence
        Configurations that also get a reference-style row: method names (every listed
        configuration of the method), configurations (one of the listed ones), ``"all"`` (every
        listed static configuration without attention edits, dense excepted) or ``"none"``.

    Returns
    -------
    list of RowSpec

    Raises
    ------
    MethodSpecError
        (a ``ValueError``) for a syntax error, an unknown method or parameter, a refused value, a
        configuration that does not fit ``num_layers``, or a reference row for a configuration
        that is not run or has no reference-style counterpart.
    """
    if isinstance(methods, str):
        methods = expand_all(methods)
    specs = resolve_methods(methods, num_layers)
    if not any(s.name == BASELINE for s in specs):
        specs.insert(0, MethodSpec(BASELINE, {}, num_layers))
    rows = [RowSpec.from_spec(s) for s in specs]
    for spec in _reference_specs(reference, specs, num_layers):
        try:
            ReferenceStyle(spec.build())
        except ValueError as exc:
            raise MethodSpecError(f"{spec.label}: no reference-style row: {exc}") from None
        rows.append(RowSpec.from_spec(spec, "reference"))
    return rows
