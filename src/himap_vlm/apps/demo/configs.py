"""The demo's configurations, read from the method registry (nothing here names a method).

Every registered method (:func:`himap_vlm.core.methods.method_names`, listing order) runs at
``defaults_for(L)`` -- its paper setting scaled to the model's depth ``L`` -- and at each of its
``budgets(L)`` (harsher settings, where methods separate on a small model). A method file added
to :mod:`himap_vlm.core.methods` appears in the demo with no edit here. The rule shown to users
(:func:`configuration_rule`) is generated from the same methods: each one's ``defaults_for`` /
``budgets`` docstring (the formula, in ``L``) and the resulting configurations' full labels.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from himap_vlm.core.methods.base import PruningMethod
    from himap_vlm.core.methods.spec import MethodSpec

__all__ = ["DemoConfig", "configuration_rule", "demo_configurations", "rule_lines"]


@dataclass(frozen=True)
class DemoConfig:
    """One configuration of the demo.

    Attributes
    ----------
    spec : MethodSpec
        The method and its parameters (what the eval runner and the timing run), for the model's depth.
    paper_default : bool
        Whether it is the method's ``defaults_for(L)`` (the paper setting scaled to the model depth).
    """

    spec: MethodSpec
    paper_default: bool


def _default_spec(name: str, num_layers: int) -> MethodSpec:
    """``defaults_for(L)`` as a spec whose label shows those parameters (raises if it does not fit)."""
    from himap_vlm.core.methods import get_method
    from himap_vlm.core.methods.spec import MethodSpec

    return MethodSpec(name, get_method(name).defaults_for(num_layers), num_layers)


def _expand(
    name: str, num_layers: int, budgets: bool = True
) -> list[tuple[MethodSpec | None, bool, str, str | None]]:
    """``defaults_for(L)`` then ``budgets(L)``: ``(spec or None, is default, label, why it does not fit)``."""
    from himap_vlm.core.methods import get_method
    from himap_vlm.core.methods.spec import MethodSpec, MethodSpecError, format_value

    cls = get_method(name)
    out: list[tuple[MethodSpec | None, bool, str, str | None]] = []
    settings = [cls.defaults_for(num_layers), *(cls.budgets(num_layers) if budgets else [])]
    for i, params in enumerate(settings):
        label = f"{name}({','.join(f'{k}={format_value(v)}' for k, v in params.items())})" if params else name
        try:
            out.append((MethodSpec(name, params, num_layers), i == 0, label, None))
        except MethodSpecError as exc:
            reason = str(exc)
            twice = f"{name}: {name}: "
            out.append((None, i == 0, label, reason[len(name) + 2 :] if reason.startswith(twice) else reason))
    return out


def demo_configurations(
    methods: str | Iterable[str] | None, num_layers: int, budgets: bool = True
) -> tuple[list[DemoConfig], list[dict[str, str]]]:
    """Expand a method list into the demo's configurations.

    Parameters
    ----------
    methods : str, iterable of str, or None
        A method list in the one spec syntax (:func:`himap_vlm.core.methods.spec.parse_methods`,
        e.g. ``"dense,himap,fastv(k=2,r=0.75)"``; several strings are concatenated). A name alone
        gives the method's ``defaults_for(L)`` and its ``budgets(L)``; ``NAME(KEY=VALUE,...)``
        gives that configuration only (parameters left out: ``defaults_for(L)``). ``None``: every
        registered method, in :func:`~himap_vlm.core.methods.method_names` order.
    num_layers : int
        Decoder layers of the model (``L``).
    budgets : bool
        Whether a name alone also runs the method's ``budgets(L)`` (``False``: its
        ``defaults_for(L)`` only, the reduced set for larger models).

    Returns
    -------
    configs : list of DemoConfig
        Dense first (added when missing), then in the order given; a budget equal to a
        configuration already listed is not repeated.
    skipped : list of dict
        ``{"label", "reason"}`` for budgets (and, with ``methods=None``, defaults) that do not
        fit the model's depth.

    Raises
    ------
    himap_vlm.core.methods.spec.MethodSpecError
        For a syntax error, an unknown method or parameter, two entries with the same
        configuration, or a configuration given (or a name whose ``defaults_for(L)``) that
        does not fit the model -- as ``himap eval`` refuses them.
    """
    from himap_vlm.core.methods import method_names
    from himap_vlm.core.methods.spec import MethodSpec, parse_methods

    if methods is None:  # every method; defaults that do not fit this depth are skipped, not refused
        entries = [MethodSpec(name) for name in method_names()]
    else:
        entries = parse_methods(methods, num_layers=num_layers)

    configs: list[DemoConfig] = []
    skipped: list[dict[str, str]] = []
    seen: set[str] = set()

    def add(spec: MethodSpec, paper_default: bool) -> None:
        if spec.slug not in seen:
            seen.add(spec.slug)
            configs.append(DemoConfig(spec, paper_default))

    if all(e.name != "dense" for e in entries):
        add(_default_spec("dense", num_layers), True)
    for entry in entries:
        if entry.params:
            add(entry, _is_default(entry, num_layers))
            continue
        for spec, is_default, label, reason in _expand(entry.name, num_layers, budgets):
            if spec is None:
                skipped.append({"label": label, "reason": str(reason)})
            else:
                add(spec, is_default)
    configs.sort(key=lambda c: c.spec.name != "dense")  # stable: dense first, the rest as given
    return configs, skipped


def _is_default(spec: MethodSpec, num_layers: int) -> bool:
    from himap_vlm.core.methods.spec import MethodSpecError

    try:
        return spec.config == _default_spec(spec.name, num_layers).config
    except MethodSpecError:
        return False


def _doc_line(cls: type[PruningMethod], attr: str) -> str | None:
    """First docstring line of ``cls.<attr>`` when the method overrides it (``None`` otherwise)."""
    from himap_vlm.core.methods.base import PruningMethod

    if getattr(cls, attr).__func__ is getattr(PruningMethod, attr).__func__:
        return None
    doc = inspect.getdoc(getattr(cls, attr)) or ""
    line = doc.strip().splitlines()[0] if doc.strip() else ""
    return line.replace("``", "").rstrip(".") or None


def configuration_rule(num_layers: int, methods: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """How each method's configurations are chosen at depth ``num_layers``, from the methods themselves.

    Parameters
    ----------
    num_layers : int
        The model's depth ``L``.
    methods : iterable of str, optional
        Method names (default: every registered method, listing order).

    Returns
    -------
    list of dict
        Per method: ``method``; ``defaults_rule`` / ``budgets_rule`` (the first docstring line
        of its ``defaults_for`` / ``budgets``: the formula in ``L``; ``None`` when the method
        keeps the base class's: constructor defaults, no budgets); ``default`` and ``budgets``
        (the resulting configurations' full labels, or ``"... (does not fit: reason)"``).
    """
    from himap_vlm.core.methods import get_method, method_names

    out = []
    for name in dict.fromkeys(methods if methods is not None else method_names()):
        cls = get_method(name)
        labels = []
        for spec, _, label, reason in _expand(cls.name, num_layers):
            labels.append(spec.full_label if spec is not None else f"{label} (does not fit: {reason})")
        out.append(
            {
                "method": cls.name,
                "defaults_rule": _doc_line(cls, "defaults_for"),
                "budgets_rule": _doc_line(cls, "budgets"),
                "default": labels[0],
                "budgets": labels[1:],
            }
        )
    return out


def rule_lines(rule: list[dict[str, Any]], num_layers: int) -> list[str]:
    """:func:`configuration_rule` as console lines (one per method)."""
    lines = []
    for r in rule:
        default = r["defaults_rule"] or "constructor defaults"
        text = f"{r['method']}: defaults_for({num_layers}) [{default}] = {r['default']}"
        if r["budgets"]:
            text += f"; budgets({num_layers}) [{r['budgets_rule'] or 'none'}] = {', '.join(r['budgets'])}"
        lines.append(text)
    return lines
