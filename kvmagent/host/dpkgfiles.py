"""Which Debian package owns a file, read from dpkg's database
(/var/lib/dpkg/info/PACKAGE.list: one path a line), as `dpkg -S` answers
it, without running dpkg.  For `validate --host`: a guest that boots a
kernel straight out of /boot loses it when apt removes that package."""

from __future__ import annotations

import os
from pathlib import Path

INFO = Path("/var/lib/dpkg/info")


def owner(path: Path, info: Path = INFO) -> str | None:
    """The package whose file list has PATH (a kernel package first: the
    files asked about are kernels), None if none has."""
    wanted = str(path).encode() + b"\n"
    try:
        lists = sorted(e.name for e in os.scandir(info) if e.name.endswith(".list"))
    except OSError:
        return None
    lists.sort(key=lambda n: not n.startswith("linux-image"))
    for name in lists:
        try:
            with open(info / name, "rb") as f:
                if any(line == wanted for line in f):
                    return name.removesuffix(".list").split(":")[0]
        except OSError:
            continue
    return None
