"""The subset of the POSIX shell that hand-written kvm start scripts and
their ifup scripts use, read without running anything (never a shell,
never eval): comments, `#!` lines, words with '…', "…" and \\ quoting,
backslash continuations, $VAR and ${VAR}, commands separated by newlines,
`;` and `&&`, and a trailing `&`.

Anything else the shell would do — a pipe, a redirection, a command
substitution, a glob, a loop or an `if` — changes what the script means in
a way this reader cannot follow, and is an error that names the file, the
line and the text.  Expansion is separate from parsing (expand_fields,
expand_word), so a caller decides which variables are known."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from kvmagent.errors import KvmagentError
from kvmagent.foreign.importtoml import located_error

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
_ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=", re.ASCII)
_SPECIAL = "@*#?$!-"
# Words that start shell syntax with a body: the importer cannot follow it.
KEYWORDS = frozenset({"if", "then", "else", "elif", "fi", "for", "while", "until", "do",
                      "done", "case", "esac", "function", "select", "[", "[[", "test", "!",
                      "{", "}"})
_WORD_END = " \t\n;&|<>()"


@dataclass(frozen=True)
class Part:
    """Literal text, or (var=True) the name of a variable to expand."""

    text: str
    var: bool = False
    quoted: bool = False


@dataclass(frozen=True)
class Word:
    parts: tuple[Part, ...]
    line: int
    raw: str  # as written, for messages

    def literal(self) -> str | None:
        """The word's text if it has no expansion in it."""
        if any(p.var for p in self.parts):
            return None
        return "".join(p.text for p in self.parts)

    def assignment(self) -> tuple[str, Word] | None:
        """(NAME, value) of a NAME=value word, else None."""
        if not self.parts or self.parts[0].var or self.parts[0].quoted:
            return None
        m = _ASSIGNMENT.match(self.parts[0].text)
        if not m:
            return None
        rest = self.parts[0].text[m.end():]
        parts = ((Part(rest),) if rest else ()) + self.parts[1:]
        return m.group(1), Word(parts, self.line, self.raw)


@dataclass(frozen=True)
class Command:
    words: tuple[Word, ...]
    line: int
    raw: str
    after: str  # what ends it: "\n", ";", "&&", "&" or "" (end of file)
    chained: bool  # joined to the command before it by &&


class _Reader:
    def __init__(self, text: str, file: str) -> None:
        self.s = text
        self.i = 0
        self.line = 1
        self.file = file

    def peek(self, k: int = 0) -> str:
        j = self.i + k
        return self.s[j] if j < len(self.s) else ""

    def rest_of_line(self, start: int) -> str:
        end = self.s.find("\n", start)
        return self.s[start:end if end >= 0 else len(self.s)]

    def fail(self, reason: str, start: int | None = None, line: int | None = None,
             hint: str | None = None) -> KvmagentError:
        return located_error(self.file, line or self.line, reason,
                             self.rest_of_line(self.i if start is None else start), hint)

    def skip_blanks(self) -> None:
        while True:
            c = self.peek()
            if c and c in " \t":
                self.i += 1
            elif c == "\\" and self.peek(1) == "\n":
                self.i += 2
                self.line += 1
            else:
                return

    def commands(self) -> list[Command]:
        out: list[Command] = []
        words: list[Word] = []
        start, line, chained = self.i, self.line, False
        and_at = (0, 1)
        while True:
            self.skip_blanks()
            c = self.peek()
            if c == "#":
                self.i += len(self.rest_of_line(self.i))
                continue
            if c in ("", "\n", ";", "&"):
                op = {"": "", "\n": "\n", ";": ";"}.get(c, "&")
                if c == "&" and self.peek(1) == "&":
                    op = "&&"
                if c == ";" and self.peek(1) == ";":
                    raise self.fail("';;' belongs to a case statement, which the importer "
                                    "cannot follow")
                if words:
                    out.append(Command(tuple(words), line, self.s[start:self.i].strip(),
                                       op, chained))
                    chained = op == "&&"
                    and_at = (start, line)
                elif op == "" and chained:
                    raise self.fail("'&&' without a command after it", *and_at)
                elif op in (";", "&", "&&"):
                    raise self.fail(f"'{op}' without a command before it")
                if c == "":
                    return out
                self.i += len(op)
                if op == "\n":
                    self.line += 1
                words = []
                start, line = self.i, self.line
                continue
            if c == "|":
                raise self.fail("a pipe or '||' (the importer follows only simple commands "
                                "and '&&')")
            if c in "<>":
                raise self.fail("a redirection (the importer follows only simple commands; "
                                "systemd's journal keeps QEMU's output)")
            if c in "()":
                raise self.fail("a subshell or function (the importer follows only simple "
                                "commands)")
            if not words:
                start, line = self.i, self.line
            words.append(self.word())

    def word(self) -> Word:
        start, line = self.i, self.line
        parts: list[Part] = []

        def lit(text: str, quoted: bool) -> None:
            if parts and not parts[-1].var and parts[-1].quoted == quoted:
                parts[-1] = Part(parts[-1].text + text, quoted=quoted)
            else:
                parts.append(Part(text, quoted=quoted))

        while True:
            c = self.peek()
            if c == "" or c in _WORD_END:
                break
            if c == "\\":
                n = self.peek(1)
                if n == "\n":
                    self.i += 2
                    self.line += 1
                    continue
                if n == "":
                    raise self.fail("a backslash at the end of the file", start, line)
                lit(n, True)
                self.i += 2
            elif c == "'":
                end = self.s.find("'", self.i + 1)
                if end < 0:
                    raise self.fail("a single quote that is never closed", self.i, self.line,
                                    "close the quote; the importer reads only the script")
                text = self.s[self.i + 1:end]
                lit(text, True)
                self.line += text.count("\n")
                self.i = end + 1
            elif c == '"':
                self.double(lit, parts)
            elif c == "$":
                self.dollar(lit, parts, quoted=False)
            elif c == "`":
                raise self.fail("a command substitution `...`: its output is not known "
                                "without running it", start, line)
            elif c in "*?":
                raise self.fail(f"an unquoted '{c}' (a file name pattern the shell would "
                                "expand)", start, line, "quote it if it is meant literally")
            elif c == "~" and self.i == start:
                raise self.fail("'~' (the home directory of whoever runs the script)",
                                start, line, "write the path out")
            elif c in "{}" and self.i == start and self.peek(1) in ("", " ", "\t", "\n"):
                raise self.fail(f"'{c}' (a group of commands)", start, line)
            else:
                lit(c, False)
                self.i += 1
        return Word(tuple(parts), line, self.s[start:self.i])

    def double(self, lit: Callable[[str, bool], None], parts: list[Part]) -> None:
        open_at, open_line = self.i, self.line
        self.i += 1
        while True:
            c = self.peek()
            if c == "":
                raise self.fail("a double quote that is never closed", open_at, open_line,
                                "close the quote; the importer reads only the script")
            if c == '"':
                self.i += 1
                if not parts:
                    lit("", True)  # "" is a word, even an empty one
                return
            if c == "\\":
                n = self.peek(1)
                if n == "\n":
                    self.i += 2
                    self.line += 1
                elif n in '$`"\\':
                    lit(n, True)
                    self.i += 2
                else:
                    lit("\\", True)
                    self.i += 1
            elif c == "$":
                self.dollar(lit, parts, quoted=True)
            elif c == "`":
                raise self.fail("a command substitution `...`: its output is not known "
                                "without running it")
            else:
                if c == "\n":
                    self.line += 1
                lit(c, True)
                self.i += 1

    def dollar(self, lit: Callable[[str, bool], None], parts: list[Part], quoted: bool) -> None:
        n = self.peek(1)
        at = self.i
        if n == "(":
            raise self.fail("a command substitution $(...) or arithmetic $((...)): its value "
                            "is not known without running it", at)
        if n == "'":
            raise self.fail("$'...' quoting (the importer reads '...' and \"...\" only)", at)
        if n == "{":
            end = self.s.find("}", self.i + 2)
            inner = self.s[self.i + 2:end] if end >= 0 else ""
            if end < 0 or "\n" in inner:
                raise self.fail("'${' that is never closed", at)
            if not (_NAME.fullmatch(inner) or inner.isdigit() or
                    (len(inner) == 1 and inner in _SPECIAL)):
                raise self.fail(f"the expansion ${{{inner}}} (the importer expands plain "
                                "${NAME} only)", at)
            parts.append(Part(inner, var=True, quoted=quoted))
            self.i = end + 1
            return
        m = _NAME.match(self.s, self.i + 1)
        if m:
            parts.append(Part(m.group(), var=True, quoted=quoted))
            self.i = m.end()
        elif n.isdigit() or (n and n in _SPECIAL):
            parts.append(Part(n, var=True, quoted=quoted))
            self.i += 2
        else:
            lit("$", quoted)
            self.i += 1


def parse(text: str, file: str) -> list[Command]:
    """TEXT of the script FILE -> its simple commands, nothing expanded."""
    return _Reader(text, file).commands()


Lookup = Callable[[str], "str | None"]


def _value(part: Part, lookup: Lookup, file: str, word: Word) -> str:
    value = lookup(part.text)
    if value is not None:
        return value
    name = part.text
    if name.isdigit() or name in _SPECIAL:
        raise located_error(file, word.line, f"${name} is an argument or a state of the "
                            "running script, unknown to the importer", word.raw,
                            "write the value into the script, or set it in a NAME=value line")
    raise located_error(file, word.line, f"${name} is not set in the script (the importer "
                        "does not read the environment)", word.raw,
                        f"add {name}=... to the script before this line")


def expand_word(word: Word, lookup: Lookup, file: str) -> str:
    """WORD's value with variables expanded and no field splitting (as the
    shell expands the value of an assignment)."""
    return "".join(_value(p, lookup, file, word) if p.var else p.text for p in word.parts)


def expand_fields(word: Word, lookup: Lookup, file: str) -> list[str]:
    """WORD as the arguments the shell would make of it: an unquoted
    expansion is split at blanks (OPTS="-m 1024"; kvm $OPTS)."""
    fields: list[str] = []
    current: str | None = None
    for p in word.parts:
        if not p.var:
            current = (current or "") + p.text
            continue
        value = _value(p, lookup, file, word)
        if p.quoted:
            current = (current or "") + value
            continue
        if any(c in value for c in "*?"):
            raise located_error(file, word.line, f"${p.text} holds a file name pattern, which "
                                "the shell would expand", word.raw, "quote the expansion")
        pieces = value.split()
        if not pieces:
            continue
        if value[:1] not in " \t\n" and current is not None:
            pieces[0] = current + pieces[0]
        elif current is not None:
            fields.append(current)
        fields += pieces[:-1]
        current = pieces[-1]
        if value[-1:] in (" ", "\t", "\n"):
            fields.append(current)
            current = None
    if current is not None:
        fields.append(current)
    return fields
