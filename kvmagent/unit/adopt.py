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
this guest's QEMU: in kvm-NAME.scope, with the guest's -name and -uuid,
running as the user it was started as.  And only one supervisor runs per
guest: each holds a lock in the runtime directory (lock())."""

from __future__ import annotations

import fcntl
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


# Set by a reloading supervisor for the code it executes: the fd of its lock.
LOCK_ENV = "KVMAGENT_SUPERVISOR_LOCK_FD"
LOCK_FD_MIN = 64


def lock(paths: Paths, name: str) -> int:
    """Lock guest NAME's supervisor lock for this process (a POSIX record
    lock: released by the kernel when the process dies, not inherited by
    its forked helpers, kept across execve, so a reload keeps it: the fd
    is passed on in LOCK_ENV).  KvmagentError naming the other supervisor
    when one holds it."""
    inherited = os.environ.pop(LOCK_ENV, None)
    if inherited is not None and inherited.isdigit():
        fd = int(inherited)
        with suppress(OSError):
            if os.fstat(fd).st_ino == os.stat(paths.supervisor_lock(name)).st_ino:
                os.set_inheritable(fd, False)
                return fd
    path = paths.supervisor_lock(name)
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    low = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    # Above the fds a reload places at 3, 4, … (SD_LISTEN_FDS_START): closing
    # any fd of the file would release the lock.
    fd = fcntl.fcntl(low, fcntl.F_DUPFD_CLOEXEC, LOCK_FD_MIN)
    os.close(low)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        other = ""
        with suppress(OSError, ValueError):
            other = f" (pid {paths.supervisor_pid(name).read_text().split()[0]})"
        os.close(fd)
        raise KvmagentError(f"guest {name} already has a supervisor{other}",
                            f"it runs as kvm@{name}.service or kvm-oneoff@{name}.service "
                            "(systemctl status); a guest has one supervisor", ExitStatus.FAILURE
                            ) from None
    return fd


def pass_lock(fd: int, environ: dict[str, str]) -> None:
    """For a reload: the lock's fd stays open across execve (LOCK_ENV)."""
    os.set_inheritable(fd, True)
    environ[LOCK_ENV] = str(fd)


def identity_problem(running: Running, cmdline: list[str], cgroup: str,
                     uid: int | None = None) -> str | None:
    """Why the process with this command line, /proc/PID/cgroup and real
    UID is not the QEMU of the running record (None: it is).  Pure."""
    if f"/{scope_unit(running.name)}" not in cgroup:
        return f"it is not in {scope_unit(running.name)}"
    args = dict(zip(cmdline, cmdline[1:]))
    if args.get("-uuid") != running.uuid:
        return f"its -uuid is {args.get('-uuid')!r}, not {running.uuid}"
    name = args.get("-name", "")
    if f"guest={running.name}" not in name.split(","):
        return f"its -name is {name!r}, not guest={running.name}"
    if running.qemu_uid >= 0 and uid is not None and uid != running.qemu_uid:
        return f"it runs as uid {uid}, not {running.qemu_uid}"
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
            with open(f"/proc/{pid}/status") as f:  # not /proc/PID's owner: root
                uid = next(int(line.split()[1]) for line in f  # when not dumpable
                           if line.startswith("Uid:"))
        except (FileNotFoundError, ProcessLookupError):
            qemu.close()
            return None
        problem = identity_problem(running, cmdline, cgroup, uid)
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
