"""Guests' disks on this host, for `kvmagent clone`: what kind each is (an
image file, an LVM logical volume, another block device), room in a
volume group, and the external programs that copy and snapshot them
(qemu-img, cp, lvcreate, lvremove, dd), run with argv lists."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

from kvmagent.errors import ExitStatus, KvmagentError, host_error
from kvmagent.render.cloneplan import DiskFacts, Kind

PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
TIMEOUT = 3600.0  # a copy of a large volume


def _lvm(args: list[str]) -> list[str] | None:
    """The fields of LVM's one-line report (lvs, vgs), None when LVM is not
    installed or does not know the device."""
    if shutil.which(args[0], path=PATH) is None:
        return None
    r = subprocess.run([*args, "--noheadings", "--nosuffix", "--units", "b",
                        "--separator", "|"], capture_output=True, text=True, timeout=60,
                       env={"PATH": PATH, "LC_ALL": "C", "LVM_SUPPRESS_FD_WARNINGS": "1"})
    if r.returncode != 0 or not r.stdout.strip():
        return None
    return r.stdout.strip().splitlines()[0].strip().split("|")


def classify(path: Path, origin: str, key: str) -> DiskFacts:
    """PATH's kind; a host error (exit 5) naming ORIGIN and KEY when it is
    missing or neither a file nor a block device."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise host_error(f"{origin}: {key} = \"{path}\": {e.strerror}") from None
    if stat.S_ISREG(st.st_mode):
        return DiskFacts(Kind.FILE)
    if not stat.S_ISBLK(st.st_mode):
        raise host_error(f"{origin}: {key} = \"{path}\": neither an image file nor a block "
                         "device")
    fields = _lvm(["lvs", "-o", "vg_name,lv_name,lv_size", str(path)])
    if fields is None or len(fields) != 3:
        return DiskFacts(Kind.BLOCK)
    return DiskFacts(Kind.LV, fields[0], fields[1], int(fields[2]))


def vg_free(vg: str) -> int | None:
    fields = _lvm(["vgs", "-o", "vg_free", vg])
    return int(fields[0]) if fields else None


def check_room(vg: str, needed: int, what: str) -> None:
    """A host error (exit 5) when volume group VG has less than NEEDED
    bytes free."""
    free = vg_free(vg)
    if free is None:
        raise host_error(f"{what}: no volume group {vg!r}", "vgs lists them")
    if free < needed:
        raise host_error(f"{what}: volume group {vg} has {free >> 20} MiB free, "
                         f"{needed >> 20} MiB are needed",
                         "add room (vgextend, lvreduce), or give a smaller --snapshot SIZE")


def run(argv: tuple[str, ...] | list[str], timeout: float = TIMEOUT) -> None:
    """Run ARGV (no shell); a KvmagentError with its last words when it fails."""
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL,
                           env={"PATH": PATH, "LC_ALL": "C", "LVM_SUPPRESS_FD_WARNINGS": "1"})
    except FileNotFoundError:
        package = {"qemu-img": "qemu-utils", "lvcreate": "lvm2", "lvremove": "lvm2"}.get(
            argv[0], "coreutils")
        raise host_error(f"{argv[0]}: not installed", f"apt-get install {package}") from None
    except subprocess.TimeoutExpired:
        raise KvmagentError(f"{' '.join(argv)}: no result within {timeout:g} s") from None
    if r.returncode != 0:
        said = [line.strip() for line in (r.stderr or r.stdout).splitlines() if line.strip()]
        raise KvmagentError(f"{' '.join(argv)} failed (exit status {r.returncode})"
                            + (f": {said[-1]}" if said else ""), None, ExitStatus.FAILURE)
