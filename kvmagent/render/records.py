"""Typed records read from JSON: what crosses a process boundary (the
control channel's requests and replies, kvmagent.unit.protocol; what one
host says to another in a live migration; the records a supervisor leaves
for the one that takes its guest over) is a NamedTuple, and read() checks
each field of the JSON object against the record's annotations: str, int,
float, bool, None, unions of those, list[...], tuple[X, ...], another
record, and dict[str, Any] (a JSON object passed on as it is, such as
QEMU's answers).  A field with a default may be missing (an older
kvmagent's record) and a field the record does not know is ignored (a
newer one's).  Pure."""

from __future__ import annotations

import types
import typing
from typing import Any, TypeVar

R = TypeVar("R")
_HINTS: dict[type, dict[str, Any]] = {}


class _Wrong(ValueError):
    """A value that is not of its field's type (the message names the field)."""


def _name(hint: Any) -> str:
    """HINT as its annotation reads: "int | None", "list[str]"."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_name(each) for each in typing.get_args(hint))
    if hint in (None, types.NoneType):
        return "None"
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _is_record(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, tuple) and hasattr(hint, "_fields")


def _value(value: object, hint: Any, where: str) -> Any:
    """VALUE (from JSON) as HINT (a record's annotation) has it: a float
    for an int where a float is wanted, a tuple for a list, a record for
    an object; _Wrong naming WHERE when it is not of that type."""
    if hint is Any:
        return value
    if hint in (None, types.NoneType):
        if value is None:
            return None
    elif typing.get_origin(hint) in (typing.Union, types.UnionType):
        wrong = []
        for each in typing.get_args(hint):
            try:
                return _value(value, each, where)
            except _Wrong as e:
                wrong.append(e)
        deeper = [e for e in wrong if not str(e).startswith(f"{where}: ")]
        if len(deeper) == 1:  # an item of the one list or record it could be
            raise deeper[0]
    elif typing.get_origin(hint) in (list, tuple):
        return _items(value, hint, where)
    elif typing.get_origin(hint) is dict:
        if isinstance(value, dict):  # a JSON object: its keys are strings
            return value
    elif _is_record(hint):
        return read(hint, value, where + ".")
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif isinstance(hint, type) and isinstance(value, hint) and not isinstance(value, bool):
        return value
    raise _Wrong(f"{where}: {value!r} is not {_name(hint)}")


def _items(value: object, hint: Any, where: str) -> list[Any] | tuple[Any, ...]:
    """A JSON array as list[X], tuple[X, ...] or tuple[X, Y] has it."""
    args = typing.get_args(hint)
    every = typing.get_origin(hint) is list or (len(args) == 2 and args[1] is Ellipsis)
    if not isinstance(value, list) or not (every or len(value) == len(args)):
        raise _Wrong(f"{where}: {value!r} is not {_name(hint)}")
    items = [_value(v, args[0] if every else args[i], f"{where}[{i}]")
             for i, v in enumerate(value)]
    return items if typing.get_origin(hint) is list else tuple(items)


def read(record: type[R], data: object, where: str = "") -> R:
    """RECORD from a JSON object: ValueError naming the field that is
    missing (and has no default) or of another type (WHERE: the record's
    own place in an outer one, "chain[0].")."""
    if not isinstance(data, dict):
        raise _Wrong(f"{where.rstrip('.') + ': ' if where else ''}not a JSON object")
    hints = _HINTS.get(record)
    if hints is None:
        hints = _HINTS[record] = typing.get_type_hints(record)
    defaults: dict[str, Any] = getattr(record, "_field_defaults")
    values = {field: _value(data.get(field), hints[field], where + field)
              for field in getattr(record, "_fields")
              if field in data or field not in defaults}
    return record(**values)
