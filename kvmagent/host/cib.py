"""Pacemaker's CIB as this node last wrote it (/var/lib/pacemaker/cib/cib.xml,
root's to read): which guests it runs as ocf:kvmagent:guest resources.  A
file read, no cluster command run: nothing when Pacemaker is not here."""

from __future__ import annotations

from pathlib import Path

from kvmagent.render.ocf import cib_guests

CIB = Path("/var/lib/pacemaker/cib/cib.xml")


def pacemaker_guests(path: Path = CIB) -> set[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:  # no Pacemaker, or not root
        return set()
    return cib_guests(text)
