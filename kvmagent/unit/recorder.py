"""The supervisor's lifecycle events into the state database
(kvmagent.host.state), written by short-lived forked children: sqlite3 stays
out of the long-lived supervisor, and no write holds up a start or a stop.

Events are queued with the time they happened and written in batches
(flush()), one writer at a time, so the rows keep their order.  Once the
guest is stopping, a writer lingers, sqlite3 imported, for the events still
to come: the supervisor's exit then waits for one short write.  When the
last event is written, RECORDED_FILE in the runtime directory tells
ExecStopPost= (`kvmagent stop-post`) that this run needs nothing more from
it; when a write failed, the file is not written and stop-post records the
end of the run from systemd's view instead, and the supervisor says so in
the journal.  The writer imports kvmagent.host.state when it runs: after
an upgrade of the package, a supervisor started before it loads the new
package's modules there (or fails to, if they moved), and a failure is
said in the journal with its reason, never hidden.  Reasons are
kvmagent.lifecycle's names."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import time
from contextlib import suppress
from typing import Any, Callable

from kvmagent.lifecycle import ADMIN, RECORDED_FILE, SHUTDOWN
from kvmagent.paths import Paths

Event = tuple[Any, ...]  # event, reason, detail, pid, realtime, boottime, booted


class EventRecorder:
    def __init__(self, name: str, paths: Paths, log: Callable[[str], None]) -> None:
        self.name, self.paths, self.log = name, paths, log
        self.child = 0
        self.queue: list[Event] = []
        self.lingering: socket.socket | None = None  # to the lingering writer
        self.failed = False  # a writer exited unsuccessfully
        self.ended = False  # the run's `stopped` is among the events

    def __call__(self, event: str, reason: str | None = None, detail: str | None = None,
                 pid: int | None = None, booted: float | None = None) -> None:
        """BOOTED: a `running` of a guest that arrived by live migration,
        the wall clock of its boot elsewhere (kvmagent.host.state)."""
        self.queue.append((event, reason, detail, pid,
                           time.time(), time.clock_gettime(time.CLOCK_BOOTTIME), booted))
        self.ended |= event == "stopped"

    def flush(self, linger: bool = False) -> None:
        """Write the queued events in a child (after the previous writer);
        linger: the child stays for the events still to come (finish())."""
        if self.lingering is not None and self.queue:
            try:
                self.lingering.send(pickle.dumps(self.queue))
                self.queue = []
                return
            except OSError:  # the writer died: a new one takes the queue
                self._let_go()
        if self.lingering is not None or (not self.queue and not linger):
            return
        self.wait()
        queue, self.queue = self.queue, []
        ours, theirs = (socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) if linger
                        else (None, None))
        child = os.fork()
        if child == 0:
            code = 1
            try:
                signal.set_wakeup_fd(-1)  # the parent's: not ours to write to
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                    signal.signal(sig, signal.SIG_DFL)
                if ours is not None:
                    ours.close()
                code = 0 if self._write(queue, theirs) else 1
            except BaseException as e:  # said, not hidden by os._exit
                with suppress(BaseException):
                    self.log(f"cannot record guest {self.name}'s events: "
                             f"{type(e).__name__}: {e}")
            finally:
                os._exit(code)
        self.child = child
        if theirs is not None:
            theirs.close()
            self.lingering = ours

    def _write(self, queue: list[Event], more: socket.socket | None) -> bool:
        """In the writer: QUEUE, then each batch from MORE until it closes.
        False if an event could not be written (state.Recorder logged it)."""
        from kvmagent.host import state
        from kvmagent.unit import stoppost
        record = state.Recorder(self.name, self.paths.state_dir, self.log)
        boot = state.boot_id(str(self.paths.runtime_dir))
        shutdown: bool | None = None
        while True:
            for event, reason, detail, pid, realtime, boottime, *rest in queue:
                if reason == ADMIN and detail is None:
                    if shutdown is None:
                        shutdown = stoppost.host_stopping()
                    if shutdown:  # systemctl stop, but by the host's shutdown
                        reason = SHUTDOWN
                record(event, reason, detail, pid, at=state.Now(realtime, boottime, boot),
                       booted=rest[0] if rest else None)
            data = more.recv(1 << 20) if more is not None else b""
            if not data:
                return not record.failed
            queue = pickle.loads(data)

    def _let_go(self) -> None:
        if self.lingering is not None:
            self.lingering.close()  # the writer's end of input
            self.lingering = None

    def wait(self, block: bool = True) -> None:
        """Reap the writer (block=False: only if it is done), so that no
        defunct child hangs under the supervisor for the guest's lifetime."""
        if self.child:
            try:
                done, status = os.waitpid(self.child, 0 if block else os.WNOHANG)
            except ChildProcessError:
                done, status = self.child, 0
            if done:
                self.child = 0
                self.failed |= status != 0
                self._let_go()  # a lingering writer that is gone takes nothing more

    def finish(self) -> None:
        """Write what is left and wait for it (the supervisor is exiting);
        then, if every write succeeded and the run's end was among them, tell
        ExecStopPost= (kvmagent stop-post) that this run needs nothing more
        from it.  A supervisor that ends in an unexpected exception records
        no `stopped`: stop-post records the end from systemd's view."""
        self.flush()
        self._let_go()
        self.wait()
        invocation = os.environ.get("INVOCATION_ID")
        if self.failed:
            self.log("the state database has not every event of this run; kvmagent "
                     "stop-post records its end from systemd's view")
        if invocation and not self.failed and self.ended:
            with suppress(OSError):
                (self.paths.guest_runtime(self.name) / RECORDED_FILE).write_text(invocation)
