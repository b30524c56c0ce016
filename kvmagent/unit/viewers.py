"""Console viewers: the supervisor is QEMU's one serial console client (a
chardev serves one client and drops output while none is attached), and
fans the output out to the journal and to any `kvmagent console` viewers on
a unix socket in the guest's runtime directory (mode 0600, root).  Every
viewer may type; input from all of them goes to the guest, as on a shared
serial line.  A viewer too slow to take the output is dropped, never the
guest or the journal.  stdlib only: the long-lived supervisor holds it."""

from __future__ import annotations

import os
import socket
from contextlib import suppress
from pathlib import Path

MAX_VIEWERS = 8
# The kernel's room for output a viewer has not read yet.  A guest writes
# its console a few bytes at a time, and each send costs the socket's
# buffer ~770 bytes of bookkeeping: the default buffer (212992) drops a
# viewer that is 278 small writes (3 KiB of output) behind, a moment's
# delay on a loaded host.  This one holds ~5000 (SO_SNDBUFFORCE: root with
# CAP_NET_ADMIN, which kvm@.service keeps; else as much as wmem_max allows).
VIEWER_SNDBUF = 2 << 20
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
# Viewers' input waiting for the guest's serial port to take it: beyond this,
# viewers are not read (their own sends block), so that a guest that does not
# read its console (paused, hung, in firmware) never blocks the supervisor.
MAX_PENDING = 1 << 16


def roomy(viewer: socket.socket) -> None:
    """VIEWER_SNDBUF for a viewer's output, or as much as this host allows."""
    for option in (SO_SNDBUFFORCE, socket.SO_SNDBUF):
        try:
            viewer.setsockopt(socket.SOL_SOCKET, option, VIEWER_SNDBUF)
            return
        except OSError:
            continue


class ConsoleHub:
    def __init__(self, path: Path, guest: socket.socket, escape: str, key_file: Path) -> None:
        """PATH: the socket; KEY_FILE gets the guest's ESCAPE key
        (Paths.console_socket, Paths.console_key)."""
        self.path = path
        self.guest = guest
        self.key_file = key_file
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        with suppress(FileNotFoundError):
            path.unlink()  # left by a supervisor that was killed
        self.listener = socket.socket(socket.AF_UNIX,
                                      socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # the socket is created 0600
        try:
            self.listener.bind(str(path))
        finally:
            os.umask(old)
        self.key_file.write_text(escape + "\n")
        self.listener.listen(MAX_VIEWERS)
        self.listener.setblocking(False)
        self.viewers: list[socket.socket] = []
        self.pending = bytearray()  # input for the guest

    def sockets(self) -> list[socket.socket]:
        """What to watch for reading: viewers only while their input has room."""
        if len(self.pending) >= MAX_PENDING:
            return [self.listener]
        return [self.listener, *self.viewers]

    def handle(self, ready: list[object]) -> None:
        if self.listener in ready:
            with suppress(BlockingIOError):
                viewer, _ = self.listener.accept()
                if len(self.viewers) >= MAX_VIEWERS:
                    with suppress(OSError):
                        viewer.send(b"kvmagent: too many console viewers\r\n")
                    viewer.close()
                else:
                    viewer.setblocking(False)
                    roomy(viewer)
                    self.viewers.append(viewer)
        for viewer in [v for v in self.viewers if v in ready]:
            try:
                data = viewer.recv(4096)
            except OSError:
                data = b""
            if not data:
                self._drop(viewer)
                continue
            self.pending += data
        self.flush()

    def flush(self) -> None:
        """Give the guest what it has room for, without waiting."""
        if not self.pending:
            return
        try:
            sent = self.guest.send(self.pending, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:  # QEMU is gone
            self.pending.clear()
            return
        del self.pending[:sent]

    def broadcast(self, data: bytes) -> None:
        for viewer in list(self.viewers):
            try:
                sent = viewer.send(data)
            except (BlockingIOError, OSError):
                sent = -1
            if sent != len(data):  # its buffer is full: it cannot keep up
                self._drop(viewer)

    def _drop(self, viewer: socket.socket) -> None:
        self.viewers.remove(viewer)
        viewer.close()

    def close(self) -> None:
        for viewer in self.viewers:
            viewer.close()
        self.listener.close()
        for path in (self.path, self.key_file):
            with suppress(FileNotFoundError):
                path.unlink()
