"""The one spec syntax for method configurations: ``himap(k1=2,r1=0.5)``, method lists, folder names.

Every command (``generate``, ``flops``, ``bench``, ``eval``, ``demo``, ``calibrate``) and the Python
API parse method configurations here.

Syntax
------
A *method list* is a comma-separated list of configurations; a configuration is a registered
method name (:func:`himap_vlm.core.methods.get_method`), optionally followed by its parameters in
parentheses::

    dense,himap,fastv
    dense,himap(k1=2,r1=0.5,k2=8,r2=0.75),himap(k1=2,r1=0.5,k2=15,r2=0.5),fastv(k=2,r=0.5)

The same method may appear several times with different parameters. Parameters left out take
the method's defaults: when the model's depth is known (``num_layers``), the paper's setting
scaled to it (:meth:`~himap_vlm.core.methods.base.PruningMethod.defaults_for`), otherwise the
constructor defaults. *Method arguments* give parameters to every configuration of a method by
name (``;`` separates methods)::

    himap:k1=2,r1=0.5,k2=8,r2=0.75;fastv:k=2,r=0.5

Parameters written in parentheses win over method arguments. Values are read as ``true`` /
``false``, ``none``, integers, floats, or else strings.

Folder names
------------
:attr:`MethodSpec.slug` names a configuration's result folder from its *resolved*
configuration (defaults filled in), so ``himap`` and ``himap(k2=8)`` share one folder:
the method name, then ``_<field>-<value>`` for every numeric field and for every other field
that differs from its default, in the config's field order. ``dense`` -> ``dense``;
``himap`` -> ``himap_k1-2_r1-0.5_k2-8_r2-0.75``; ``fastv(criterion=mean_received)`` ->
``fastv_k-2_r-0.5_criterion-mean_received``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from himap_vlm.core.methods.base import PruningMethod

__all__ = [
    "MethodSpec",
    "MethodSpecError",
    "coerce_value",
    "format_value",
    "parse_method_args",
    "parse_methods",
    "resolve_methods",
]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]")


class MethodSpecError(ValueError):
    """A method list or method arguments that cannot be parsed or do not fit the method."""


def coerce_value(text: str) -> Any:
    """Read a parameter value: ``true``/``false``, ``none``/``null``, int, float, else the string."""
    value = text.strip()
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(value)
        except ValueError:
            pass
    return value


def format_value(value: Any) -> str:
    """A parameter value as written in labels and folder names (``0.5``, ``2``, ``true``, ``none``)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e16 else repr(value)
    return str(value)


def _split_top_level(text: str, sep: str, what: str) -> list[str]:
    """Split ``text`` on ``sep`` outside parentheses; raise on unbalanced parentheses."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for ch in text:
        if ch == "(":
            depth += 1
            if depth > 1:
                raise MethodSpecError(f"{what}: nested parentheses are not allowed in {text!r}")
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise MethodSpecError(f"{what}: unbalanced ')' in {text!r}")
        if ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise MethodSpecError(f"{what}: missing ')' in {text!r}")
    parts.append("".join(current))
    return parts


def _parse_pairs(text: str, where: str) -> dict[str, Any]:
    """``k1=2,r1=0.5`` -> ``{"k1": 2, "r1": 0.5}`` (``-`` in keys read as ``_``)."""
    out: dict[str, Any] = {}
    for raw in text.split(","):
        pair = raw.strip()
        if not pair:
            raise MethodSpecError(f"{where}: empty parameter in {text!r} (stray comma?)")
        if "=" not in pair:
            raise MethodSpecError(f"{where}: expected KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        key = key.strip()
        if not _KEY.match(key):
            raise MethodSpecError(f"{where}: invalid parameter name {key!r}")
        key = key.replace("-", "_")
        if key in out:
            raise MethodSpecError(f"{where}: parameter {key!r} given twice")
        if not value.strip():
            raise MethodSpecError(f"{where}: parameter {key!r} has no value")
        out[key] = coerce_value(value)
    return out


def _method_class(name: str) -> type[PruningMethod]:
    from himap_vlm.core.methods.registry import get_method

    try:
        return get_method(name)
    except ValueError as exc:
        raise MethodSpecError(str(exc)) from None


def _accepted_params(cls: type[PruningMethod]) -> list[str]:
    return list(cls.params())


@dataclass(frozen=True)
class MethodSpec:
    """One method configuration.

    Parameters
    ----------
    name : str
        Registered method name or alias (``dense``, ``himap``, ``fastv``, ``random``, ``vtw``, ...);
        stored as the canonical name.
    params : dict
        Parameters given explicitly; the others take the method's defaults.
    num_layers : int, optional
        Decoder layers of the model the configuration is for: defaults then come from
        ``defaults_for(num_layers)`` and :meth:`build` checks the configuration fits that depth.

    Raises
    ------
    MethodSpecError
        For an unknown method, a parameter the method does not take, or a value it refuses.
    """

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    num_layers: int | None = None

    def __post_init__(self) -> None:
        cls = _method_class(self.name)
        object.__setattr__(self, "name", cls.name)
        object.__setattr__(self, "params", {k.replace("-", "_"): v for k, v in dict(self.params).items()})
        accepted = _accepted_params(cls)
        unknown = sorted(set(self.params) - set(accepted))
        if unknown:
            raise MethodSpecError(
                f"method {cls.name!r} does not take {', '.join(repr(u) for u in unknown)}; "
                f"its parameters are: {', '.join(accepted) or '(none)'}"
            )
        self.build()  # validates values now rather than at evaluation time

    # ------------------------------------------------------------------ construction
    @classmethod
    def parse(
        cls, text: str, defaults: Mapping[str, Mapping[str, Any]] | None = None, num_layers: int | None = None
    ) -> MethodSpec:
        """Parse one configuration, ``name`` or ``name(k=v,...)``.

        Parameters
        ----------
        text : str
            The configuration.
        defaults : mapping, optional
            Method arguments by method name (see :func:`parse_method_args`); parameters in
            parentheses win.
        num_layers : int, optional
            The model's depth (see the class).
        """
        item = text.strip()
        m = re.fullmatch(r"([^()\s]+)\s*(?:\((.*)\))?", item, flags=re.S)
        if not item or m is None:
            raise MethodSpecError(
                f"invalid method configuration {text!r}: write NAME or NAME(KEY=VALUE,...), e.g. himap(k1=2,r1=0.5)"
            )
        name, inner = m.group(1), m.group(2)
        if not _NAME.match(name):
            raise MethodSpecError(f"invalid method name {name!r} in {text!r}")
        canonical = _method_class(name).name
        params: dict[str, Any] = dict((defaults or {}).get(canonical, {}))
        if inner is not None and inner.strip():
            params.update(_parse_pairs(inner, f"method {name!r}"))
        return cls(canonical, params, num_layers)

    @classmethod
    def from_method(cls, method: PruningMethod, num_layers: int | None = None) -> MethodSpec:
        """The spec of an already built method (its full configuration as parameters)."""
        return cls(method.name, dict(method.config), num_layers)

    def resolved_params(self) -> dict[str, Any]:
        """The constructor arguments: depth-scaled defaults (when the depth is known), then the explicit ones."""
        cls = _method_class(self.name)
        base = cls.defaults_for(self.num_layers) if self.num_layers is not None else {}
        return {**base, **self.params}

    def build(self) -> PruningMethod:
        """A new method instance, checked against ``num_layers`` when it is known.

        Raises
        ------
        MethodSpecError
            For a refused value or a configuration that does not fit the depth.
        """
        cls = _method_class(self.name)
        try:
            method = cls(**self.resolved_params())
            if self.num_layers is not None:
                method.validate_for_model(self.num_layers)
        except (TypeError, ValueError) as exc:
            text = str(exc)
            raise MethodSpecError(text if text.startswith(f"{self.name}:") else f"{self.name}: {text}") from None
        return method

    # ------------------------------------------------------------------ naming
    @property
    def config(self) -> dict[str, Any]:
        """The resolved configuration (every parameter, defaults included)."""
        return dict(self.build().config)

    @property
    def slug(self) -> str:
        """Stable, readable folder name, e.g. ``himap_k1-2_r1-0.5_k2-8_r2-0.75`` (see module docstring)."""
        method = self.build()
        parts = [self.name]
        for f in dataclasses.fields(method):
            if f.name not in method.params():
                continue
            value = getattr(method, f.name)
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric or value != f.default:
                parts.append(f"{f.name}-{format_value(value)}")
        return _SLUG_UNSAFE.sub("_", "_".join(parts))

    @property
    def label(self) -> str:
        """Human-readable form, ``name(k=v,...)`` with the explicit parameters (or just ``name``)."""
        if not self.params:
            return self.name
        inner = ",".join(f"{k}={format_value(v)}" for k, v in self.params.items())
        return f"{self.name}({inner})"

    @property
    def full_label(self) -> str:
        """``name(k=v,...)`` with every resolved parameter (parseable back with :meth:`parse`)."""
        config = self.config
        if not config:
            return self.name
        return f"{self.name}({','.join(f'{k}={format_value(v)}' for k, v in config.items())})"

    def __str__(self) -> str:
        return self.label


def parse_method_args(texts: str | Iterable[str] | None) -> dict[str, dict[str, Any]]:
    """Parse method arguments ``"himap:k1=2,r1=0.5;fastv:k=2,r=0.5"`` (one string or several).

    Returns
    -------
    dict
        Parameters by (lowercase) method name.

    Raises
    ------
    MethodSpecError
        For a malformed entry or a method named twice.
    """
    if texts is None:
        return {}
    items = [texts] if isinstance(texts, str) else list(texts)
    out: dict[str, dict[str, Any]] = {}
    for text in items:
        for entry in text.split(";"):
            entry = entry.strip()
            if not entry:
                continue
            if ":" not in entry:
                raise MethodSpecError(
                    f"method arguments: expected METHOD:KEY=VALUE,... (e.g. himap:k1=2,r1=0.5), got {entry!r}"
                )
            name, pairs = entry.split(":", 1)
            name = name.strip().lower()
            if not _NAME.match(name):
                raise MethodSpecError(f"method arguments: invalid method name {name!r} in {entry!r}")
            name = _method_class(name).name
            if name in out:
                raise MethodSpecError(f"method arguments: method {name!r} given twice")
            out[name] = _parse_pairs(pairs, f"method arguments for {name!r}") if pairs.strip() else {}
    return out


def parse_methods(
    texts: str | Iterable[str],
    method_args: str | Iterable[str] | Mapping[str, Mapping[str, Any]] | None = None,
    num_layers: int | None = None,
) -> list[MethodSpec]:
    """Parse a method list (one string or several, e.g. a repeated ``--methods``).

    Parameters
    ----------
    texts : str or iterable of str
        ``"dense,himap(k1=2,r1=0.5,k2=8,r2=0.75),fastv"``; see the module docstring.
    method_args : str, iterable of str, or mapping, optional
        Method arguments (``"himap:k1=2;fastv:k=2"``), or their parsed form.
    num_layers : int, optional
        The model's depth (defaults scaled to it; configurations checked against it).

    Returns
    -------
    list of MethodSpec
        In the order given.

    Raises
    ------
    MethodSpecError
        For a syntax error, an unknown method or parameter, a refused value, method arguments
        for a method that is not listed, or two entries with the same resolved configuration.
    """
    items = [texts] if isinstance(texts, str) else list(texts)
    defaults = (
        {k.lower(): dict(v) for k, v in method_args.items()}
        if isinstance(method_args, Mapping)
        else parse_method_args(method_args)
    )
    specs: list[MethodSpec] = []
    for text in items:
        for part in _split_top_level(text, ",", "methods"):
            if not part.strip():
                raise MethodSpecError(f"methods: empty entry in {text!r} (stray comma?)")
            specs.append(MethodSpec.parse(part, defaults, num_layers))
    if not specs:
        raise MethodSpecError("methods: give at least one method (e.g. dense,himap,fastv)")
    listed = {s.name for s in specs}
    extra = sorted(set(defaults) - listed)
    if extra:
        raise MethodSpecError(
            f"method arguments given for {', '.join(repr(e) for e in extra)}, which is not in the method list "
            f"({', '.join(sorted(listed))})"
        )
    seen: dict[str, MethodSpec] = {}
    for spec in specs:
        slug = spec.slug
        if slug in seen:
            raise MethodSpecError(
                f"methods: {seen[slug].label!r} and {spec.label!r} are the same configuration ({slug})"
            )
        seen[slug] = spec
    return specs


def resolve_methods(
    methods: str | MethodSpec | PruningMethod | Sequence[str | MethodSpec | PruningMethod],
    num_layers: int | None = None,
) -> list[MethodSpec]:
    """Normalise strings, specs and built methods into a list of :class:`MethodSpec`.

    Strings are parsed with :func:`parse_methods` (so ``"dense,himap"`` is two methods); built
    :class:`~himap_vlm.core.methods.base.PruningMethod` instances are converted with
    :meth:`MethodSpec.from_method`.
    """
    from himap_vlm.core.methods.base import PruningMethod

    items: list[Any] = [methods] if isinstance(methods, (str, MethodSpec, PruningMethod)) else list(methods)
    specs: list[MethodSpec] = []
    for item in items:
        if isinstance(item, MethodSpec):
            same = num_layers is None or item.num_layers == num_layers
            specs.append(item if same else MethodSpec(item.name, item.params, num_layers))
        elif isinstance(item, PruningMethod):
            specs.append(MethodSpec.from_method(item, num_layers))
        elif isinstance(item, str):
            specs.extend(parse_methods(item, num_layers=num_layers))
        else:
            raise MethodSpecError(
                f"methods must be strings, MethodSpec or PruningMethod instances; got {type(item).__name__}"
            )
    if not specs:
        raise MethodSpecError("methods: give at least one method")
    seen: dict[str, MethodSpec] = {}
    for spec in specs:
        if spec.slug in seen:
            raise MethodSpecError(
                f"methods: {seen[spec.slug].label!r} and {spec.label!r} are the same configuration"
            )
        seen[spec.slug] = spec
    return specs
