"""Taking over a running guest: a supervisor that died (killed, an
exception, the OOM killer) is restarted by systemd, and the new one finds
its guest's QEMU still running in kvm-NAME.scope (the scope is PartOf= the
service, not bound to it).  systemd's file descriptor store gives back the
supervisor's ends of QMP and the serial console (the supervisor stored them
with FDSTORE=1 once QEMU ran, so QEMU never saw them close); the running
record in the runtime directory (RuntimeDirectoryPreserve=restart) names
the QEMU and how it was started.

An adopted QEMU is not the new supervisor's child: it is watched through a
pidfd (its exit status is not known; QMP's SHUTDOWN event says whether the
guest powered off).  Before anything is taken over, the process must be
this guest's QEMU: in kvm-NAME.scope, with the guest's -name and -uuid."""

from __future__ import annotations

import os
import select
import signal
from contextlib import suppress

from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.names import scope_unit
from kvmagent.paths import Paths
from kvmagent.render.plan import Running

# The names under which the supervisor stores its fds (FDNAME=).
QMP_FDNAME = "qmp"
CONSOLE_FDNAME = "console"


def write_running(paths: Paths, running: Running) -> None:
    path = paths.running_record(running.name)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(running.to_json() + "\n")
    os.replace(tmp, path)


def read_running(paths: Paths, name: str) -> Running | None:
    """The record, or None when there is none (a first start)."""
    path = paths.running_record(name)
    try:
        running = Running.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise KvmagentError(f"{path}: unreadable running record: {e}",
                            "the guest's QEMU cannot be taken over; stop the guest "
                            f"(systemctl stop kvm@{name}) and start it again",
                            ExitStatus.FAILURE) from None
    if running.name != name:
        raise KvmagentError(f"{path}: the running record of guest {running.name}, not {name}",
                            None, ExitStatus.FAILURE)
    return running


def identity_problem(running: Running, cmdline: list[str], cgroup: str) -> str | None:
    """Why the process with this command line and /proc/PID/cgroup is not
    the QEMU of the running record (None: it is).  Pure."""
    if f"/{scope_unit(running.name)}" not in cgroup:
        return f"it is not in {scope_unit(running.name)}"
    args = dict(zip(cmdline, cmdline[1:]))
    if args.get("-uuid") != running.uuid:
        return f"its -uuid is {args.get('-uuid')!r}, not {running.uuid}"
    name = args.get("-name", "")
    if f"guest={running.name}" not in name.split(","):
        return f"its -name is {name!r}, not guest={running.name}"
    return None


class AdoptedQemu:
    """The running QEMU of a guest, watched through a pidfd: poll(), kill()
    and wait() as subprocess.Popen's.  Its exit status is not known to a
    supervisor that is not its parent: 0."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.returncode: int | None = None

    @classmethod
    def find(cls, running: Running) -> AdoptedQemu | None:
        """The record's QEMU, if it still runs (None: it does not, or its pid
        is another process's outside the guest's scope; a normal start
        follows).  KvmagentError when a process in the scope is not it."""
        pid = running.qemu_pid
        try:
            qemu = cls(pid)
        except ProcessLookupError:
            return None
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = [a.decode(errors="replace") for a in f.read().split(b"\0")]
            with open(f"/proc/{pid}/cgroup") as f:
                cgroup = f.read()
        except (FileNotFoundError, ProcessLookupError):
            qemu.close()
            return None
        problem = identity_problem(running, cmdline, cgroup)
        if problem is not None and f"/{scope_unit(running.name)}" not in cgroup:
            qemu.close()  # the pid is another process's now: QEMU is gone
            return None
        if problem is not None:
            qemu.close()
            raise KvmagentError(f"process {pid} is not the QEMU of guest {running.name}: "
                                f"{problem}", "nothing was taken over; see systemctl status "
                                f"{scope_unit(running.name)}", ExitStatus.FAILURE)
        return qemu

    def fileno(self) -> int:
        return self.pidfd

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self.pidfd], [], [], 0)[0]:
            self.returncode = 0
        return self.returncode

    def kill(self) -> None:
        with suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            select.select([self.pidfd], [], [], timeout)
        return self.poll() or 0

    def close(self) -> None:
        with suppress(OSError):
            os.close(self.pidfd)
