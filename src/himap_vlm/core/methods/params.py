"""Method parameters, declared once: a dataclass field with its kind, range and meaning.

A method is a frozen dataclass whose fields are its parameters, each made with one of
:func:`layer`, :func:`ratio`, :func:`integer`, :func:`real`, :func:`flag` or :func:`choice`. The
base class validates every field from that declaration when the method is built (so there is no
second copy of the parameters in an ``__init__`` or a config class) and the CLI, the spec parser,
``flops``, ``bench``, ``eval`` and ``demo`` read the same declarations.

Numbers are accepted from any numeric type that represents them exactly (Python, NumPy and
torch scalars, e.g. values from ``np.linspace``), and stored as plain ``int`` / ``float``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = ["Param", "choice", "coerce", "flag", "integer", "layer", "param_of", "ratio", "real"]

Kind = Literal["layer", "ratio", "int", "float", "bool", "choice"]
_KEY = "himap_param"


@dataclass(frozen=True)
class Param:
    """Declaration of one method parameter.

    Attributes
    ----------
    kind : {"layer", "ratio", "int", "float", "bool", "choice"}
        ``"layer"`` is a decoder-layer index (checked against the model's depth when the method is
        applied); ``"ratio"`` a fraction in [0, 1].
    minimum, maximum : float, optional
        Inclusive bounds (numbers).
    choices : tuple, optional
        Allowed values (``"choice"``).
    optional : bool
        ``None`` is allowed (it switches a feature off; see ``doc``).
    doc : str
        One line for help texts and errors.
    """

    kind: Kind
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    optional: bool = False
    doc: str = ""

    def kind_text(self) -> str:
        """What type of value is expected, in words."""
        return {
            "layer": "an integer layer index",
            "int": "an integer",
            "float": "a number",
            "ratio": "a number",
            "bool": "True or False",
            "choice": "one of " + ", ".join(repr(c) for c in self.choices or ()),
        }[self.kind]

    def range_text(self) -> str:
        """The valid range in words (empty when unbounded)."""
        lo, hi = self.minimum, self.maximum
        if lo is not None and hi is not None:
            return f"in [{_fmt(lo)}, {_fmt(hi)}]"
        if lo is not None:
            return f">= {_fmt(lo)}"
        if hi is not None:
            return f"<= {_fmt(hi)}"
        return ""

    def describe(self) -> str:
        """The valid values, in words (for errors and help)."""
        rng = self.range_text() if self.kind not in ("bool", "choice") else ""
        text = f"{self.kind_text()} {rng}".strip()
        return text + (" or None" if self.optional else "")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _field(default: Any, p: Param) -> Any:
    return dataclasses.field(default=default, metadata={_KEY: p})


def layer(default: int | None, *, minimum: int = 1, optional: bool = False, doc: str = "") -> Any:
    """A decoder-layer index parameter (``minimum`` 1 by default: pruning at K reads layer K-1)."""
    return _field(default, Param("layer", minimum=minimum, optional=optional, doc=doc))


def ratio(default: float, *, doc: str = "") -> Any:
    """A fraction in [0, 1] (e.g. of image tokens pruned)."""
    return _field(default, Param("ratio", minimum=0.0, maximum=1.0, doc=doc))


def integer(
    default: int | None, *, minimum: int | None = None, maximum: int | None = None, optional: bool = False, doc: str = ""
) -> Any:
    """An integer parameter."""
    return _field(default, Param("int", minimum=minimum, maximum=maximum, optional=optional, doc=doc))


def real(default: float, *, minimum: float | None = None, maximum: float | None = None, doc: str = "") -> Any:
    """A finite real parameter."""
    return _field(default, Param("float", minimum=minimum, maximum=maximum, doc=doc))


def flag(default: bool, *, doc: str = "") -> Any:
    """A boolean parameter."""
    return _field(default, Param("bool", doc=doc))


def choice(default: Any, choices: tuple[Any, ...], *, doc: str = "") -> Any:
    """A parameter with a closed set of values."""
    return _field(default, Param("choice", choices=tuple(choices), doc=doc))


def param_of(f: dataclasses.Field) -> Param | None:
    """The declaration of a dataclass field (``None`` for a field that is not a parameter)."""
    return f.metadata.get(_KEY)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ in ("bool_", "bool")


def coerce(name: str, p: Param, value: Any) -> Any:
    """``value`` as the plain Python value of parameter ``name``.

    Integer parameters take any integral type (``int``, ``np.int64``, a 0-d integer tensor);
    real ones any real type (``float``, ``np.float32``, ...). Booleans are not numbers here.

    Raises
    ------
    ValueError
        Naming the parameter, the valid values and what was given.
    """
    extra = f" ({p.doc})" if p.doc else ""

    def bad(hint: str = "") -> ValueError:
        return ValueError(f"{name} must be {p.describe()}{extra}; got {value!r}{hint}")

    if value is None:
        if p.optional:
            return None
        raise bad()
    if p.kind == "bool":
        if not _is_bool(value):
            raise bad()
        return bool(value)
    if p.kind == "choice":
        if isinstance(value, str) and value in (p.choices or ()):
            return value
        raise bad()
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        value = value.item()
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise bad()
    if p.kind in ("layer", "int"):
        if not isinstance(value, numbers.Integral):
            hint = f" (a {type(value).__name__}: pass int({float(value)!r}))" if float(value).is_integer() else ""
            raise bad(hint)
        out: int | float = int(value)
    else:
        out = float(value)
        if not math.isfinite(out):
            raise bad()
    if (p.minimum is not None and out < p.minimum) or (p.maximum is not None and out > p.maximum):
        raise ValueError(f"{name}={_fmt(out)} is out of range: it must be {p.range_text()}{extra}")
    return out
