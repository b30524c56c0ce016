"""Run a function in a short-lived forked child and get its result (and
file descriptors) back.

The supervisor lives as long as its guest.  Heavy libraries (pyroute2,
pystemd's manager bindings, pydbus) are needed only for a moment at start;
importing them in a forked child keeps the long-lived process small
(harness notes, section 9: ~28 MiB with them, ~5 MiB without), and fds the
child opens (taps) come back over SCM_RIGHTS."""

from __future__ import annotations

import os
import pickle
import select
import signal
import socket
import traceback
from typing import Any, Callable

from .errors import ExitStatus, KvmagentError

MAX_MESSAGE = 1 << 20
MAX_FDS = 64


def call(fn: Callable[..., tuple[Any, list[int]]], *args: Any,
         timeout: float = 60.0) -> tuple[Any, list[int]]:
    """fn(*args) -> (picklable value, fds), run in a child.  A KvmagentError
    in the child is raised again here; any other exception becomes one."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # child: never return into the caller's code
        code = 0
        try:
            ours.close()
            try:
                value, fds = fn(*args)
                reply: tuple[str, Any] = ("ok", value)
            except KvmagentError as e:
                reply, fds = ("error", (e.message, e.hint, int(e.status))), []
            except BaseException:  # noqa: BLE001 - reported to the parent
                reply, fds = ("crash", traceback.format_exc()), []
            socket.send_fds(theirs, [pickle.dumps(reply)], fds)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    theirs.close()
    try:
        ready, _, _ = select.select([ours], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            raise KvmagentError(f"{getattr(fn, '__name__', fn)} did not finish within "
                                f"{timeout:g} s")
        data, fds, _, _ = socket.recv_fds(ours, MAX_MESSAGE, MAX_FDS)
    finally:
        ours.close()
        os.waitpid(pid, 0)
    if not data:
        raise KvmagentError(f"{getattr(fn, '__name__', fn)} died without an answer")
    kind, value = pickle.loads(data)
    if kind == "ok":
        return value, fds
    for fd in fds:
        os.close(fd)
    if kind == "error":
        message, hint, status = value
        raise KvmagentError(message, hint, ExitStatus(status))
    raise KvmagentError(f"internal error in {getattr(fn, '__name__', fn)}:\n{value}")
