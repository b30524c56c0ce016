"""A process's memory as the kernel accounts it (/proc/PID/smaps_rollup and
/proc/PID/smaps), for the memory benchmarks (#22).  Pure: parsing and
summing; tests/unit/test_bench_scale.py.

PSS (proportional set size): each resident page divided by the number of
processes that map it, so the PSS of all processes adds up to the memory
they use together: fifty supervisors share Python's code (its binary,
libpython, the C modules) and pay for it once between them, but each pays
its own heap (Python's objects, the modules' code objects) in full.  USS
(Private_Clean + Private_Dirty): what the process alone holds, what its
exit would give back."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

# A mapping's header line: "55d1c0a00000-55d1c0b00000 r-xp 00000000 08:01 1234  /usr/bin/python3.11"
_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ [-rwxps]{4} [0-9a-f]+ [0-9a-f]+:[0-9a-f]+ \d+\s*(.*)$")
# ... and one of its fields: "Pss:                 123 kB"
_FIELD = re.compile(r"^(\w+):\s+(\d+) kB$")

# What a Python process's mappings are, by name.
INTERPRETER = "the interpreter (python3 binary, libpython)"
LIBRARIES = "shared libraries (C modules, libc, ...)"
HEAP = "heap and anonymous memory (Python's objects, buffers)"
STACK = "stack"
OTHER = "other (vdso, files, ...)"
CATEGORIES = (INTERPRETER, LIBRARIES, HEAP, STACK, OTHER)


def rollup(text: str) -> dict[str, int]:
    """/proc/PID/smaps_rollup's fields in KiB: {"Rss": ..., "Pss": ..., ...}."""
    fields = {}
    for line in text.splitlines():
        m = _FIELD.match(line.strip())
        if m:
            fields[m.group(1)] = int(m.group(2))
    return fields


def uss(fields: Mapping[str, int]) -> int:
    return fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)


def mappings(text: str) -> list[tuple[str, dict[str, int]]]:
    """/proc/PID/smaps: (name, fields in KiB) of each mapping; the name is
    the file, "[heap]", "[stack]", ... or "" (anonymous)."""
    found: list[tuple[str, dict[str, int]]] = []
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            found.append((header.group(1).strip(), {}))
            continue
        field = _FIELD.match(line.strip())
        if field and found:
            found[-1][1][field.group(1)] = int(field.group(2))
    return found


def category(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    if name in ("", "[heap]") or name.startswith("[anon"):
        return HEAP
    if name.startswith("[stack"):
        return STACK
    if re.fullmatch(r"python3(\.\d+)?|libpython3[.\d]*\.so.*", base):
        return INTERPRETER
    if ".so" in base:
        return LIBRARIES
    return OTHER


def by_category(maps: Iterable[tuple[str, Mapping[str, int]]]) -> dict[str, dict[str, int]]:
    """PSS and USS (KiB) of the mappings, summed by category."""
    out = {c: {"pss": 0, "uss": 0} for c in CATEGORIES}
    for name, fields in maps:
        c = out[category(name)]
        c["pss"] += fields.get("Pss", 0)
        c["uss"] += uss(fields)
    return out


def add(rollups: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """The processes' PSS and USS together, KiB."""
    total = {"pss": 0, "uss": 0, "count": 0}
    for r in rollups:
        total["pss"] += r.get("Pss", 0)
        total["uss"] += uss(r)
        total["count"] += 1
    return total
