"""The supervisor opens the guests' disks for QEMU (kvmagent.unit.launch):
read-write disks as a read-write and a read-only fd, and with O_DIRECT when
QEMU uses them so (QEMU 10.0 takes an fd from a set only if that flag
matches).  Real files: O_DIRECT needs a file system that has it, which
tmpfs does not; the test says so rather than pass without it."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from kvmagent.render.plan import Disk, disk_token
from kvmagent.unit.launch import open_disks


def direct_io_here(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


def test_disks_are_opened_as_qemu_will_use_them(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * 4096)
    if not direct_io_here(image):
        pytest.fail(f"{tmp_path} has no O_DIRECT: run the unit tests on a disk file system")
    disks = [Disk(str(image), False, (disk_token(0, "rw"), disk_token(0, "ro")), True),
             Disk(str(image), True, (disk_token(1, "ro"),))]
    fill, fds = open_disks(disks)
    try:
        flags = {token: fcntl.fcntl(int(fd), fcntl.F_GETFL) for token, fd in fill.items()}
        rw, ro, plain = (flags[disk_token(0, "rw")], flags[disk_token(0, "ro")],
                         flags[disk_token(1, "ro")])
        assert rw & os.O_ACCMODE == os.O_RDWR and ro & os.O_ACCMODE == os.O_RDONLY
        assert rw & os.O_DIRECT and ro & os.O_DIRECT
        assert not plain & os.O_DIRECT
        assert all(not os.get_inheritable(fd) for fd in fds)  # Popen's pass_fds passes them
    finally:
        for fd in fds:
            os.close(fd)
