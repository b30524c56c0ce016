"""A small QMP (QEMU Machine Protocol) client: JSON lines over a socket.

Raw recv() into a buffer (socket.makefile() is unusable after a timeout).
Events that arrive while waiting for a reply are kept in `events`, so the
supervisor's loop sees every SHUTDOWN/RESET/GUEST_PANICKED.  stdlib only:
the long-lived supervisor imports it at start."""

from __future__ import annotations

import json
import select
import socket
import time
from typing import Any

from kvmagent.errors import KvmagentError


class QmpError(KvmagentError):
    pass


class Qmp:
    def __init__(self, sock: socket.socket, timeout: float = 10.0,
                 adopted: bool = False) -> None:
        """adopted: a connection that another supervisor opened (kept in
        systemd's fd store): no greeting, capabilities negotiated already, and
        perhaps a reply to that supervisor's last command still to come —
        this one's ids start where no earlier one can have been."""
        self.sock = sock
        self.buffer = b""
        self.events: list[dict[str, Any]] = []
        self.closed = False
        # of the commands sent; replies carry it back
        self.last_id = time.time_ns() // 1000 if adopted else 0
        if adopted:
            self.greeting: dict[str, Any] = {}
            return
        self.greeting = self._read(timeout)
        if "QMP" not in self.greeting:
            raise QmpError(f"not a QMP greeting: {self.greeting!r}")
        self.execute("qmp_capabilities", timeout=timeout)

    def fileno(self) -> int:
        return self.sock.fileno()

    def _fill(self, timeout: float) -> bool:
        """Read what is there (waiting up to timeout); False on EOF."""
        ready, _, _ = select.select([self.sock], [], [], max(timeout, 0))
        if not ready:
            return True
        try:
            data = self.sock.recv(65536)
        except OSError:  # ECONNRESET when QEMU quits: the same as EOF
            data = b""
        if not data:
            self.closed = True
            return False
        self.buffer += data
        return True

    def _next(self) -> dict[str, Any] | None:
        if b"\n" not in self.buffer:
            return None
        line, _, self.buffer = self.buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message

    def _read(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            message = self._next()
            if message is not None:
                return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QmpError(f"QEMU did not answer on QMP within {timeout:g} s")
            if not self._fill(remaining):
                raise QmpError("QEMU closed the QMP connection")

    def execute(self, command: str, timeout: float = 10.0, fds: list[int] | None = None,
                **arguments: Any) -> Any:
        """COMMAND's return value.  Every command has an id, so that the reply
        to one that timed out, when it comes late, is not taken for this
        one's.  FDS go with the command (SCM_RIGHTS: QMP's getfd takes one)."""
        self.last_id += 1
        request: dict[str, Any] = {"execute": command, "id": self.last_id}
        if arguments:
            request["arguments"] = arguments
        try:
            data = json.dumps(request).encode() + b"\n"
            if fds:
                sent = socket.send_fds(self.sock, [data], fds)
                self.sock.sendall(data[sent:])
            else:
                self.sock.sendall(data)
        except OSError as e:
            raise QmpError(f"QMP {command}: {e.strerror}") from None
        deadline = time.monotonic() + timeout
        while True:
            message = self._read(deadline - time.monotonic())
            if "event" in message:
                self.events.append(message)
            elif message.get("id", self.last_id) != self.last_id:
                continue  # the late reply to a command that timed out
            elif "error" in message:
                raise QmpError(f"QMP {command}: {message['error'].get('desc', message['error'])}")
            elif "return" in message:
                return message["return"]

    def poll(self) -> list[dict[str, Any]]:
        """Events that have arrived (non-blocking); drains the queue."""
        if not self.closed:
            self._fill(0)
        while (message := self._next()) is not None:
            if "event" in message:
                self.events.append(message)
        events, self.events = self.events, []
        return events

    def close(self) -> None:
        self.sock.close()
