"""sd_notify(3) and the native journal protocol, in the stdlib.

The supervisor lives as long as its guest (hundreds of days); keeping it
to the standard library keeps it small (no binding to libsystemd, whose
sd_notify and sd_journal_send are a few lines of socket code here:
kvmagent.unit.forkcall says what libraries would cost it) and keeps it working
after a package upgrade replaced other modules."""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections import deque

JOURNAL_SOCKET = "/run/systemd/journal/socket"


def _send(payload: bytes, fds: tuple[int, ...] = ()) -> bool:
    """One datagram to $NOTIFY_SOCKET (an abstract address when it starts
    with "@"), with FDS attached; False when not under systemd or refused."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendmsg([payload], ancillary if fds else [], 0, address)
        except OSError:
            return False
    return True


def notify(*fields: str) -> bool:
    """Send KEY=VALUE lines to $NOTIFY_SOCKET; False when not under systemd."""
    return _send("\n".join(fields).encode())


def store_fd(fd: int, name: str) -> bool:
    """Hand FD to systemd's file descriptor store (FileDescriptorStoreMax=)
    as NAME: systemd keeps it while the unit's main process is restarted and
    gives it back in LISTEN_FDS (listen_fds()).  False when not under systemd."""
    return _send(f"FDSTORE=1\nFDNAME={name}".encode(), (fd,))


def listen_fds(environ: dict[str, str] | None = None) -> dict[str, int]:
    """sd_listen_fds_with_names(3): the fds systemd passed this process (from
    its fd store), by name; consumed (the variables are removed, the fds made
    close-on-exec) so that no child takes them for its own."""
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        return {}
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return {}
    names = env.get("LISTEN_FDNAMES", "").split(":")
    fds: dict[str, int] = {}
    for i in range(count):
        fd = 3 + i  # SD_LISTEN_FDS_START
        os.set_inheritable(fd, False)
        fds[names[i] if i < len(names) and names[i] else f"fd{i}"] = fd
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    return fds


def _field(key: str, value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    if b"\n" in data:  # binary-safe form: KEY\n<le64 length><data>\n
        return key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key.encode() + b"=" + data + b"\n"


class Journal:
    """A connection to journald's native socket.  Fields are sent as given;
    falls back to stderr (which systemd also sends to the journal) when the
    socket is missing.

    backlog > 0 (the supervisor): never wait for journald.  Its socket takes
    only a few datagrams while journald does not read (stalled, restarting:
    net.unix.max_dgram_qlen, 10 here); a supervisor waiting there would miss
    its watchdog pings and its stop.  Messages that are not taken at once
    wait, in order, for flush() (when the socket is writable); beyond
    BACKLOG of them they are lost and counted.

    unit: the systemd unit the messages are about, sent as
    OBJECT_SYSTEMD_UNIT= (which `journalctl -u UNIT` matches in messages from
    root).  journald finds a sender's unit from its cgroup when it reads the
    message; a short-lived child of the supervisor may have exited by then,
    and its message would be missing from `journalctl -u`."""

    def __init__(self, path: str = JOURNAL_SOCKET, backlog: int = 0,
                 unit: str | None = None) -> None:
        self.path = path
        self.about = _field("OBJECT_SYSTEMD_UNIT", unit) if unit else b""
        self.sock: socket.socket | None = None
        self.limit = backlog
        self.backlog: deque[bytes] = deque()
        self.lost = 0
        try:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.sock.connect(path)
        except OSError:
            self.sock = None

    def fileno(self) -> int:
        assert self.sock is not None
        return self.sock.fileno()

    def send(self, message: str | bytes, priority: int = 6, **fields: str) -> None:
        payload = _field("MESSAGE", message) + _field("PRIORITY", str(priority)) + self.about
        for key, value in fields.items():
            payload += _field(key, value)
        if self.sock is not None:
            if self.limit:
                self.flush()
                if not self.backlog and self._send_now(payload):
                    return
                if len(self.backlog) < self.limit:
                    self.backlog.append(payload)
                else:
                    self.lost += 1
                return
            try:
                self.sock.send(payload)
                return
            except OSError:
                pass  # too large or journald restarting: fall back to stderr
        text = message.decode(errors="replace") if isinstance(message, bytes) else message
        os.write(2, f"<{priority}>{text}\n".encode())

    def _send_now(self, payload: bytes) -> bool:
        """False if journald does not take it now (it will be tried again)."""
        assert self.sock is not None
        try:
            self.sock.send(payload, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            pass  # too large, or journald is gone: not worth trying again
        return True

    def flush(self) -> int:
        """Send what waits, as far as journald takes it.  Once all is sent,
        returns how many messages were lost meanwhile (and forgets them)."""
        while self.backlog:
            if not self._send_now(self.backlog[0]):
                return 0
            self.backlog.popleft()
        lost, self.lost = self.lost, 0
        return lost

    def drain(self, timeout: float) -> None:
        """At exit: wait up to TIMEOUT seconds for journald to take what waits."""
        deadline = time.monotonic() + timeout
        while self.backlog and self.sock is not None:
            self.flush()
            left = deadline - time.monotonic()
            if not self.backlog or left <= 0:
                return
            select.select([], [self.sock], [], left)
