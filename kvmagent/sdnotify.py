"""sd_notify(3) and the native journal protocol, in the stdlib.

The supervisor lives as long as its guest (hundreds of days); keeping it
to the standard library keeps it small (harness notes, section 9) and
keeps it working after a package upgrade replaced other modules."""

from __future__ import annotations

import os
import socket
import struct

JOURNAL_SOCKET = "/run/systemd/journal/socket"


def notify(*fields: str) -> bool:
    """Send KEY=VALUE lines to $NOTIFY_SOCKET; False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto("\n".join(fields).encode(), address)
        except OSError:
            return False
    return True


def _field(key: str, value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    if b"\n" in data:  # binary-safe form: KEY\n<le64 length><data>\n
        return key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key.encode() + b"=" + data + b"\n"


class Journal:
    """A connection to journald's native socket.  Fields are sent as given;
    falls back to stderr (which systemd also sends to the journal) when the
    socket is missing."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        try:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.sock.connect(path)
        except OSError:
            self.sock = None

    def send(self, message: str | bytes, priority: int = 6, **fields: str) -> None:
        payload = _field("MESSAGE", message) + _field("PRIORITY", str(priority))
        for key, value in fields.items():
            payload += _field(key, value)
        if self.sock is not None:
            try:
                self.sock.send(payload)
                return
            except OSError:
                pass  # too large or journald restarting: fall back to stderr
        text = message.decode(errors="replace") if isinstance(message, bytes) else message
        os.write(2, f"<{priority}>{text}\n".encode())
