"""kvmagent.render.records: JSON objects read back as typed records, every
field checked against its annotation, a wrong one named by its place."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import pytest

from kvmagent.render.records import read


class Inner(NamedTuple):
    path: str
    size: int


class Outer(NamedTuple):
    name: str
    seconds: float
    pair: tuple[str, int]
    inner: Inner | None
    chain: tuple[Inner, ...] = ()
    info: dict[str, Any] = {}


GOOD = {"name": "g", "seconds": 2, "pair": ["a", 1], "inner": {"path": "/x", "size": 3},
        "chain": [{"path": "/y", "size": 4}], "info": {"k": [1]}, "newer": True}


def test_a_record_of_records_reads_back_as_it_was_written() -> None:
    outer = read(Outer, GOOD)
    assert outer == Outer("g", 2.0, ("a", 1), Inner("/x", 3), (Inner("/y", 4),), {"k": [1]})
    assert isinstance(outer.seconds, float) and isinstance(outer.chain, tuple)
    assert read(Outer, json.loads(json.dumps({**GOOD, "inner": None}))) == \
        outer._replace(inner=None)
    older = {k: v for k, v in GOOD.items() if k not in ("chain", "info")}
    assert read(Outer, older)[4:] == ((), {})


@pytest.mark.parametrize("change, why", [
    ({"name": None}, "name: None is not str"),
    ({"seconds": True}, "seconds: True is not float"),
    ({"pair": ["a"]}, r"pair: \['a'\] is not tuple\[str, int\]"),
    ({"pair": ["a", "1"]}, r"pair\[1\]: '1' is not int"),
    ({"inner": {"path": "/x"}}, "inner.size: None is not int"),
    ({"inner": [1]}, r"inner: \[1\] is not Inner \| None"),
    ({"chain": [{"path": "/y", "size": 4}, "z"]}, r"chain\[1\]: not a JSON object"),
    ({"chain": [{"path": 5, "size": 4}]}, r"chain\[0\].path: 5 is not str"),
    ({"info": []}, r"info: \[\] is not dict"),
])
def test_a_wrong_field_is_named_by_its_place(change: dict[str, Any], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        read(Outer, {**GOOD, **change})


def test_a_missing_field_without_a_default_is_named() -> None:
    with pytest.raises(ValueError, match="seconds: None is not float"):
        read(Outer, {k: v for k, v in GOOD.items() if k != "seconds"})
    with pytest.raises(ValueError, match="not a JSON object"):
        read(Outer, [GOOD])
