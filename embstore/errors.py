"""Every error a user can cause, in one place, and the constraints that decide when a parameter causes one.

Each class subclasses the closest built-in so callers can catch either. The CLI turns any
:class:`EmbstoreError` into one line on stderr and exit code 2; a traceback is a bug.
Messages name the bad value and say how to fix it.

Parameter constraints (scikit-learn's ``_parameter_constraints`` is the model): each config class lists what its
parameters accept once, in a class-level ``parameter_constraints`` table of :class:`Choice`, :class:`Interval`,
:class:`ListOf` and :class:`Optional`; :func:`validate_params` checks an instance against it and raises
:class:`InvalidParameterError` ("The 'pooling' parameter of ExtractConfig must be a comma list of cls, mean, max.
Got 'avg' instead."). The CLI builds its ``click.Choice`` types and the allowed values in its help text from the
same tables, and names the ``--flag`` in the message instead of the parameter.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

__all__ = [
    "EmbstoreError",
    "DataError",
    "ColumnNotFoundError",
    "DataFileNotFoundError",
    "ModelNotFoundError",
    "LayerSpecError",
    "StoreNotFoundError",
    "StoreIncompleteError",
    "StoreMismatchError",
    "OutputNotWritableError",
    "DiskFullError",
    "ConfigError",
    "CarveError",
    "StoreBusyError",
    "StoreDamagedError",
    "RankFailedError",
    "ForwardError",
    "StoreCorruptedError",
    "InvalidParameterError",
    "NonFiniteValuesError",
    "Constraint",
    "Choice",
    "Interval",
    "Text",
    "ListOf",
    "Optional",
    "validate_params",
]


class EmbstoreError(Exception):
    """Base class of every error caused by user input or the environment."""


class ConfigError(EmbstoreError, ValueError):
    """An option has a value outside what it accepts."""


class CarveError(ConfigError):
    """A carve cannot hold every class (or keep groups apart) on both sides.

    ``detail`` says why with the sizes, for a caller to put after what it carved and before the option that fixes
    it: ``f"The validation carve of {what} {e.detail}; raise --validation-fraction."``.
    """

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"The carve {detail}.")


class DataError(EmbstoreError, ValueError):
    """The data file parses but its content cannot be used (empty, NaN rows, missing labels)."""


class ColumnNotFoundError(DataError):
    """A named column is not in the data file."""


class DataFileNotFoundError(EmbstoreError, FileNotFoundError):
    """A data file does not exist."""


class ModelNotFoundError(EmbstoreError, FileNotFoundError):
    """A --model value is neither built in, a local directory, nor in the local HF cache."""


class LayerSpecError(EmbstoreError, ValueError):
    """A layer specification is malformed or names layers the model/store does not have."""


class StoreNotFoundError(EmbstoreError, FileNotFoundError):
    """No store at the given path."""


class StoreIncompleteError(EmbstoreError, RuntimeError):
    """The store exists but its extraction has not finished."""


class StoreMismatchError(EmbstoreError, ValueError):
    """A store exists at the output path but was made from other inputs or another schema."""


class OutputNotWritableError(EmbstoreError, PermissionError):
    """The output location cannot be created or written."""


class DiskFullError(EmbstoreError, OSError):
    """Not enough free space for the store."""


class StoreBusyError(EmbstoreError, BlockingIOError):
    """Another process holds the store's write lock."""


class StoreDamagedError(EmbstoreError, ValueError):
    """A store's metadata exists but cannot be parsed (a torn or edited zarr.json / HDF5 attribute)."""


class RankFailedError(EmbstoreError, RuntimeError):
    """One rank of a multi-process run failed; every rank stops with this error."""


class ForwardError(EmbstoreError, RuntimeError):
    """The model raised an exception in its forward pass over a batch (the message names the model and the batch)."""


class StoreCorruptedError(EmbstoreError, ValueError):
    """Data read from a store does not match the checksum recorded when it was written."""


class NonFiniteValuesError(EmbstoreError, ArithmeticError):
    """A hidden state is inf or NaN, from the model or once cast to the storage dtype: never stored silently."""


class InvalidParameterError(ConfigError):
    """A parameter's value is outside what its constraint accepts. It keeps the parts of its message, so the CLI
    can name the ``--flag`` the user typed instead of the parameter (:meth:`message`)."""

    def __init__(self, name: str, owner: str | None, requirement: str, got: str, hint: str | None = None) -> None:
        self.name, self.owner, self.requirement, self.got, self.hint = name, owner, requirement, got, hint
        of = f" of {owner}" if owner else ""
        super().__init__(self.message(f"The '{name}' parameter{of}"))

    def message(self, subject: str) -> str:
        """The message with ``subject`` ("The --pooling option") in place of "The 'pooling' parameter of ..."."""
        return f"{subject} must be {self.requirement}. Got {self.got} instead." + (f" {self.hint}" if self.hint else "")


def _shown(value: Any) -> str:
    """A value as the user wrote it: strings quoted, lists as the comma list they were typed as."""
    if isinstance(value, (list, tuple)):
        return repr(",".join(str(v) for v in value)) if value else "nothing"
    return repr(value)


class Constraint:
    """What one parameter accepts. ``desc`` replaces the generated description (to say a unit or what 0 means);
    ``hint`` is a fix appended to the message."""

    def __init__(self, *, desc: str | None = None, hint: str | None = None) -> None:
        self.desc, self.hint = desc, hint

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError

    def generated(self) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        """What the parameter must be, after "must be": 'one of cls, mean, max', 'a positive integer'."""
        return self.desc or self.generated()

    @property
    def choices(self) -> tuple[str, ...] | None:
        """The words a user may type (for ``click.Choice`` and help text); None for numbers."""
        return None

    def error(self, name: str, value: Any, owner: str | None = None) -> InvalidParameterError:
        """The error refusing ``value`` of parameter ``name`` (of ``owner``)."""
        return InvalidParameterError(name, owner, self.describe(), _shown(value), self.hint)

    def check(self, name: str, value: Any, owner: str | None = None) -> None:
        """Raise :meth:`error` unless ``value`` is accepted."""
        if not self.accepts(value):
            raise self.error(name, value, owner)


class Choice(Constraint):
    """One of a fixed set of strings: a tuple, or a ``Literal[...]`` alias (which then types the field too)."""

    def __init__(self, values: Any, **kw: Any) -> None:
        super().__init__(**kw)
        self.values: tuple[str, ...] = get_args(values) if get_origin(values) is Literal else tuple(values)

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.values

    def generated(self) -> str:
        return f"one of {', '.join(self.values)}"

    @property
    def choices(self) -> tuple[str, ...]:
        return self.values


class Text(Constraint):
    """A string matching the regular expression ``pattern`` in full (``desc`` says it in words)."""

    def __init__(self, pattern: str, **kw: Any) -> None:
        super().__init__(**kw)
        import re

        self.pattern = re.compile(pattern)

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and self.pattern.fullmatch(value) is not None

    def generated(self) -> str:
        return f"a string matching {self.pattern.pattern}"


class Interval(Constraint):
    """A number of ``kind`` (int or float; bools are neither) between ``left`` and ``right`` (None: unbounded),
    ``closed`` on 'both', 'left', 'right' or 'neither' side. A float interval takes ints too."""

    def __init__(
        self,
        kind: type,
        left: float | None,
        right: float | None,
        *,
        closed: Literal["both", "left", "right", "neither"] = "both",
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.kind, self.left, self.right, self.closed = kind, left, right, closed

    def accepts(self, value: Any) -> bool:
        x: Any = value
        common = type(value) is int or (type(value) is float and self.kind is float)  # decided without the ABCs
        if not common:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.kind is int else numbers.Real):
                return False
            x = value if isinstance(value, numbers.Integral) else float(value)
        if x != x:  # NaN lies in no interval
            return False
        lo, hi, closed = self.left, self.right, self.closed
        above = lo is None or (x >= lo if closed in ("both", "left") else x > lo)
        below = hi is None or (x <= hi if closed in ("both", "right") else x < hi)
        return above and below

    def generated(self) -> str:
        word = "an integer" if self.kind is int else "a number"
        lo, hi = self.left, self.right
        left_closed, right_closed = self.closed in ("both", "left"), self.closed in ("both", "right")
        if hi is None and lo is not None:
            if (self.kind is int and lo == 1 and left_closed) or (lo == 0 and not left_closed):
                return f"a positive {'integer' if self.kind is int else 'number'}"
            return f"{word} {'>=' if left_closed else '>'} {lo:g}"
        if lo is None and hi is not None:
            return f"{word} {'<=' if right_closed else '<'} {hi:g}"
        if lo is None or hi is None:
            return word
        if self.kind is float and lo >= 0 and hi <= 1:
            word = "a fraction"
        return f"{word} in {'[' if left_closed else '('}{lo:g}, {hi:g}{']' if right_closed else ')'}"


class ListOf(Constraint):
    """A comma list (a string such as 'cls,mean', or a list/tuple) of at least ``min_len`` items, each accepted by
    ``item``."""

    def __init__(self, item: Constraint, *, min_len: int = 1, **kw: Any) -> None:
        super().__init__(**kw)
        self.item, self.min_len = item, min_len

    @staticmethod
    def items(value: Any) -> list[Any] | None:
        """The items of a comma list (blank parts dropped), or None when ``value`` is no list."""
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        if isinstance(value, (list, tuple)):
            return list(value)
        return None

    def accepts(self, value: Any) -> bool:
        items = self.items(value)
        return items is not None and len(items) >= self.min_len and all(self.item.accepts(v) for v in items)

    def generated(self) -> str:
        if isinstance(self.item, Choice):
            return f"a comma list of {', '.join(self.item.values)}"
        return f"a comma list, each {self.item.describe()}"

    @property
    def choices(self) -> tuple[str, ...] | None:
        return self.item.choices


class Optional(Constraint):
    """None (the parameter left unset) or a value ``inner`` accepts. ``none`` is the word that means None where
    one can be typed ('none'); it is then listed with the choices."""

    def __init__(self, inner: Constraint, *, none: str | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.inner, self.none = inner, none
        self.hint = self.hint or inner.hint

    def accepts(self, value: Any) -> bool:
        return value is None or self.inner.accepts(value)

    def generated(self) -> str:
        return self.inner.describe() + (f", or {self.none}" if self.none else "")

    @property
    def choices(self) -> tuple[str, ...] | None:
        inner = self.inner.choices
        return None if inner is None else inner + ((self.none,) if self.none else ())


def validate_params(config: object) -> None:
    """Check ``config`` against its class's ``parameter_constraints`` table, in table order; the first refused value
    raises :class:`InvalidParameterError`. A dotted key ('optim.schedule') checks a field of a nested config and is
    named by its last part (the flat key users type)."""
    table: Mapping[str, Constraint] = getattr(type(config), "parameter_constraints")
    for key, constraint in table.items():
        value: Any = config
        for part in key.split("."):
            value = getattr(value, part)
        if not constraint.accepts(value):
            raise constraint.error(key.rsplit(".", 1)[-1], value, type(config).__name__)
