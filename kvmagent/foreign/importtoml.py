"""What the importers (kvmagent.foreign.kvmscript, kvmagent.foreign.xenconfig) share: the
guest TOML they write, with a comment above each value for the choice
behind it, and the error that names a line of the file being imported.

Everything that reaches the output comes from a file an admin gave us, so
strings are escaped for TOML and comments lose their control characters:
a newline in a path must not start a line of TOML of its own."""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field
from typing import Any

from kvmagent.errors import KvmagentError, config_error

# (lists of strings, or of numbers: a cloned guest's cpu_affinity = [0, 1])
TomlValue = str | int | float | bool | list[Any]

# C0 and C1 controls and DEL: TOML allows none of them raw in a basic string
# (tab aside), and a comment must stay on its line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_WIDTH = 92


def excerpt(text: str, limit: int = 100) -> str:
    """TEXT for a message or a comment: on one line, control characters
    shown as \\xNN, cut after LIMIT characters."""
    flat = " ".join(text.replace("\\\n", " ").split(" "))
    flat = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", flat.strip())
    return flat if len(flat) <= limit else flat[:limit] + "..."


def located_error(file: str, line: int, reason: str, text: str,
                  hint: str | None = None) -> KvmagentError:
    """FILE:LINE: REASON: TEXT (exit status 6); nothing has been written."""
    return config_error(f"{file}:{line}: {reason}: {excerpt(text)}", hint)


def toml_string(value: str) -> str:
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif _CONTROL.fullmatch(ch):
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return toml_string(value)


def _comment(text: str) -> list[str]:
    clean = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    lines = textwrap.wrap(clean, _WIDTH - 2, break_long_words=False, break_on_hyphens=False)
    return ["# " + line for line in lines] or ["#"]


@dataclass
class Section:
    """The top level (name ""), a [table] or one [[array]] entry: its
    values in order, each with the notes that explain it."""

    name: str
    array: bool = False
    notes: list[str] = field(default_factory=list)
    items: list[tuple[str, TomlValue, list[str]]] = field(default_factory=list)

    def set(self, key: str, value: TomlValue, *notes: str) -> None:
        self.items = [item for item in self.items if item[0] != key]
        self.items.append((key, value, [n for n in notes if n]))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def has(self, key: str) -> bool:
        return any(item[0] == key for item in self.items)


@dataclass
class GuestToml:
    """A guest file being written: a header of notes, the top-level keys,
    then tables and arrays of tables in the order they were added."""

    header: list[str] = field(default_factory=list)
    top: Section = field(default_factory=lambda: Section(""))
    sections: list[Section] = field(default_factory=list)

    def table(self, name: str) -> Section:
        for s in self.sections:
            if s.name == name and not s.array:
                return s
        s = Section(name)
        self.sections.append(s)
        return s

    def entry(self, name: str) -> Section:
        s = Section(name, array=True)
        self.sections.append(s)
        return s

    def render(self) -> str:
        lines: list[str] = []
        for text in self.header:
            lines += _comment(text)
        lines += self._section(self.top)
        for s in self.sections:
            if not s.items and not s.array and not s.notes:
                continue
            lines.append("")
            lines += [c for text in s.notes for c in _comment(text)]
            lines.append(f"[[{s.name}]]" if s.array else f"[{s.name}]")
            lines += self._section(s)[1:]
        return "\n".join(lines).strip("\n") + "\n"

    @staticmethod
    def _section(s: Section) -> list[str]:
        lines = [""]
        if not s.name:
            lines += [c for text in s.notes for c in _comment(text)]
        for key, value, notes in s.items:
            for text in notes:
                lines += _comment(text)
            lines.append(f"{key} = {toml_value(value)}")
        return lines


@dataclass(frozen=True)
class Imported:
    """An importer's answer: the guest's name, its TOML, and what the admin
    must do besides (also in the TOML's comments; the command prints these
    on stderr)."""

    name: str
    toml: str
    warnings: tuple[str, ...] = ()
