#!/usr/bin/python3
"""Turn the man pages in docs/*.[1-8].md into roff (man(7) with tbl tables).

The markdown is a small subset, the one these pages use: a `% NAME(S) source
| manual` title line, `#`/`##` headings, paragraphs, `- ` lists, `:   `
definitions, indented or fenced code blocks, pipe tables, `code`, **bold**
and *italic*.  One source for the
pages on GitHub and the pages `man` shows; no pandoc needed to build the
package.

    /usr/bin/python3 docs/mkman.py OUTDIR     writes OUTDIR/kvmagent.1 etc.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent


def _inline(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = re.sub(r"\*\*(.+?)\*\*", r"\\fB\1\\fR", text)
    text = re.sub(r"`([^`]+)`", r"\\fB\1\\fR", text)
    text = re.sub(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])", r"\\fI\1\\fR", text)
    text = re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", text)  # links: their text
    return text


def _line(text: str) -> str:
    """A roff text line: a leading . or ' would be a request."""
    text = _inline(text)
    return "\\&" + text if text.startswith((".", "'")) else text


def _cell(text: str) -> str:
    # \: after a slash: long paths may break there in a narrow column
    return "T{\n" + _line(text.strip()).replace("/", "/\\:") + "\nT}"


def convert(markdown: str) -> str:
    lines = markdown.splitlines()
    m = re.match(r"% (\S+)\((\d)\) (.*?) \| (.*)", lines[0])
    if not m:
        raise ValueError("first line must be: % NAME(SECTION) source | manual")
    # .ad l: ragged right; justified text in narrow table cells only warns.
    out = [f'.TH "{m[1]}" "{m[2]}" "" "{m[3]}" "{m[4]}"', ".ad l"]
    i = 1
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            i += 1
            out.append(".nf\n.RS 4")
            while i < len(lines) and not lines[i].startswith("```"):
                out.append(_line(lines[i]))
                i += 1
            out.append(".RE\n.fi")
        elif line.startswith(":   "):  # definition: indented under the term above
            out.append(".RS 4")
            out.append(_line(line[4:].strip()))
            i += 1
            while i < len(lines) and lines[i].startswith("    ") and lines[i].strip():
                out.append(_line(lines[i].strip()))
                i += 1
            out.append(".RE")
            continue
        elif line.startswith("    ") and line.strip():
            out.append(".nf\n.RS 4")
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                if lines[i].strip() or (i + 1 < len(lines) and lines[i + 1].startswith("    ")):
                    out.append(_line(lines[i][4:]))
                i += 1
            out.append(".RE\n.fi")
            continue
        elif line.startswith("## "):
            out.append(f'.SS "{_inline(line[3:])}"')
        elif line.startswith("# "):
            out.append(f'.SH "{_inline(line[2:])}"')
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c for c in lines[i].strip().strip("|").split("|")]
                if not all(set(c.strip()) <= set("-:") for c in cells):
                    rows.append(cells)
                i += 1
            out.append(".TS\nallbox;\n" + " ".join("lb" for _ in rows[0]) + "\n"
                       + " ".join("lx" for _ in rows[0]) + ".")
            out += ["\t".join(_cell(c) for c in row) for row in rows]
            out.append(".TE")
            continue
        elif line.startswith("- "):
            out.append(".IP \\(bu 2\n" + _line(line[2:]))
        elif not line.strip():
            out.append(".PP")
        else:
            out.append(_line(line.strip()))
        i += 1
    text = "\n".join(out)
    text = re.sub(r"(\.PP\n)+", ".PP\n", text).replace(".PP\n.SH", ".SH").replace(
        ".PP\n.SS", ".SS") + "\n"
    # man(1) runs tbl only on pages that ask for it in their first line
    # (groff then warns "tbl preprocessor failed": Debian 13's lintian, groff-message)
    return "'\\\" t\n" + text if ".TS\n" in text else text


def pages() -> list[Path]:
    return sorted(p for p in DOCS.glob("*.md") if re.search(r"\.[1-8]\.md$", p.name))


def main(argv: list[str]) -> int:
    outdir = Path(argv[1]) if len(argv) > 1 else Path(".")
    outdir.mkdir(parents=True, exist_ok=True)
    for page in pages():
        (outdir / page.name[:-3]).write_text(convert(page.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
