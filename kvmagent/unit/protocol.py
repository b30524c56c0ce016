"""The control channel's requests and replies (kvmagent.unit.channel carries
them) as typed records: all that crosses from the command line to a
guest's supervisor and back.

A request record names its command; call() sends it and reads the reply
into its record, the supervisor reads a request with read() and answers
with reply() or refuse().  read() (kvmagent.render.records) checks each
field against the record's annotations and names the one that is wrong.
A field with a default may be missing and a field the record does not
know is ignored: a supervisor
runs the code it started with until `kvmagent reload`, so a command line
talks to older supervisors, and to newer ones after a downgrade.
Standard library and light modules only: the supervisor imports this."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.render.records import read
from kvmagent.unit import channel


# -- requests ------------------------------------------------------------------

class StatusAsk(NamedTuple):
    """Which code the supervisor runs, since when (Status)."""


class ReloadAsk(NamedTuple):
    """The supervisor re-executes itself, the installed code taking the
    guest over (Done)."""


class FreezeAsk(NamedTuple):
    """The guest paused for a snapshot of its disks, resumed by the
    supervisor itself after SECONDS at most (Frozen)."""
    seconds: float


class ThawAsk(NamedTuple):
    """The frozen guest resumed now (Thawed)."""


class MigrateStatusAsk(NamedTuple):
    """The migration's state (MigrationStatus); ABOUT: what runs the guest
    too (its QEMU's pid and version, KVM or not), asked once before a move."""
    about: bool = False


class MigrateAsk(NamedTuple):
    """The source: the migration starts on the stream (the request's fd)
    to HOST, within DOWNTIME_MS and at BANDWIDTH bytes/s at most (None:
    QEMU's defaults); COPY_STORAGE: the disks' copies run (Started)."""
    host: str = "?"
    downtime_ms: int | None = None
    bandwidth: int | None = None
    copy_storage: bool = False


class CancelAsk(NamedTuple):
    """The source: the migration to HOST cancelled for WHY, the guest
    resumed here; a migration that completed is left paused unless RESUME
    (the destination said the guest does not run there) (Cancelled)."""
    host: str = "?"
    why: str = "cancelled"
    resume: bool = False


class EndAsk(NamedTuple):
    """The source: the guest runs on HOST, its QEMU here quits (Ended)."""
    host: str = "?"
    downtime_ms: int | None = None


class IncomingAsk(NamedTuple):
    """The destination: the stream (the request's fd) to receive the guest
    from (Done)."""


class CopyAsk(NamedTuple):
    """The source, --copy-storage: drive DISK mirrored onto the NBD
    connection (the request's fd) to HOST, at BANDWIDTH bytes/s at most;
    SYNC "full" (all of it) or "top" (a qcow2 overlay's own data) (Copying)."""
    disk: str
    host: str = "?"
    sync: str = "full"
    bandwidth: int | None = None


class ServeAsk(NamedTuple):
    """The destination, --copy-storage: QEMU's NBD server on the listening
    socket (the request's fd), each of DISKS (drive ids) exported (Done)."""
    disks: list[str]


Ask = (StatusAsk | ReloadAsk | FreezeAsk | ThawAsk | MigrateStatusAsk | MigrateAsk | CancelAsk
       | EndAsk | IncomingAsk | CopyAsk | ServeAsk)
# Each request's command (kvmagent.unit.channel.COMMANDS)
COMMAND: dict[type[Ask], str] = {
    StatusAsk: "status",
    ReloadAsk: "reload",
    FreezeAsk: "freeze",
    ThawAsk: "thaw",
    MigrateStatusAsk: "migrate-status",
    MigrateAsk: "migrate",
    CancelAsk: "migrate-cancel",
    EndAsk: "migrate-end",
    IncomingAsk: "migrate-incoming",
    CopyAsk: "migrate-copy",
    ServeAsk: "migrate-serve",
}


# -- replies -------------------------------------------------------------------

class Done(NamedTuple):
    """A reply that says nothing but yes."""


class Status(NamedTuple):
    """The supervisor's answer to "status"."""
    name: str
    version: str  # the kvmagent code this supervisor runs
    supervisor_pid: int
    supervising_since: float  # CLOCK_REALTIME: when this code took the guest over or started it
    qemu_pid: int
    qemu_since: float  # CLOCK_REALTIME: when QEMU was started
    started_by: str  # the kvmagent version that started QEMU
    takeovers: int  # supervisors before this one in QEMU's life (deaths and reloads)


class Frozen(NamedTuple):
    seconds: float  # resumed after this long at most


class Thawed(NamedTuple):
    resumed: bool = False  # False: the time limit had resumed it already


class MigrationStatus(NamedTuple):
    """A guest's migration as its supervisor sees it, source or destination."""
    phase: str = "none"  # query-migrate's status; "incoming": the destination's
    info: dict[str, Any] = {}  # query-migrate's answer, as QEMU gives it
    runstate: str | None = None  # query-status's
    machine: str = ""  # the running QEMU's versioned machine type
    cpu: str = ""  # and its -cpu
    resumed_at: float | None = None  # the destination: when the guest ran (wall clock)
    migrated_to: str | None = None  # the source: where the guest went
    jobs: list[dict[str, Any]] = []  # --copy-storage's mirror jobs (query-jobs)
    incoming: str | None = None  # the destination: "waiting", or query-migrate's status
    pid: int | None = None  # asked about: the guest's QEMU
    kvm: bool | None = None  # asked about: KVM runs it (False: TCG)
    qemu: list[int] | None = None  # asked about: QEMU's version (major, minor, micro)


class Started(NamedTuple):
    """The migration's limits as QEMU took them."""
    downtime_limit_ms: int | None = None
    max_bandwidth: int | None = None


class Cancelled(NamedTuple):
    resumed: bool = False  # the guest was paused by the migration, and resumed
    completed: bool = False  # too late: its state went, it stays paused here


class Ended(NamedTuple):
    paused_at: float | None = None  # when the guest paused for the switch (wall clock)


class Copying(NamedTuple):
    sync: str = "full"  # what the mirror copies: "full" from a supervisor before "top"


# -- reading and writing --------------------------------------------------------

# The longest a guest is paused for a snapshot (freeze's "seconds").
MAX_FREEZE = 60.0
R = TypeVar("R")


def freeze_seconds(data: object) -> float | str:
    """A freeze request's time limit, or why it is not one."""
    try:
        seconds = read(FreezeAsk, data).seconds
    except ValueError:
        seconds = 0.0
    if not 0 < seconds <= MAX_FREEZE:
        return f"freeze needs seconds, more than 0 and at most {MAX_FREEZE:g}"
    return seconds


def reply(record: tuple[Any, ...]) -> dict[str, object]:
    """The supervisor's answer: yes, and RECORD's fields (a NamedTuple)."""
    return {"ok": True, **getattr(record, "_asdict")()}


def refuse(error: str) -> dict[str, object]:
    """The supervisor's answer: no, and why."""
    return {"ok": False, "error": error}


def call(path: Path, ask: Ask, answer: type[R], timeout: float = 10.0,
         fds: Sequence[int] = ()) -> R:
    """ASK the supervisor at PATH, its reply read as ANSWER.  FDS go with
    the request (the caller still owns and closes its copies).
    KvmagentError when no supervisor answers, when it refuses, or when its
    reply is not ANSWER."""
    command = COMMAND[type(ask)]
    data = channel.ask(path, command, timeout, fds, **ask._asdict())
    try:
        return read(answer, data)
    except ValueError as e:
        raise KvmagentError(f"the supervisor at {path} answered {command} with something "
                            f"else than this kvmagent expects: {e}",
                            "kvmagent reload moves the supervisors to the installed code",
                            ExitStatus.FAILURE) from None
