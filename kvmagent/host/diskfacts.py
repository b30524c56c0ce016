"""A host's disks as `kvmagent migrate --copy-storage` compares them
between two hosts (kvmagent.render.storagecopy decides): each disk's kind,
size and backing files (DiskFact), a backing file's length and a sample of
its bytes (Backing: the same template on both hosts?), a block device's
identity (the same LV or LUN seen from both?), and the files a process
holds open (which backing files a running QEMU still reads)."""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from pathlib import Path

from kvmagent.config.model import Format, Guest
from kvmagent.errors import KvmagentError, host_error
from kvmagent.host.imagechain import MAGIC, backing_chain, read_header
from kvmagent.render.storagecopy import Backing, DiskFact, Kind

CHUNK = 1 << 20
# A backing file's sample: its first and last MiB, and SAMPLE_SPOT bytes at
# SAMPLES points spread evenly between them (~5 MiB read, whatever its size)
SAMPLES, SAMPLE_SPOT = 64, 64 << 10


def _qcow2(path: Path) -> tuple[int, str]:
    """A qcow2 image's virtual size (u64 at 24 of its header) and backing file."""
    with open(path, "rb") as f:
        head = f.read(65536)
    if head[:4] != MAGIC or len(head) < 32:
        raise ValueError("not a qcow2 image")
    backing = read_header(head)
    return struct.unpack_from(">Q", head, 24)[0], backing[0] if backing else ""


def device_identity(rdev: int, sysfs: Path = Path("/sys/dev/block")) -> str:
    """A block device's identity that every host seeing the device reads
    alike: device-mapper's UUID (LVM: "LVM-" and the VG's and LV's UUIDs,
    the same on every host of a shared VG; multipath: "mpath-" and the
    WWID), else the disk's WWID (SCSI, NVMe: a SAN or iSCSI LUN), with the
    partition's number for a partition; "" when the kernel says none."""
    node = sysfs / f"{os.major(rdev)}:{os.minor(rdev)}"

    def read(path: Path) -> str:
        try:
            return path.read_text().strip()
        except (OSError, UnicodeDecodeError):
            return ""

    if uuid := read(node / "dm" / "uuid"):
        return f"dm:{uuid}"
    if wwid := read(node / "device" / "wwid"):
        return f"wwid:{wwid}"
    if (part := read(node / "partition")) and (wwid := read(node / ".." / "device" / "wwid")):
        return f"wwid:{wwid}:part{part}"
    return ""


def _length(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def backing_fact(path: str, fmt: str) -> Backing:
    """A backing file as this host has it at PATH: its length, and a
    checksum of samples across it (both hosts' files the same file?): its
    first and last MiB, where partition tables and file system headers
    are, and SAMPLES spots between.  Not every byte: a template is GiBs,
    and a backing file never changes under its overlays."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return Backing(path, fmt, 0, "")
    try:
        size, sample = _length(fd), hashlib.sha256()
        sample.update(os.pread(fd, CHUNK, 0))
        for i in range(1, SAMPLES + 1):
            sample.update(os.pread(fd, SAMPLE_SPOT, size * i // (SAMPLES + 1)))
        sample.update(os.pread(fd, CHUNK, max(0, size - CHUNK)))
        return Backing(path, fmt, size, sample.hexdigest())
    except OSError:
        return Backing(path, fmt, 0, "")
    finally:
        os.close(fd)


def _chain(path: Path, key: str, strict: bool) -> tuple[Backing, ...]:
    """The backing files of qcow2 image PATH as this host has them; STRICT
    (the source's, whose guest runs on them): a host error naming the file
    when one is missing or unreadable."""
    chain = tuple(backing_fact(str(p), f) for p, f in backing_chain(path, "here", key))
    if strict and (lost := [b.path for b in chain if not b.size]):
        raise host_error(f'here: {key} = "{path}": backing file {lost[0]} cannot be read')
    return chain


def disk_facts(guest: Guest, strict: bool = False) -> list[DiskFact]:
    """Guest's disks as this host has them.  STRICT: the source's facts, a
    backing file missing or unreadable is a host error (which the guest
    running on it makes unlikely) rather than a disk of kind OTHER."""
    out = []
    for d in guest.disks:
        kind, size, backing, identity = Kind.OTHER, 0, "", ""
        chain: tuple[Backing, ...] = ()
        try:
            st = os.stat(d.path)
            if stat.S_ISREG(st.st_mode):
                kind, size = Kind.FILE, st.st_size
                if d.format is Format.QCOW2:
                    size, backing = _qcow2(d.path)
                    if backing:
                        try:
                            chain = _chain(d.path, f"disk[{d.index}].path", strict)
                        except KvmagentError:
                            if strict:
                                raise
                            kind = Kind.OTHER
            elif stat.S_ISBLK(st.st_mode):
                fd = os.open(d.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    kind, size = Kind.BLOCK, _length(fd)
                finally:
                    os.close(fd)
                identity = device_identity(st.st_rdev)
        except FileNotFoundError:
            kind = Kind.MISSING if d.path.parent.is_dir() else Kind.NO_DIRECTORY
        except (OSError, ValueError):
            kind = Kind.OTHER
        out.append(DiskFact(d.index, str(d.path), str(kind), size, not d.readonly,
                            str(d.format), backing, identity, chain))
    return out


def held_files(pid: int) -> set[tuple[int, int]]:
    """(device, inode) of each file process PID holds open."""
    held = set()
    fds = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fds):
        try:
            st = os.stat(fds / fd)
        except OSError:
            continue
        held.add((st.st_dev, st.st_ino))
    return held
