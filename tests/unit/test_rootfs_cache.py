"""The test roots' cache (tests/harness/rootfs.py) keeps a tree of another key
while another checkout may be using it: a test marked it used lately, a boot
read it lately, or a process names it.  Only trees that nobody used for
KEEP_SECONDS are removed, and a .used- mark goes with its tree."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.harness import rootfs

OLD = time.time() - rootfs.KEEP_SECONDS - 3600


def _tree(parent: Path, key: str, age: float | None = OLD) -> Path:
    tree = parent / key
    (tree / "etc").mkdir(parents=True)
    for name in (rootfs.STAMP, "etc/os-release"):
        (tree / name).write_text("{}\n")
        if age is not None:
            os.utime(tree / name, (age, age))
    return tree


def test_only_trees_unused_for_long_are_removed(tmp_path: Path) -> None:
    keep = _tree(tmp_path, "a" * 16)
    stale = _tree(tmp_path, "b" * 16)
    (tmp_path / f".used-{stale.name}").touch()
    os.utime(tmp_path / f".used-{stale.name}", (OLD, OLD))
    marked = _tree(tmp_path, "c" * 16)
    rootfs.mark_used(marked)  # a test of another checkout, just now
    booted = _tree(tmp_path, "d" * 16)
    os.utime(booted / "etc/os-release", (time.time() - 3600, OLD))  # read an hour ago
    built = _tree(tmp_path, "e" * 16, age=None)  # built just now
    named = _tree(tmp_path, "f" * 16)
    orphan_mark = tmp_path / f".used-{'0' * 16}"
    orphan_mark.touch()
    other = tmp_path / ("1" * 16)  # not ours: no stamp
    other.mkdir()
    # The child prints once it runs: Popen returns when exec has begun, and
    # until the kernel has set up the new program's arguments its cmdline
    # is empty (seen on a loaded machine).
    user = subprocess.Popen([sys.executable, "-c", "print(flush=True); import time; time.sleep(60)",
                             str(named)], stdout=subprocess.PIPE)
    try:
        assert user.stdout is not None and user.stdout.readline() == b"\n"
        rootfs._remove_stale(tmp_path, keep.name)
    finally:
        user.kill()
        user.communicate()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([keep.name, marked.name, f".used-{marked.name}", booted.name,
                           built.name, named.name, other.name])
    assert rootfs.in_use(named) == []  # its process is gone, and it is old
    assert "used 0.0 h ago" in rootfs.in_use(marked)
