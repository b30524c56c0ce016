"""The backing chain of a qcow2 image, read from its header (no qemu-img:
the planner runs it at every start).  QEMU runs as an unprivileged user and
gets its disks as file descriptors; a qcow2 overlay (`kvmagent clone`)
names its backing file by path, which QEMU would open itself — and could
not, the image being root's.  So the planner reads the chain and the
supervisor opens every backing file read-only and passes it as an fd too
(kvmagent.render.qemu: backing.file.filename=/dev/fdset/N).

The qcow2 header (docs/interop/qcow2.txt of QEMU): magic "QFI\\xfb",
version, backing_file_offset (u64 at 8) and backing_file_size (u32 at 16);
header extensions follow the header (at 72 for version 2, at header_length
for 3), the backing file's format in extension 0xe2792aca."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from kvmagent.errors import host_error

MAGIC = b"QFI\xfb"
BACKING_FORMAT_EXT = 0xE2792ACA
MAX_DEPTH = 8  # a longer chain is a mistake (or a loop)
FORMATS = ("raw", "qcow2")


def read_header(data: bytes) -> tuple[str, str | None] | None:
    """(backing file, its format or None) from the first bytes of a qcow2
    image (at least the header and its extensions), None when it has no
    backing file.  ValueError when DATA is not a qcow2 header."""
    if len(data) < 72 or data[:4] != MAGIC:
        raise ValueError("not a qcow2 image")
    version, offset, size = struct.unpack_from(">IQI", data, 4)
    if version not in (2, 3):
        raise ValueError(f"qcow2 version {version}")
    if not offset or not size:
        return None
    if offset + size > len(data) or size > 1023:
        raise ValueError("backing file name out of range")
    name = data[offset:offset + size].decode("utf-8", "surrogateescape")
    pos = 72 if version == 2 else struct.unpack_from(">I", data, 100)[0]
    fmt = None
    while pos + 8 <= min(len(data), offset):
        kind, length = struct.unpack_from(">II", data, pos)
        if kind == 0:
            break
        if kind == BACKING_FORMAT_EXT:
            fmt = data[pos + 8:pos + 8 + length].decode("ascii", "replace")
        pos += 8 + (length + 7) // 8 * 8
    return name, fmt


def backing_chain(path: Path, origin: str, key: str) -> list[tuple[Path, str]]:
    """The backing files of qcow2 image PATH, nearest first, each with its
    format: a host error (naming ORIGIN, KEY and the file) when one is
    missing, of a format kvmagent does not open (raw, qcow2), or not said
    (QEMU would probe it: `qemu-img rebase -u -F FMT -b FILE` says it)."""
    chain: list[tuple[Path, str]] = []
    current = path
    while True:
        try:
            with open(current, "rb") as f:
                data = f.read(65536)
        except OSError as e:
            raise host_error(f"{origin}: {key} = \"{path}\": backing file {current}: "
                             f"{e.strerror}") from None
        try:
            found = read_header(data)
        except ValueError as e:
            raise host_error(f"{origin}: {key} = \"{path}\": {current}: {e}") from None
        if found is None:
            return chain
        name, fmt = found
        backing = Path(os.path.join(current.parent, name))  # relative to its overlay
        if fmt not in FORMATS:
            raise host_error(
                f"{origin}: {key} = \"{path}\": backing file {backing} of {current} has "
                + (f"format {fmt!r}" if fmt else "no format recorded"),
                f"record it: qemu-img rebase -u -F raw -b {backing} {current} (or -F qcow2)")
        if len(chain) >= MAX_DEPTH or backing == path or backing in [c for c, _ in chain]:
            raise host_error(f"{origin}: {key} = \"{path}\": backing chain longer than "
                             f"{MAX_DEPTH} or a loop at {backing}")
        chain.append((backing, fmt))
        if fmt != "qcow2":
            return chain
        current = backing
