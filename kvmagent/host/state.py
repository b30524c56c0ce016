"""The state database: every guest's lifecycle events, kept across reboots.

systemd knows only the current run of a unit (ActiveEnterTimestamp,
NRestarts, both reset by a manual restart and by a reboot); this record is
kvmagent's.  $KVMAGENT_STATE_DIR/state.db is SQLite (the standard library,
so the supervisor may import this module), in WAL mode with a busy timeout:
many writers at once are normal (every guest's supervisor, the
ExecStopPost= step, the CLI), each writing one short transaction.

One row per lifecycle event: starting, running, stopping, stopped; and,
within a run, taken-over (a new supervisor took the running QEMU over after
the last one died) and reloaded (the supervisor moved to the installed
code): the guest ran on, so these neither end a run nor start one, and are
never a restart.  A row
keeps the wall clock (realtime) and CLOCK_BOOTTIME with the boot ID, so
durations within one boot do not jump with the clock and runs of different
boots are told apart; and systemd's InvocationID of the run.

What is shown (uptimes, restarts, the last failure) is derived from the
rows by kvmagent.render.uptime.derive(), a pure function, which says how
restarts are counted and how a migrated guest's uptime goes on.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

# The schema, version by version (PRAGMA user_version), as this module's own.
from kvmagent.host.migrations import MIGRATIONS, migrate, restarts_sql  # noqa: F401
# The names of events and reasons, as this module's own (state.ADMIN ...).
from kvmagent.lifecycle import (  # noqa: F401
    ADMIN, CONFIG, CRASHED, EVENTS, FAILED, FAILURES, KILLED, MIGRATED, OOM, POWEROFF,
    REASONS, RELOADED, RESTARTED, SHUTDOWN, TAKEN_OVER, TIMEOUT, WATCHDOG)
from kvmagent.paths import Paths
# The rows and what is derived from them, as this module's own (state.Event ...).
from kvmagent.render.uptime import Event, Now, Summary, derive  # noqa: F401

DB_NAME = "state.db"
BUSY_TIMEOUT_MS = 5000


_COLUMNS = ", ".join(Event._fields)


# In the runtime directory: systemd's ID of this boot, written at boot by
# systemd-tmpfiles (tmpfiles.d/kvmagent.conf: `f /run/kvmagent/boot-id - - - - %b`)
# before any guest starts; /run is empty again at the next boot.
BOOT_ID_FILE = "boot-id"


def boot_id(runtime_dir: str | Path | None = None) -> str:
    """This boot of this system, as every process of kvmagent sees it alike:
    the boot ID that systemd-tmpfiles wrote into the runtime directory (in a
    container, the container's; a service under ProtectKernelTunables= would
    read the host's from /proc/sys/kernel/random/boot_id).  Without that
    file (kvmagent run from a checkout): the kernel's boot time and the start
    of PID 1, which a step of the wall clock changes (btime is derived from
    it), so a clock set during a run splits the boot in two."""
    directory = runtime_dir or Paths.from_env().runtime_dir
    try:
        with open(os.path.join(directory, BOOT_ID_FILE)) as f:
            text = f.read(100).strip()
        if text and text.isascii() and text.isalnum():
            return text
    except (OSError, ValueError):
        pass
    return kernel_boot_id()


def kernel_boot_id() -> str:
    """The kernel's boot time and the start of PID 1: how kvmagent named
    boots before the boot-id file (and still does without it)."""
    try:
        with open("/proc/stat") as f:
            btime = next(line.split()[1] for line in f if line.startswith("btime "))
        with open("/proc/1/stat") as f:
            start = f.read().rpartition(")")[2].split()[19]  # field 22: starttime
        return f"{btime}.{start}"
    except (OSError, StopIteration, IndexError):
        return "unknown"


def keep_boot_id(runtime_dir: str | None = None) -> None:
    """On an upgrade from a kvmagent without the boot-id file: write this
    boot's ID as that version computed it (kernel_boot_id), so that the
    guests running now keep their uptime; systemd-tmpfiles (which creates
    the file only where it is missing) writes systemd's ID from the next boot
    on.  The package's postinst calls this."""
    runtime_dir = runtime_dir or str(Paths.from_env().runtime_dir)
    os.makedirs(runtime_dir, mode=0o755, exist_ok=True)
    path = os.path.join(runtime_dir, BOOT_ID_FILE)
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(kernel_boot_id() + "\n")
    os.chmod(tmp, 0o644)
    try:
        os.link(tmp, path)  # never replaces one that is there
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


def now() -> Now:
    return Now(time.time(), time.clock_gettime(time.CLOCK_BOOTTIME), boot_id())


# -- the database ----------------------------------------------------------------

def db_path(state_dir: Path) -> Path:
    return Path(state_dir) / DB_NAME


def connect(state_dir: Path, *, create: bool = True, busy_timeout_ms: int = BUSY_TIMEOUT_MS,
            guest: str | None = None) -> sqlite3.Connection:
    """Open (with create: make and migrate) the database.  sqlite3.Error or
    OSError when it cannot be; FileNotFoundError when it does not exist and
    create is false.  With create (a writer), a database that cannot be
    read is moved aside and a fresh one made (kvmagent.host.statefile; GUEST
    is named in the journal message); a reader only gets the error."""
    path = db_path(state_dir)
    if not create:
        if not path.exists():
            raise FileNotFoundError(str(path))
        return _open(path, False, busy_timeout_ms)
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in (1, 2):
        # Created 0600 before SQLite opens it (the -wal and -shm files take
        # the mode of the database): the history is root's business.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        st = os.fstat(fd)
        os.close(fd)
        try:
            return _open(path, True, busy_timeout_ms)
        except sqlite3.DatabaseError as e:
            from kvmagent.host import statefile  # the rare way: not in every listing
            # Another writer moved the damaged file aside meanwhile, its
            # -wal and -shm with it (SQLite then says "disk I/O error"):
            # the fresh one is opened.
            moved = statefile.identity(path) != (st.st_dev, st.st_ino)
            if attempt == 2 or not (moved or statefile.damaged(e)):
                raise
            if not moved:
                statefile.move_aside(path, (st.st_dev, st.st_ino), e, guest)
    raise AssertionError("unreachable")


def _open(path: Path, create: bool, busy_timeout_ms: int) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), so
    # a writer takes the lock up front and waits for it with the busy timeout
    # instead of failing to upgrade a read lock.
    conn = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        if create:
            _wal(conn, time.monotonic() + busy_timeout_ms / 1000)
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at checkpoints
            migrate(conn)
        else:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise sqlite3.DatabaseError(f"{path} is of a newer kvmagent (schema version "
                                            f"{version})")
            if version < len(MIGRATIONS):
                # A database of the version before an upgrade, which no guest
                # has written to since: the reader brings it up to date.
                migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _wal(conn: sqlite3.Connection, deadline: float) -> None:
    """Put the database in WAL mode.  Changing the journal mode does not
    wait for the busy timeout: while other processes have the new, empty
    file open (every guest of a host starting at its first boot), it fails
    at once with "database is locked", so it is tried again until DEADLINE."""
    while conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        try:
            conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def insert(conn: sqlite3.Connection, guest: str, event: str, *, reason: str | None = None,
           detail: str | None = None, pid: int | None = None, source: str = "supervisor",
           invocation: str | None = None, at: Now | None = None,
           booted: float | None = None) -> int:
    if event not in EVENTS:
        raise ValueError(f"unknown event {event!r}")
    if reason is not None and reason not in REASONS:
        raise ValueError(f"unknown reason {reason!r}")
    at = at or now()
    with _transaction(conn):
        restart = 0
        if event == "starting" and reason != MIGRATED:  # an arrival is no restart
            prev = conn.execute("SELECT event, reason, boot_id FROM events WHERE guest = ? AND "
                                "event IN ('starting', 'stopped') ORDER BY id DESC LIMIT 1",
                                (guest,)).fetchone()
            restart = int(prev is not None and prev[0] == "stopped" and prev[1] in RESTARTED
                          and prev[2] == at.boot_id)
        cur = conn.execute(
            "INSERT INTO events (guest, event, reason, detail, realtime, boottime, boot_id, "
            "invocation, pid, source, restart, booted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (guest, event, reason, detail, at.realtime, at.boottime, at.boot_id, invocation,
             pid, source, restart, booted))
    return int(cur.lastrowid or 0)


class _transaction:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


def events(conn: sqlite3.Connection, guests: Iterable[str] | None = None,
           since: float | None = None) -> list[Event]:
    """Events of the given guests (or all), oldest first."""
    where: list[str] = []
    args: list[object] = []
    if guests is not None:
        names = list(guests)
        where.append(f"guest IN ({', '.join('?' * len(names))})")
        args += names
    if since is not None:
        where.append("realtime >= ?")
        args.append(since)
    sql = f"SELECT {_COLUMNS} FROM events"
    if where:
        sql += " WHERE " + " AND ".join(where)
    return [Event(*row) for row in conn.execute(sql + " ORDER BY id", args)]


def reset_marks(conn: sqlite3.Connection) -> dict[str, int]:
    """guest -> the last event id before its counters were reset."""
    return dict(conn.execute("SELECT guest, reset_after FROM counters"))


def reset_counters(conn: sqlite3.Connection, guest: str) -> None:
    with _transaction(conn):
        last = conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
        conn.execute("INSERT OR REPLACE INTO counters (guest, reset_after, reset_realtime) "
                     "VALUES (?, ?, ?)", (guest, last, time.time()))


def stopped_in(conn: sqlite3.Connection, invocation: str) -> Event | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM events WHERE invocation = ? AND "
                       "event = 'stopped' ORDER BY id DESC LIMIT 1", (invocation,)).fetchone()
    return Event(*row) if row else None


def mark_shutdown(conn: sqlite3.Connection, invocation: str) -> int:
    """The stop of this run was the host's shutdown, not an admin's."""
    with _transaction(conn):
        return conn.execute("UPDATE events SET reason = ? WHERE invocation = ? AND reason = ?",
                            (SHUTDOWN, invocation, ADMIN)).rowcount


# -- the supervisor's recorder ------------------------------------------------------

class Recorder:
    """Writes one guest's events; a database error is logged, never raised:
    the record must not stop a guest from running."""

    def __init__(self, guest: str, state_dir: Path, log: Callable[[str], None],
                 source: str = "supervisor") -> None:
        self.guest = guest
        self.state_dir = state_dir
        self.log = log
        self.source = source
        self.invocation = os.environ.get("INVOCATION_ID") or None
        self.failed = False

    def __call__(self, event: str, reason: str | None = None, detail: str | None = None,
                 pid: int | None = None, at: Now | None = None,
                 booted: float | None = None) -> bool:
        try:
            for attempt in (1, 2):
                # Which file it is before it is opened: if it is damaged
                # beyond what opening it reads (kvmagent.host.statefile), this
                # one is moved aside, never one another writer made since.
                path = db_path(self.state_dir)
                try:
                    st = os.stat(path)
                    found: tuple[int, int] | None = (st.st_dev, st.st_ino)
                except FileNotFoundError:
                    found = None
                # A connection per event: nothing held open for hundreds of
                # days, and a short busy timeout, so that a stuck writer
                # cannot hold up a guest's stop.
                conn = connect(self.state_dir, busy_timeout_ms=2000, guest=self.guest)
                try:
                    insert(conn, self.guest, event, reason=reason, detail=detail, pid=pid,
                           source=self.source, invocation=self.invocation, at=at,
                           booted=booted)
                    break
                except sqlite3.DatabaseError as e:
                    from kvmagent.host import statefile
                    moved = found is not None and statefile.identity(path) != found
                    if attempt == 2 or not (moved or statefile.damaged(e)):
                        raise
                    conn.close()
                    if not moved:  # else another writer did, as connect() says
                        statefile.move_aside(path, found, e, self.guest)
                finally:
                    conn.close()
        except (sqlite3.Error, OSError, ValueError) as e:
            if not self.failed:  # once per run is enough
                self.log(f"cannot record event {event} of guest {self.guest} in "
                         f"{db_path(self.state_dir)}: {e}")
            self.failed = True
            return False
        return True


class Figures(NamedTuple):
    restarts: int
    running_since: Event | None  # as Summary.running_since


# The last starting/running/stopped of each guest named in a JSON array (the
# parameter): one search of events_lifecycle per guest, so a listing costs
# the same after years of events (a scan of that index grew with every run:
# 1.3 ms at 10 runs per guest, 8.5 ms at 100, for 200 guests).
LAST_LIFECYCLE_SQL = f"""WITH listed(guest) AS (SELECT value FROM json_each(?))
    SELECT {_COLUMNS} FROM events WHERE id IN (
        SELECT (SELECT MAX(id) FROM events e WHERE e.guest = listed.guest
                AND e.event IN ('starting', 'running', 'stopped')) FROM listed)"""


def list_figures(conn: sqlite3.Connection, at: Now, guests: Iterable[str]) -> dict[str, Figures]:
    """What `kvmagent list` shows of each of these guests that has a record,
    computed by SQLite: the same restarts and open run as derive() gives (a
    unit test holds them equal), without reading years of rows into Python:
    restarts were marked when recorded (restart = 1)."""
    import json  # here: the event writers import this module too, and need no json
    listed = json.dumps(list(guests))
    restarts = dict(conn.execute("""
        SELECT e.guest, COUNT(*) FROM events e LEFT JOIN counters c ON c.guest = e.guest
        WHERE e.restart = 1 AND e.id > COALESCE(c.reset_after, 0)
            AND e.guest IN (SELECT value FROM json_each(?))
        GROUP BY e.guest""", (listed,)))
    # The run is open when the guest's last starting/running/stopped is a
    # `running` of this boot (a `stopping` does not end it).
    last = {row[1]: Event(*row) for row in conn.execute(LAST_LIFECYCLE_SQL, (listed,))}
    out = {}
    for guest in set(restarts) | set(last):
        ev = last.get(guest)
        open_run = ev if ev is not None and ev.event == "running" and \
            ev.boot_id == at.boot_id else None
        out[guest] = Figures(restarts.get(guest, 0), open_run)
    return out


def summaries(conn: sqlite3.Connection, guests: Iterable[str], at: Now) -> dict[str, Summary]:
    """Summary of each named guest, from its rows only (events_by_guest):
    `kvmagent status NAME` does not read the other guests' years."""
    names = list(guests)
    by_guest: dict[str, list[Event]] = {n: [] for n in names}
    for ev in events(conn, names):
        by_guest[ev.guest].append(ev)
    marks = dict(((g, (a, r)) for g, a, r in conn.execute(
        "SELECT guest, reset_after, reset_realtime FROM counters")))
    out = {}
    for name in names:
        after, when = marks.get(name, (0, None))
        out[name] = derive(name, by_guest[name], at, after, when)
    return out
