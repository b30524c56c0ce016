"""Typed records read from JSON: what crosses a process boundary (the
control channel's requests and replies, kvmagent.unit.protocol; the
destination's lines to the source in a live migration) is a NamedTuple,
and read() checks each field of the JSON object against the record's
annotations: str, int, float, bool, None, unions of those, list[...] and
dict[str, Any] (a JSON object passed on as it is, such as QEMU's answers).
A field with a default may be missing (an older kvmagent's record) and a
field the record does not know is ignored (a newer one's).  Pure."""

from __future__ import annotations

import types
import typing
from typing import Any, TypeVar

R = TypeVar("R")
_HINTS: dict[type, dict[str, Any]] = {}


def _fits(value: object, hint: Any) -> bool:
    """VALUE (from JSON) is of type HINT (a record's annotation)."""
    if hint is Any:
        return True
    if hint in (None, types.NoneType):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if origin is list:
        item = typing.get_args(hint)[0]
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)  # a JSON object: its keys are strings
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is bool:
        return isinstance(value, bool)
    return isinstance(hint, type) and isinstance(value, hint) and not isinstance(value, bool)


def _name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def read(record: type[R], data: object) -> R:
    """RECORD from a JSON object: ValueError naming the field that is
    missing (and has no default) or of another type."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    hints = _HINTS.get(record)
    if hints is None:
        hints = _HINTS[record] = typing.get_type_hints(record)
    defaults: dict[str, Any] = getattr(record, "_field_defaults")
    values = {}
    for field in getattr(record, "_fields"):
        if field not in data and field in defaults:
            continue
        value, hint = data.get(field), hints[field]
        if not _fits(value, hint):
            raise ValueError(f"{field}: {value!r} is not {_name(hint)}")
        values[field] = float(value) if isinstance(value, int) and _wants_float(hint, value) \
            else value
    return record(**values)


def _wants_float(hint: Any, value: object) -> bool:
    """An int where HINT says float (JSON writes 2.0 as 2 sometimes)."""
    if not isinstance(value, int) or isinstance(value, bool):
        return False
    kinds = typing.get_args(hint) if typing.get_origin(hint) in (
        typing.Union, types.UnionType) else (hint,)
    return float in kinds and int not in kinds
