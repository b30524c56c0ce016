"""The control channel of a running supervisor: /run/kvmagent/NAME/control.sock,
AF_UNIX SOCK_SEQPACKET, root only (0600 in a 0750 directory).  One request,
one reply, each a JSON object of a typed record of kvmagent.unit.protocol;
the command line talks to the supervisor only this way, never to QEMU's
QMP.

The listening socket lives as long as the guest: it is kept in systemd's
file descriptor store like QMP and the console, so a supervisor that takes
the guest over (kvmagent.unit.adopt) or reloads its code serves on the
same socket.  Commands: "status" (Status: which kvmagent code runs, since
when), "reload" (the supervisor re-executes itself, the new code taking
its guest over: no guest outage), "freeze" with "seconds" (the guest is
paused, QEMU's "stop", for a crash-consistent snapshot of its disks, and
resumed by the supervisor itself after at most that long: a client that
dies never leaves it paused) and "thaw" (resumed at once).  A request may
carry file descriptors (SCM_RIGHTS): live migration hands the supervisor the
stream to the other host this way ("migrate", "migrate-incoming"; with
--copy-storage a disk's NBD connection, "migrate-copy", and the
destination's NBD listening socket, "migrate-serve"), as
neither it nor QEMU may open a network connection of their own
(kvmagent.unit.migration)."""

from __future__ import annotations

import array
import json
import os
import socket
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import NamedTuple

from kvmagent.errors import ExitStatus, KvmagentError

CONTROL_FDNAME = "control"
COMMANDS = ("status", "reload", "freeze", "thaw", "migrate", "migrate-status",
            "migrate-cancel", "migrate-end", "migrate-incoming", "migrate-copy",
            "migrate-serve")
MAX_MESSAGE = 65536
MAX_FDS = 4  # file descriptors one request may carry


def listen(path: Path) -> socket.socket:
    """The channel's listening socket (a stale one is replaced)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        if path.is_socket():
            path.unlink()
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        sock.listen(8)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class Request(NamedTuple):
    """One client's request: its connection (answer() closes it), command,
    fields, and the file descriptors it carried (the receiver owns them:
    close_fds() those it does not keep)."""
    conn: socket.socket
    command: str
    fields: dict[str, object]
    fds: list[int]


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        with suppress(OSError):
            os.close(fd)


def _recv_fds(conn: socket.socket) -> tuple[bytes, list[int]]:
    """A message and its fds, close-on-exec (never inherited by QEMU or a
    helper by mistake).  Not socket.recv_fds: it drops its flags argument
    (Python 3.11 and 3.13), so MSG_CMSG_CLOEXEC would not apply."""
    message, ancillary, _, _ = conn.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4),
                                            socket.MSG_CMSG_CLOEXEC)
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return message, list(fds)


def receive(listener: socket.socket, timeout: float = 1.0) -> Request | None:
    """Accept one client and read its command, the request's other fields
    and the file descriptors that came with it (None: nothing there, or a
    client that sent no valid request; it is answered and closed, and so
    are the fds it sent)."""
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, InterruptedError):
        return None
    conn.settimeout(timeout)
    fds: list[int] = []
    try:
        message, fds = _recv_fds(conn)
        data = json.loads(message or b"null")
        command = data.get("command") if isinstance(data, dict) else None
    except (OSError, ValueError):
        command = None
    if command not in COMMANDS:
        close_fds(fds)
        answer(conn, {"ok": False, "error": f"unknown request (commands: {', '.join(COMMANDS)})"})
        return None
    return Request(conn, str(command), data, fds)


def answer(conn: socket.socket, reply: dict[str, object]) -> None:
    try:
        conn.send(json.dumps(reply).encode())
    except OSError:
        pass  # the client gave up
    finally:
        conn.close()


def ask(path: Path, command: str, timeout: float = 10.0, fds: Sequence[int] = (),
        **fields: object) -> dict[str, object]:
    """The client: COMMAND's reply; KvmagentError when no supervisor answers.
    FDS go with the request (the caller still owns and closes its copies)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        socket.send_fds(sock, [json.dumps({"command": command, **fields}).encode()], list(fds))
        data = json.loads(sock.recv(MAX_MESSAGE) or b"null")
    except (OSError, ValueError) as e:
        raise KvmagentError(f"no answer from the supervisor at {path}: "
                            f"{getattr(e, 'strerror', None) or e}",
                            "is the guest running? (systemctl status kvm@NAME)",
                            ExitStatus.FAILURE) from None
    finally:
        sock.close()
    if not isinstance(data, dict):
        raise KvmagentError(f"{path}: not a reply: {data!r}", None, ExitStatus.FAILURE)
    if not data.get("ok", False):
        raise KvmagentError(f"the supervisor at {path} refused {command}: "
                            f"{data.get('error', '?')}", None, ExitStatus.FAILURE)
    return data
