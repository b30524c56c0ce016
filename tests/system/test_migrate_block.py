"""`kvmagent migrate --copy-storage` of a guest whose disk is a block device
(an LVM volume in real life; loop devices here, as this kernel has no
device-mapper), between two test hosts made as tests/system/test_migrate_copy.py
makes them (with its helpers), the devices bound into them.

Three loop devices are made on this machine, each over an image file of
its own: host 0's (32 MiB of random bytes), host 1's of the same size
(zeroes) and another of host 1's (24 MiB of zeroes).  Each test host gets
its own devices' nodes bound in at their own paths (/dev/loopN), and the
guest's disk is /dev/kvmagent-test/disk on both, a link to that host's
device as /dev/VG/LV is to /dev/dm-N: the same path on both hosts, two
devices of the same size, as the admin makes them (kvmagent makes no block
device).  Their image files are removed as soon as the devices hold them,
and each device is set to detach itself when its last holder closes it (the
test, which holds it open, and the test hosts' QEMU): the test detaches
them (losetup -d) at its end, failed or not, and a test killed outright
leaves them only as long as its test hosts (make clean-tests).

First what must be refused before anything moves (exit 5, host 1 untouched,
the guest running on at host 0): host 1 with neither the device nor its
directory, with the directory but no device (kvmagent makes nothing there),
and with a device of another size (both sizes named).  Then the move: the
guest reads its whole disk (sha256sum in the guest) before and after;
host 1's device holds what host 0's does, byte for byte; the guest did not
boot again; both devices are still there, the same devices, and host 1 has
no block device more or less than before.  All of it from Debian 12 to 12,
and from Debian 12 to 13 (QEMU 7.2 to 10.0)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.harness.hostpair import HostPair
from tests.harness.sysutil import run_cmd
from tests.harness.testhost import TestHost
from tests.system.conftest import require_system
from tests.system.test_migrate_copy import (GUEST, NAME, UNIT, booted, console, hosts, qemus,
                                            runs_on, state)

pytestmark = pytest.mark.system
DEVICE = "/dev/kvmagent-test/disk"  # the guest's disk on both hosts: a link to /dev/loopN
SIZE = 32 << 20
OTHER = 24 << 20  # host 1's device of another size
# <linux/loop.h>: the device detaches itself at its last close (autoclear)
LOOP_SET_STATUS64, LOOP_GET_STATUS64 = 0x4C04, 0x4C05
LO_FLAGS_AUTOCLEAR = 4
LOOP_INFO64_SIZE, LO_FLAGS_OFFSET = 232, 52  # struct loop_info64, its lo_flags


class Loop(NamedTuple):
    device: str  # /dev/loopN, on this machine and in the test host that has it
    fd: int  # held open by the test until its end
    size: int
    image: str  # its image file, as the kernel names it (removed: " (deleted)")


class Loops(NamedTuple):
    here: Loop  # host 0's: the guest's disk, random bytes
    there: Loop  # host 1's, of the same size: zeroes
    other: Loop  # host 1's of another size: zeroes


def backing_file(device: str) -> str:
    try:
        return Path(f"/sys/block/{Path(device).name}/loop/backing_file").read_text().strip()
    except OSError:
        return ""  # not bound


def attach(image: Path, size: int, data: bytes = b"") -> Loop:
    """A loop device over IMAGE (SIZE bytes: DATA, then zeroes), which is
    removed at once (the device holds it); the device detaches itself once
    its last holder closes it."""
    with open(image, "wb") as f:
        f.write(data)
        f.truncate(size)
    fd = -1
    try:
        device = run_cmd(["losetup", "--find", "--show", str(image)]).stdout.strip()
        try:
            fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
            info = bytearray(LOOP_INFO64_SIZE)
            fcntl.ioctl(fd, LOOP_GET_STATUS64, info)
            flags = struct.unpack_from("=I", info, LO_FLAGS_OFFSET)[0]
            struct.pack_into("=I", info, LO_FLAGS_OFFSET, flags | LO_FLAGS_AUTOCLEAR)
            fcntl.ioctl(fd, LOOP_SET_STATUS64, bytes(info))
            assert os.lseek(fd, 0, os.SEEK_END) == size
            return Loop(device, fd, size, f"{image} (deleted)")
        except BaseException:
            run_cmd(["losetup", "--detach", device], check=False)
            if fd >= 0:
                os.close(fd)
            raise
    finally:
        image.unlink()


def detach(loops: list[Loop]) -> None:
    """losetup -d (deferred by the kernel while the test holds it), then the
    test's own hold let go: each device is unbound; AssertionError if one
    is still bound to its image."""
    for loop in loops:
        run_cmd(["losetup", "--detach", loop.device], check=False)
        os.close(loop.fd)
    deadline = time.monotonic() + 10
    while left := [lo.device for lo in loops if backing_file(lo.device) == lo.image]:
        assert time.monotonic() < deadline, f"loop devices left bound: {left}"
        time.sleep(0.1)


def content(loop: Loop) -> bytes:
    """The device's bytes as they are now (what this machine cached of it
    dropped first: the test hosts' QEMU writes it directly)."""
    fd = os.open(loop.device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read()
    finally:
        os.close(fd)
    assert len(data) == loop.size, (loop.device, len(data))
    return data


@pytest.fixture(scope="module", params=[("bookworm", "bookworm"), ("bookworm", "trixie")],
                ids=["debian12-to-12", "debian12-to-13"])
def releases(request: pytest.FixtureRequest) -> tuple[str, str]:
    """Host 0's and host 1's: QEMU 7.2 to 7.2, and 7.2 to 10.0."""
    return tuple(request.param)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def loops(releases: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loops]:
    """New devices for each pair of releases."""
    require_system()
    work = tmp_path_factory.mktemp("migrate-block")
    made: list[Loop] = []
    try:
        made.append(attach(work / "host0.img", SIZE, os.urandom(SIZE)))
        made.append(attach(work / "host1.img", SIZE))
        made.append(attach(work / "host1-other.img", OTHER))
        yield Loops(*made)
    finally:
        detach(made)


def link(th: TestHost, loop: Loop | None) -> None:
    """DEVICE on TH: a link to LOOP's node (the same device), or nothing."""
    th.exec(["rm", "-rf", os.path.dirname(DEVICE)])
    if loop is not None:
        th.exec(["mkdir", os.path.dirname(DEVICE)])
        th.exec(["ln", "-s", f"../{Path(loop.device).name}", DEVICE])


@pytest.fixture(scope="module")
def pair(releases: tuple[str, str], loops: Loops, tmp_path_factory: pytest.TempPathFactory,
         guest_image) -> Iterator[HostPair]:  # type: ignore[no-untyped-def]
    made = hosts(tmp_path_factory, guest_image, releases, disk=DEVICE,
                 host_bind=([(Path(loops.here.device), loops.here.device)],
                            [(Path(lo.device), lo.device) for lo in (loops.there, loops.other)]))
    pair = next(made)
    try:
        link(pair[0], loops.here)
        link(pair[1], loops.there)
        yield pair
    finally:
        made.close()


def block_devices(th: TestHost) -> list[str]:
    """Every block device node in TH's /dev, with its device number."""
    out = th.exec(["find", "/dev", "-type", "b", "-exec", "stat", "-c", "%n %t:%T", "{}",
                   "+"]).stdout
    return sorted(out.splitlines())


def device_of(th: TestHost) -> str:
    """The device DEVICE is on TH: major:minor (hex, as stat says), or ""."""
    r = th.exec(["stat", "-L", "-c", "%F %t:%T", DEVICE], check=False)
    return r.stdout.strip() if r.returncode == 0 else ""


def number(loop: Loop) -> str:
    rdev = os.stat(loop.device).st_rdev
    return f"block special file {os.major(rdev):x}:{os.minor(rdev):x}"


def refused(a: TestHost, b: TestHost, what: str) -> str:
    r = a.exec(["kvmagent", "migrate", NAME, "host1", "--copy-storage", "--json"],
               check=False, timeout=120)
    print(f"\n{what}: exit {r.returncode}: {r.stderr.strip()}")
    assert r.returncode == 5, (r.stdout, r.stderr)
    assert state(b)[0] == "inactive" and qemus(b) == []
    runs_on(a)
    return str(r.stderr)


def test_a_block_device_missing_or_of_another_size_there_is_refused(
        pair: HostPair, loops: Loops) -> None:
    a, b = pair
    booted(a)
    assert re.search(r"^GUEST-READY .*disks=vda", console(a), re.M), console(a)[-2000:]
    devices = block_devices(b)
    t0 = time.monotonic()
    link(b, None)  # no device, and not its directory (a VG with no volume active there)
    err = refused(a, b, "no device there, nor its directory")
    assert f'host1: disk[0].path = "{DEVICE}" does not exist: kvmagent makes no block ' \
        "device" in err, err
    assert f"make one of {SIZE} bytes (32.0 MiB) there (lvcreate" in err, err
    assert b.exec(["test", "-e", os.path.dirname(DEVICE)], check=False).returncode == 1
    b.exec(["mkdir", os.path.dirname(DEVICE)])  # its directory, but no device
    err = refused(a, b, "no device there")
    assert "kvmagent makes no block device" in err, err
    assert b.exec(["ls", "-A", os.path.dirname(DEVICE)]).stdout == ""  # nothing made
    link(b, loops.other)
    err = refused(a, b, "a device of another size there")
    assert (f'host1: disk[0].path = "{DEVICE}" is {OTHER} bytes (24.0 MiB), here {SIZE} bytes '
            "(32.0 MiB): --copy-storage copies onto a disk of the same size") in err, err
    assert f"hint: make it {SIZE} bytes (32.0 MiB) on host1 (lvresize" in err, err
    assert device_of(b) == number(loops.other)  # the same device, untouched
    assert content(loops.other) == bytes(OTHER)
    assert block_devices(b) == devices
    print(f"three refusals in {time.monotonic() - t0:.1f} s")
    link(b, loops.there)


def test_the_block_device_moves_with_the_guest(pair: HostPair, loops: Loops) -> None:
    a, b = pair
    booted(a)
    original = content(loops.here)
    assert content(loops.there) == bytes(SIZE)
    devices = block_devices(b)
    before = GUEST.disk_sum(a, "before")
    assert before == hashlib.sha256(original).hexdigest()
    r = a.exec(["kvmagent", "migrate", NAME, "host1", "--copy-storage", "--json"],
               check=False, timeout=300)
    assert r.returncode == 0, (r.stdout, r.stderr, b.journal(UNIT)[-3000:])
    done = json.loads(r.stdout.splitlines()[-1])
    assert done["event"] == "migrated" and done["copied"] == ["disk0"], r.stdout
    print(f"\n--copy-storage onto a block device, 32 MiB, {a.release} to {b.release}: "
          f"downtime {done['downtime_ms']} ms "
          f"(QEMU), QEMU's total {done['qemu_total_ms']} ms, the command's total "
          f"{done['total_seconds']} s")
    runs_on(b)
    assert state(a) == ("inactive", "success") and qemus(a) == []
    allowed = b.exec(["systemctl", "show", f"kvm-{NAME}.scope", "-P", "DeviceAllow"]).stdout
    assert sorted(allowed.splitlines()) == ["/dev/kvm rw", f"{DEVICE} rw"], allowed  # its scope
    assert console(a).count("GUEST-INIT") == 1 and "GUEST-INIT" not in console(b)
    assert GUEST.disk_sum(b, "after") == before  # read from host 1's device
    assert content(loops.there) == original
    assert content(loops.here) == original  # left as it was
    # kvmagent made and removed no block device: both are the admin's, still there
    assert device_of(b) == number(loops.there) and device_of(a) == number(loops.here)
    assert block_devices(b) == devices
    b.exec(["systemctl", "stop", UNIT], timeout=180)
    assert device_of(b) == number(loops.there)
    assert all(backing_file(lo.device) == lo.image for lo in loops)
