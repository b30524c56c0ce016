"""A damaged state database (kvmagent.host.statefile): moved aside by the
writer that meets it, kept with its -wal and -shm, said in the journal with
its MESSAGE_ID, and a fresh one started; once, whoever meets it at the same
time.  Real SQLite files in tmp_path; the journal is a socket of the test's
own, read back as journald would get the message."""

from __future__ import annotations

import multiprocessing
import os
import socket
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmagent.host import state, statefile

GARBAGE = bytes(range(256)) * 64  # not SQLite's header: "file is not a database"


@pytest.fixture
def journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """The messages statefile sends to journald, sent here instead."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "journal.sock"
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setattr(statefile, "journal_socket", str(path))
    yield sock
    sock.close()


def messages(sock: socket.socket) -> list[dict[str, str]]:
    out = []
    while True:
        try:
            data = sock.recv(65536).decode()
        except BlockingIOError:
            return out
        out.append(dict(line.split("=", 1) for line in data.splitlines() if "=" in line))


def asides(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".damaged-" in p.name)


def sqlite_error(name: str) -> sqlite3.Error:
    """A real error of SQLite's, with its name."""
    conn = sqlite3.connect(":memory:")
    try:
        if name == "SQLITE_CONSTRAINT_CHECK":
            conn.execute("CREATE TABLE t (a CHECK (a > 0))")
            conn.execute("INSERT INTO t VALUES (0)")
        conn.execute("no such statement")
    except sqlite3.Error as e:
        return e
    raise AssertionError("no error")


def test_which_errors_mean_a_damaged_file() -> None:
    notadb = sqlite3.DatabaseError("file is not a database")
    notadb.sqlite_errorname = "SQLITE_NOTADB"  # type: ignore[attr-defined]
    corrupt = sqlite3.DatabaseError("database disk image is malformed")
    corrupt.sqlite_errorname = "SQLITE_CORRUPT"  # type: ignore[attr-defined]
    index = sqlite3.DatabaseError("malformed")
    index.sqlite_errorname = "SQLITE_CORRUPT_INDEX"  # type: ignore[attr-defined]
    locked = sqlite3.OperationalError("database is locked")
    locked.sqlite_errorname = "SQLITE_BUSY"  # type: ignore[attr-defined]
    assert statefile.damaged(notadb) and statefile.damaged(corrupt) and statefile.damaged(index)
    assert not statefile.damaged(locked)
    assert not statefile.damaged(sqlite_error("SQLITE_CONSTRAINT_CHECK"))
    assert not statefile.damaged(sqlite_error("SQLITE_ERROR"))
    # kvmagent's own word for a database of a newer kvmagent: never moved
    assert not statefile.damaged(sqlite3.DatabaseError("is of a newer kvmagent"))
    assert not statefile.damaged(OSError("disk full"))


def test_the_name_aside_is_dated_and_never_taken() -> None:
    path = Path("/var/lib/kvmagent/state.db")
    when = time.mktime((2026, 3, 4, 5, 6, 7, 0, 0, -1))
    taken: set[str] = set()
    first = statefile.aside_name(path, when, lambda p: str(p) in taken)
    assert first == Path("/var/lib/kvmagent/state.db.damaged-20260304T050607")
    taken.add(f"{first}-wal")  # a -wal left of that name is enough to skip it
    second = statefile.aside_name(path, when, lambda p: str(p) in taken)
    assert second.name == "state.db.damaged-20260304T050607-2"
    taken |= {str(second)}
    assert statefile.aside_name(path, when, lambda p: str(p) in taken).name.endswith("-3")


def test_a_garbage_database_is_moved_aside_and_a_fresh_one_records(
        tmp_path: Path, journal: socket.socket) -> None:
    conn = state.connect(tmp_path)
    state.insert(conn, "g", "starting")
    conn.close()
    db = tmp_path / "state.db"
    db.write_bytes(GARBAGE)  # the same file, overwritten
    logged: list[str] = []
    rec = state.Recorder("g", tmp_path, logged.append)
    assert rec("stopped", state.ADMIN) is True and rec("starting") is True
    assert logged == []  # said in the journal, with its own MESSAGE_ID (below)
    (aside,) = [n for n in asides(tmp_path) if not n.endswith(("-wal", "-shm"))]
    assert (tmp_path / aside).read_bytes() == GARBAGE  # kept as it was
    rows = state.events(state.connect(tmp_path))
    assert [(r.event, r.reason) for r in rows] == [("stopped", state.ADMIN), ("starting", None)]
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    (msg,) = messages(journal)
    assert msg["MESSAGE_ID"] == statefile.MSG_DAMAGED and msg["PRIORITY"] == "3"
    assert msg["STATE_DB"] == str(db) and msg["DAMAGED_DB"] == str(tmp_path / aside)
    assert msg["GUEST"] == "g" and msg["SYSLOG_IDENTIFIER"] == "kvmagent"
    assert "file is not a database" in msg["MESSAGE"] and aside in msg["MESSAGE"]


def test_a_malformed_database_met_at_an_insert_is_moved_aside(
        tmp_path: Path, journal: socket.socket) -> None:
    """Damage past the first page: opening works, the insert meets
    "database disk image is malformed"; the recorder moves it and writes
    again."""
    conn = state.connect(tmp_path)
    for i in range(400):
        state.insert(conn, "g", "starting" if i % 2 else "stopped", detail="x" * 200,
                     reason=None if i % 2 else state.CRASHED)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    db = tmp_path / "state.db"
    data = bytearray(db.read_bytes())
    data[page:] = GARBAGE * (len(data[page:]) // len(GARBAGE) + 1)
    db.write_bytes(bytes(data[:len(db.read_bytes())]))
    check = state.connect(tmp_path)  # the first page is whole: it opens
    with pytest.raises(sqlite3.DatabaseError) as e:
        state.insert(check, "g", "starting")
    check.close()
    assert statefile.damaged(e.value), e.value
    assert state.Recorder("g", tmp_path, print)("running", pid=5) is True
    assert [r.event for r in state.events(state.connect(tmp_path))] == ["running"]
    assert len([n for n in asides(tmp_path) if n.endswith(tuple("0123456789"))]) == 1
    (msg,) = messages(journal)
    assert "malformed" in msg["MESSAGE"]


def test_a_reader_moves_nothing(tmp_path: Path) -> None:
    (tmp_path / "state.db").write_bytes(GARBAGE)
    with pytest.raises(sqlite3.DatabaseError):
        state.connect(tmp_path, create=False).execute("SELECT * FROM events")
    assert (tmp_path / "state.db").read_bytes() == GARBAGE and asides(tmp_path) == []


def test_a_file_that_is_no_longer_the_damaged_one_is_left_alone(tmp_path: Path,
                                                                 journal: socket.socket) -> None:
    """What a writer that lost the race finds: another writer moved the
    damaged file and made a fresh one: it is not moved."""
    db = tmp_path / "state.db"
    db.write_bytes(GARBAGE)
    (tmp_path / "state.db-wal").write_bytes(b"old log")
    (tmp_path / "state.db-shm").write_bytes(b"old shm")
    found = statefile.identity(db)
    error = sqlite3.DatabaseError("file is not a database")
    first = statefile.move_aside(db, found, error)
    assert first is not None and first.read_bytes() == GARBAGE
    # its write-ahead log goes with it: never replayed into a fresh database
    assert Path(f"{first}-wal").read_bytes() == b"old log"
    assert Path(f"{first}-shm").read_bytes() == b"old shm"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("state.db")) == \
        sorted([first.name, f"{first.name}-wal", f"{first.name}-shm"])
    state.connect(tmp_path).close()  # the fresh one
    assert statefile.move_aside(db, found, error) is None
    assert db.exists() and asides(tmp_path) == sorted([first.name, f"{first.name}-wal",
                                                       f"{first.name}-shm"])
    assert len(messages(journal)) == 1


def _racer(state_dir: str, guest: str, barrier: Any, results: Any) -> None:
    rec = state.Recorder(guest, Path(state_dir), lambda text: results.put(text))
    barrier.wait()
    results.put(rec("starting"))


def test_writers_meeting_the_damage_at_once_move_it_once_and_lose_nothing(
        tmp_path: Path, journal: socket.socket) -> None:
    """Every guest's recorder at once: one moves the file, none moves the
    fresh database another made, every event is in it."""
    ctx = multiprocessing.get_context("fork")
    for round_ in range(5):
        d = tmp_path / str(round_)
        d.mkdir()
        (d / "state.db").write_bytes(GARBAGE)
        writers = 12
        barrier, results = ctx.Barrier(writers), ctx.Queue()
        procs = [ctx.Process(target=_racer, args=(str(d), f"g{n}", barrier, results))
                 for n in range(writers)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        assert outcomes == [True] * writers, f"round {round_}: {outcomes}"
        (aside,) = [n for n in asides(d) if not n.endswith(("-wal", "-shm"))]
        assert (d / aside).read_bytes() == GARBAGE
        conn = state.connect(d)
        assert sorted(r.guest for r in state.events(conn)) == sorted(f"g{n}"
                                                                     for n in range(writers))
        conn.close()
        assert len(messages(journal)) == 1
    assert os.path.exists(tmp_path / "0" / statefile.LOCK_NAME)
