"""Run a function in a short-lived forked child and get its result (and
file descriptors) back.

The supervisor lives as long as its guest.  Heavy libraries (pyroute2,
pystemd's manager bindings, pydbus) are needed only for a moment at start;
importing them in a forked child keeps the long-lived process small (its
modules alone: ~12 MiB resident, ~7 MiB PSS; with those libraries imported
as well: ~32 MiB resident, ~22 MiB PSS, measured with Debian 12's), and fds
the child opens (taps) come back over SCM_RIGHTS.  A child can be forked early with the
modules it will need (Child(preload=...)), so their import overlaps with
the parent's own work and the call itself is quick."""

from __future__ import annotations

import importlib
import os
import pickle
import select
import signal
import socket
from contextlib import suppress
from typing import Any, Callable

from kvmagent.errors import ExitStatus, KvmagentError

MAX_MESSAGE = 1 << 20
MAX_FDS = 64

# A function, or "module:function" so that the caller need not import it.
Call = Callable[..., tuple[Any, list[int]]] | str


def _name(fn: Any) -> str:
    return str(getattr(fn, "__name__", fn)).rpartition(":")[2]


class Child:
    """A forked child that imports PRELOAD at once, then runs one call."""

    def __init__(self, preload: tuple[str, ...] = (), nice: int = 0) -> None:
        self.ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.pid = os.fork()
        except OSError as e:  # out of processes or memory: said, not a traceback
            self.ours.close()
            theirs.close()
            raise KvmagentError(f"cannot start a helper process: {e.strerror}",
                                "the host is out of processes or memory") from None
        if self.pid == 0:  # child: never return into the caller's code
            code = 0
            try:
                self.ours.close()
                if nice:
                    os.nice(nice)
                self._serve(theirs, preload)
            except BaseException:  # noqa: BLE001
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        self.used = False
        self.answered = False
        self.fn: Call = ""

    @staticmethod
    def _serve(sock: socket.socket, preload: tuple[str, ...]) -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            for module in preload:
                importlib.import_module(module)
        except BaseException:  # noqa: BLE001 - reported when called
            import traceback
            failure: str | None = traceback.format_exc()
        else:
            failure = None
        request = sock.recv(MAX_MESSAGE)
        if not request:  # the parent did not need us
            return
        fds: list[int] = []
        try:
            if failure:
                reply: tuple[str, Any] = ("crash", failure)
            else:
                fn, args = pickle.loads(request)
                if isinstance(fn, str):  # "module:function", imported here only
                    module, _, attr = fn.partition(":")
                    fn = getattr(importlib.import_module(module), attr)
                value, fds = fn(*args)
                reply = ("ok", value)
        except KvmagentError as e:
            reply, fds = ("error", (e.message, e.hint, int(e.status))), []
        except BaseException:  # noqa: BLE001 - reported to the parent
            import traceback
            reply, fds = ("crash", traceback.format_exc()), []
        socket.send_fds(sock, [pickle.dumps(reply)], fds)

    def full_speed(self) -> None:
        """Undo nice=: the parent's own priority again (for root:
        CAP_SYS_NICE), once the child's work is wanted soon."""
        if self.pid:
            with suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, self.pid, os.getpriority(os.PRIO_PROCESS, 0))

    def call(self, fn: Call, *args: Any, timeout: float = 60.0) -> tuple[Any, list[int]]:
        """fn(*args) -> (picklable value, fds), run in the child.  A
        KvmagentError there is raised again here; anything else becomes one."""
        self.submit(fn, *args)
        return self.result(timeout)

    def submit(self, fn: Call, *args: Any) -> None:
        """Start fn(*args) in the child; result() waits for it."""
        assert not self.used, "a Child runs one call"
        self.used = True
        self.fn = fn
        try:
            self.ours.send(pickle.dumps((fn, args)))
        except BaseException:
            self.close()
            raise

    def done(self, timeout: float) -> bool:
        """Whether the answer is there, waiting up to TIMEOUT seconds for it."""
        ready, _, _ = select.select([self.ours], [], [], timeout)
        return bool(ready)

    def result(self, timeout: float = 60.0) -> tuple[Any, list[int]]:
        fn = self.fn
        try:
            ready, _, _ = select.select([self.ours], [], [], timeout)
            if not ready:
                os.kill(self.pid, signal.SIGKILL)
                raise KvmagentError(f"{_name(fn)} did not finish within {timeout:g} s")
            data, fds, _, _ = socket.recv_fds(self.ours, MAX_MESSAGE, MAX_FDS)
            self.answered = True
        finally:
            self.close()
        if not data:
            raise KvmagentError(f"{_name(fn)} died without an answer")
        kind, value = pickle.loads(data)
        if kind == "ok":
            return value, fds
        for fd in fds:
            os.close(fd)
        if kind == "error":
            message, hint, status = value
            raise KvmagentError(message, hint, ExitStatus(status))
        raise KvmagentError(f"internal error in {_name(fn)}:\n{value}")

    def close(self) -> None:
        """Dismiss the child (killed unless it answered: it may still be
        importing, or working for a caller that gave up) and reap it."""
        if self.pid:
            self.ours.close()
            if not self.answered:
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = 0


def call(fn: Call, *args: Any, timeout: float = 60.0) -> tuple[Any, list[int]]:
    """fn(*args) in a fresh child; see Child.call."""
    return Child().call(fn, *args, timeout=timeout)
