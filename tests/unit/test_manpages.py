"""The man pages (docs/*.[1-8].md) convert to roff that man(1) renders
without warnings, with no markdown left over."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "docs"))
import mkman  # noqa: E402


@pytest.mark.parametrize("page", mkman.pages(), ids=lambda p: p.name)
def test_page_converts_and_renders(page: Path, tmp_path: Path) -> None:
    roff = mkman.convert(page.read_text())
    # a page with tables says so in its first line, or man(1) does not run tbl
    tables = ".TS\n" in roff
    assert roff.startswith("'\\\" t\n.TH \"" if tables else '.TH "'), roff[:40]
    body = "\n".join(line for line in roff.splitlines() if not line.startswith("."))
    for leftover in ("**", "`", "](", "% "):
        assert leftover not in body, leftover
    if shutil.which("man") is None:
        pytest.skip("man(1) is not installed (man-db): rendering not checked")
    out = tmp_path / page.name[:-3]
    out.write_text(roff)
    r = subprocess.run(["man", "--warnings", "-l", str(out)], capture_output=True, text=True,
                       env={**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8",
                            "MAN_DISABLE_SECCOMP": "1",
                            # preprocessors only as the page asks, as lintian runs man
                            "MANROFFSEQ": ""})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "NAME" in r.stdout and "SEE ALSO" in r.stdout


def test_the_three_pages_exist():
    assert [p.name for p in mkman.pages()] == ["kvm@.service.8.md", "kvmagent.1.md",
                                               "kvmagent.toml.5.md"]
