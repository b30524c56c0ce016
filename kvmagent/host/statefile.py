"""The state database's file (kvmagent.host.state): a damaged one is moved
aside, kept, and a fresh one started.

A state.db that SQLite cannot read -- overwritten, truncated, a bad block:
"file is not a database" (SQLITE_NOTADB), "database disk image is
malformed" (SQLITE_CORRUPT) -- would fail every later event for as long as
it stays, and the uptime record would be gone without a word.  A writer
that meets such an error moves the file aside instead: renamed to
state.db.damaged-YYYYmmddTHHMMSS (local time) with its -wal and -shm, never
deleted (what it still holds may be read back with sqlite3's .recover), says
so in the journal with MSG_DAMAGED, and writes to a fresh database.

Writers meet the damage at once (every guest's supervisor, stop-post): only
one may move the file, and none may move the fresh one that another made
meanwhile.  The move is done under an exclusive flock(2) of state.lock
beside it, and only if state.db is still the very file (device and inode)
that the writer found damaged; the others find another file there and
simply open it again.  A reader (`kvmagent list`, `history`) never moves
anything: it says that the record cannot be read."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

# journalctl MESSAGE_ID=... finds the message; catalog/kvmagent.catalog
# explains it (a unit test keeps the two in step).
MSG_DAMAGED = "4c2e3a0c6d0b4f0e9b7e3f2a1d5c6b0d"
LOCK_NAME = "state.lock"
# journald's socket (sdnotify's) when None; a test's own socket otherwise.
journal_socket: str | None = None
# The files of a database in WAL mode besides the database itself.
COMPANIONS = ("-wal", "-shm")

Identity = tuple[int, int]  # st_dev, st_ino


def damaged(error: BaseException) -> bool:
    """Is this SQLite's error for a file that is no (longer a) readable
    database?  Not "locked", "busy", "readonly", "disk I/O error" or a
    schema of a newer kvmagent: those are no reason to move a file.  Pure."""
    name = getattr(error, "sqlite_errorname", None) or ""
    return name in ("SQLITE_NOTADB", "SQLITE_CORRUPT") or name.startswith("SQLITE_CORRUPT_")


def identity(path: Path) -> Identity | None:
    """Which file PATH is now (None: there is none)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _fresh(path: Path) -> bool:
    """Is PATH an empty file?  SQLite takes one for an empty database: what
    a writer took for damage there was a fresh file that another writer was
    making at that moment, never to be moved."""
    try:
        return os.stat(path).st_size == 0
    except FileNotFoundError:
        return False


def aside_name(path: Path, when: float, exists: Callable[[Path], bool]) -> Path:
    """state.db.damaged-YYYYmmddTHHMMSS beside PATH, or with -2, -3 ...
    when one of that second is there already (with or without its -wal or
    -shm).  Pure but for EXISTS."""
    stem = f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S', time.localtime(when))}"
    n = 1
    while True:
        target = path.with_name(stem if n == 1 else f"{stem}-{n}")
        if not any(exists(target.with_name(target.name + s)) for s in ("", *COMPANIONS)):
            return target
        n += 1


def move_aside(path: Path, found: Identity | None, error: BaseException,
               guest: str | None = None) -> Path | None:
    """Move the damaged database PATH (the file FOUND, when the writer met
    ERROR) and its -wal and -shm aside, and say so in the journal; the
    name it got.  None when another writer did it first (PATH is another
    file now, or none).  OSError when it cannot be moved."""
    lock = os.open(path.with_name(LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if found is None or identity(path) != found or _fresh(path):
            return None
        target = aside_name(path, time.time(), os.path.lexists)
        # The -wal first: a fresh state.db must never meet the old one's
        # write-ahead log (SQLite would replay it into the new file).
        for suffix in COMPANIONS:
            with suppress(FileNotFoundError):
                os.rename(f"{path}{suffix}", f"{target}{suffix}")
        os.rename(path, target)
    finally:
        os.close(lock)  # and with it the lock
    announce(path, target, error, guest)
    return target


def announce(path: Path, target: Path, error: BaseException, guest: str | None) -> None:
    """The journal message (journald's own socket; stderr without it)."""
    from kvmagent.host.sdnotify import JOURNAL_SOCKET, Journal
    fields = {"MESSAGE_ID": MSG_DAMAGED, "SYSLOG_IDENTIFIER": "kvmagent",
              "STATE_DB": str(path), "DAMAGED_DB": str(target)}
    if guest:
        fields["GUEST"] = guest
    text = (f"the state database {path} cannot be read ({error}): moved aside to {target}, "
            "kept; a fresh one records the events from now on")
    Journal(journal_socket or JOURNAL_SOCKET).send(text, 3, **fields)
