"""The state database (kvmagent.host.state): schema and migrations on real files
in tmp_path, the derivation of uptimes and restarts from event rows, and
many processes writing at once."""

from __future__ import annotations

import multiprocessing
import re
import sqlite3
import stat
from typing import Any
from pathlib import Path

import pytest

from kvmagent.host import state
from kvmagent.render import uptime
from kvmagent.render.uptime import Event, Now, derive

BOOT1, BOOT2 = "boot-1", "boot-2"


def ev(i: int, event: str, t: float, reason: str | None = None, boot: str = BOOT1,
       mono: float | None = None, pid: int | None = None) -> Event:
    return Event(i, "g", event, reason, None, 1_700_000_000 + t,
                 t if mono is None else mono, boot, f"inv{i}", pid, "test")


def run(start: int, t0: float, t1: float, reason: str, boot: str = BOOT1) -> list[Event]:
    """starting, running, stopped: ids start..start+2, up from t0+1 to t1."""
    return [ev(start, "starting", t0, boot=boot), ev(start + 1, "running", t0 + 1, boot=boot),
            ev(start + 2, "stopped", t1, reason, boot=boot)]


def at(t: float, boot: str = BOOT1) -> Now:
    return Now(1_700_000_000 + t, t, boot)


# -- the database ---------------------------------------------------------------------

def test_schema_created_in_wal_mode_with_mode_0600(tmp_path: Path) -> None:
    conn = state.connect(tmp_path / "st")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(state.MIGRATIONS)
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == state.BUSY_TIMEOUT_MS
    state.insert(conn, "g", "starting", source="test")
    conn.close()
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        path = tmp_path / "st" / name
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, name


def test_migrations_run_once_and_in_order(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    v1 = ("CREATE TABLE t (a INTEGER)",)
    assert state.migrate(conn, v1) == 1
    conn.execute("INSERT INTO t VALUES (1)")
    v2 = v1 + ("ALTER TABLE t ADD COLUMN b TEXT DEFAULT 'x'; CREATE INDEX tb ON t (b)",)
    assert state.migrate(conn, v2) == 2
    assert state.migrate(conn, v2) == 2  # nothing left to do
    assert conn.execute("SELECT a, b FROM t").fetchall() == [(1, "x")]
    with pytest.raises(sqlite3.DatabaseError, match="schema version 2"):
        state.migrate(conn, v1)  # a database of a newer kvmagent is left alone


def test_a_failed_migration_changes_nothing(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    with pytest.raises(sqlite3.OperationalError):
        state.migrate(conn, ("CREATE TABLE t (a INTEGER); CREATE TABLE t (b INTEGER)",))
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
    assert conn.execute("SELECT name FROM sqlite_master").fetchall() == []


def test_open_without_create_does_not_make_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        state.connect(tmp_path, create=False)
    assert not (tmp_path / "state.db").exists()


def test_bad_event_or_reason_is_refused(tmp_path: Path) -> None:
    conn = state.connect(tmp_path)
    with pytest.raises(ValueError):
        state.insert(conn, "g", "exploded")
    with pytest.raises(ValueError):
        state.insert(conn, "g", "stopped", reason="bored")
    assert state.events(conn) == []


def test_reset_counters_and_summaries(tmp_path: Path) -> None:
    conn = state.connect(tmp_path)
    for event, reason in [("starting", None), ("running", None), ("stopped", state.CRASHED),
                          ("starting", None), ("running", None)]:
        state.insert(conn, "g", event, reason=reason)
    state.insert(conn, "other", "starting")
    s = state.summaries(conn, ["g", "other", "new"], state.now())
    assert s["g"].restarts == 1 and s["g"].running_since is not None
    assert s["other"].restarts == 0 and s["new"].runs == 0
    state.reset_counters(conn, "g")
    s = state.summaries(conn, ["g"], state.now())["g"]
    assert s.restarts == 0 and s.counted_since is not None
    assert s.last_failure is not None and s.last_failure.reason == state.CRASHED


def test_stopped_in_and_mark_shutdown(tmp_path: Path) -> None:
    conn = state.connect(tmp_path)
    state.insert(conn, "g", "stopping", reason=state.ADMIN, invocation="abc")
    assert state.stopped_in(conn, "abc") is None
    state.insert(conn, "g", "stopped", reason=state.ADMIN, invocation="abc")
    state.insert(conn, "g", "stopped", reason=state.ADMIN, invocation="other")
    assert state.stopped_in(conn, "abc").reason == state.ADMIN
    assert state.mark_shutdown(conn, "abc") == 2
    assert [e.reason for e in state.events(conn)] == [state.SHUTDOWN, state.SHUTDOWN,
                                                      state.ADMIN]


def test_recorder_never_raises(tmp_path: Path) -> None:
    logged: list[str] = []
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rec = state.Recorder("g", blocker, logged.append)
    assert rec("starting") is False and rec("running") is False
    assert len(logged) == 1 and "cannot record event starting" in logged[0]
    good = state.Recorder("g", tmp_path / "st", logged.append)
    assert good("running", pid=42) is True
    (row,) = state.events(state.connect(tmp_path / "st"))
    assert row.pid == 42 and row.boot_id == state.boot_id() and row.source == "supervisor"


def _writer(state_dir: str, guest: str, count: int) -> None:
    rec = state.Recorder(guest, Path(state_dir), lambda text: print(text))
    for i in range(count):
        assert rec("starting" if i % 2 == 0 else "stopped",
                   None if i % 2 == 0 else state.CRASHED, detail=f"{guest}-{i}")


def test_ten_processes_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    per = 40
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), f"g{n}", per)) for n in range(10)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    conn = state.connect(tmp_path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = state.events(conn)
    assert len(rows) == 10 * per
    for n in range(10):
        mine = [r.detail for r in rows if r.guest == f"g{n}"]
        assert mine == [f"g{n}-{i}" for i in range(per)]  # all there, in order
    assert len({r.id for r in rows}) == len(rows)


# -- derivation -------------------------------------------------------------------------

def test_no_events() -> None:
    s = derive("g", [], at(100))
    assert (s.uptime, s.cumulative, s.longest, s.runs, s.restarts) == (None, 0, 0, 0, 0)
    assert s.last_failure is None and s.running_since is None


def test_running_now_counts_to_now() -> None:
    rows = [ev(1, "starting", 10), ev(2, "running", 12, pid=99)]
    s = derive("g", rows, at(112))
    assert s.uptime == 100 and s.cumulative == 100 and s.longest == 100 and s.runs == 1
    assert s.running_since is not None and s.running_since.pid == 99


def test_cumulative_and_longest_over_runs_and_reboots() -> None:
    rows = (run(1, 0, 101, state.ADMIN) + run(4, 200, 251, state.SHUTDOWN)
            + [ev(7, "starting", 300, boot=BOOT2), ev(8, "running", 301, boot=BOOT2)])
    s = derive("g", rows, at(331, BOOT2))
    assert s.uptime == 30 and s.longest == 100 and s.cumulative == 100 + 50 + 30
    assert s.runs == 3 and s.restarts == 0 and s.last_failure is None


def test_durations_within_a_boot_follow_the_monotonic_clock() -> None:
    # the wall clock jumped back an hour during the run; CLOCK_BOOTTIME did not
    rows = [ev(1, "starting", 0, mono=0), ev(2, "running", 10, mono=10),
            ev(3, "stopped", 10 + 60 - 3600, state.ADMIN, mono=70)]
    assert derive("g", rows, at(5000)).cumulative == 60


def test_restarts_count_starts_after_failures_in_the_same_boot() -> None:
    rows = (run(1, 0, 10, state.CRASHED) + run(4, 12, 20, state.WATCHDOG)
            + run(7, 22, 30, state.KILLED) + run(10, 32, 40, state.ADMIN)
            + run(13, 50, 60, state.POWEROFF) + run(16, 70, 80, state.CONFIG)
            + run(19, 90, 95, state.CRASHED)
            + [ev(22, "starting", 500, boot=BOOT2)])  # after a reboot: not a restart
    s = derive("g", rows, at(600, BOOT2))
    assert s.restarts == 3
    assert s.last_failure is not None and s.last_failure.id == 21


def test_restarts_after_a_reset_only() -> None:
    rows = run(1, 0, 10, state.CRASHED) + run(4, 12, 20, state.CRASHED) + run(7, 22, 30,
                                                                             state.ADMIN)
    assert derive("g", rows, at(40)).restarts == 2
    assert derive("g", rows, at(40), reset_after=4).restarts == 1
    assert derive("g", rows, at(40), reset_after=9).restarts == 0


def test_run_cut_by_a_host_crash_ends_at_its_last_event() -> None:
    # no stop recorded (power cut): the run is not counted up to the next boot
    rows = [ev(1, "starting", 0), ev(2, "running", 1), ev(3, "stopping", 41, state.ADMIN),
            ev(4, "starting", 1000, boot=BOOT2), ev(5, "running", 1001, boot=BOOT2)]
    s = derive("g", rows, at(1011, BOOT2))
    assert s.cumulative == 40 + 10 and s.uptime == 10 and s.runs == 2


def test_open_run_of_an_earlier_boot_is_not_running_now() -> None:
    rows = [ev(1, "starting", 0), ev(2, "running", 1)]
    s = derive("g", rows, at(5000, BOOT2))
    assert s.uptime is None and s.running_since is None and s.cumulative == 0


def test_start_that_failed_has_no_uptime() -> None:
    rows = [ev(1, "starting", 0), ev(2, "stopped", 1, state.CONFIG)]
    s = derive("g", rows, at(10))
    assert s.runs == 0 and s.cumulative == 0 and s.last_failure is not None


def test_takeovers_and_reloads_are_neither_a_stop_nor_a_start() -> None:
    """A supervisor killed (taken-over) or reloaded: the same QEMU runs on,
    so the run goes on, one run, no restart, its uptime unbroken."""
    rows = [ev(1, "starting", 0), ev(2, "running", 1, pid=99),
            ev(3, state.TAKEN_OVER, 50, pid=99), ev(4, state.TAKEN_OVER, 60, pid=99),
            ev(5, state.RELOADED, 70, pid=99), ev(6, state.RELOADED, 80, pid=99)]
    s = derive("g", rows, at(101))
    assert s.uptime == 100 and s.cumulative == 100 and s.runs == 1 and s.restarts == 0
    assert s.running_since is not None and s.running_since.id == 2
    assert s.last_event is not None and s.last_event.event == state.RELOADED
    # the same run, ended by an admin, then a start: still no restart, one run
    rows += [ev(7, "stopping", 200, state.ADMIN), ev(8, "stopped", 201, state.ADMIN)]
    rows += [ev(9, "starting", 300), ev(10, "running", 301)]
    s = derive("g", rows, at(311))
    assert s.cumulative == 200 + 10 and s.longest == 200 and s.runs == 2 and s.restarts == 0
    # a run left open by a host crash lasted at least until its last takeover
    crash = rows[:4] + [ev(11, "starting", 1000, boot=BOOT2)]
    assert derive("g", crash, at(1001, BOOT2)).cumulative == 59


def test_a_takeover_after_a_crash_is_not_a_restart_either() -> None:
    """Between a failure and the next start, nothing but a start counts."""
    rows = run(1, 0, 10, state.CRASHED) + [ev(4, "starting", 12), ev(5, "running", 13),
                                           ev(6, state.TAKEN_OVER, 20)]
    assert derive("g", rows, at(30)).restarts == 1



def test_list_figures_agree_with_derive(tmp_path: Path) -> None:
    """The SQL of `kvmagent list` and the pure derivation give the same
    restarts and open run, on random histories over two boots."""
    import random
    rnd = random.Random(7)
    conn = state.connect(tmp_path)
    t = 0.0
    for guest in (f"g{i}" for i in range(30)):
        for _ in range(rnd.randrange(0, 25)):
            t += 1
            event = rnd.choice(state.EVENTS)
            reason = rnd.choice(state.REASONS) if event in ("stopping", "stopped") else None
            boot = rnd.choice((BOOT1, BOOT1, BOOT2))
            state.insert(conn, guest, event, reason=reason, pid=7,
                         at=Now(1_700_000_000 + t, t, boot))
        if rnd.random() < 0.3:
            state.reset_counters(conn, guest)
    names = [f"g{i}" for i in range(30)]
    # every guest; some of them and names without a record (odd ones too); none
    for listed in (names, names[::3] + ["never", "o'q\"\u00fc", "", "%", "[1]"], []):
        for now in (Now(1_800_000_000, t + 10, BOOT1), Now(1_800_000_000, t + 10, BOOT2)):
            figures = state.list_figures(conn, now, listed)
            assert set(figures) <= set(listed)
            for name, s in state.summaries(conn, listed, now).items():
                f = figures.get(name, state.Figures(0, None))
                assert f.restarts == s.restarts, name
                assert f.running_since == s.running_since, name


def test_version_1_database_is_migrated_and_its_restarts_marked(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    state.migrate(conn, state.MIGRATIONS[:1])
    for i, (event, reason) in enumerate([("starting", None), ("stopped", "crashed"),
                                         ("starting", None), ("stopped", "admin"),
                                         ("starting", None)]):
        conn.execute("INSERT INTO events (guest, event, reason, realtime, boottime, boot_id, "
                     "source) VALUES ('g', ?, ?, ?, ?, 'b', 'test')", (event, reason, i, i))
    conn.close()
    conn = state.connect(tmp_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(state.MIGRATIONS) == 5
    assert conn.execute("SELECT id FROM events WHERE restart = 1").fetchall() == [(3,)]
    assert state.list_figures(conn, Now(0, 9, "b"), ["g"])["g"].restarts == 1


def _old_database(path: Path, version: int) -> sqlite3.Connection:
    """A database as kvmagent of schema VERSION made it, in WAL mode."""
    conn = sqlite3.connect(path / "state.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    state.migrate(conn, state.MIGRATIONS[:version])
    return conn


@pytest.mark.parametrize("version", [1, 3])
def test_an_old_database_migrates_in_place_and_keeps_its_rows(tmp_path: Path,
                                                              version: int) -> None:
    """Version 3 (before takeovers and reloads were events) and version 1:
    every row, its id and the counters are kept; the new events are taken;
    the indexes `list` searches are there again."""
    conn = _old_database(tmp_path, version)
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        conn.execute("INSERT INTO events (guest, event, realtime, boottime, boot_id, source) "
                     "VALUES ('g', 'taken-over', 0, 0, 'b', 'test')")
    history = [("starting", None), ("running", None), ("stopped", "crashed"),
               ("starting", None), ("running", None)]
    for i, (event, reason) in enumerate(history * 3):
        conn.execute("INSERT INTO events (guest, event, reason, detail, realtime, boottime, "
                     "boot_id, invocation, pid, source) VALUES (?, ?, ?, ?, ?, ?, 'b', ?, ?, ?)",
                     ("g" if i < 10 else "h", event, reason, f"d{i}", 1000 + i, i, f"inv{i}",
                      100 + i, "supervisor"))
    conn.execute("DELETE FROM events WHERE id = 15")  # a gap at the end: ids stay ahead
    conn.execute("INSERT INTO counters VALUES ('g', 4, 1234.5)")
    before = conn.execute("SELECT * FROM events ORDER BY id").fetchall()
    conn.close()
    conn = state.connect(tmp_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(state.MIGRATIONS) == 5
    after = conn.execute("SELECT * FROM events ORDER BY id").fetchall()
    assert {r[-1] for r in after} == {None}  # booted (migration 5): none arrived
    after = [r[:-1] for r in after]
    if version == 1:  # migration 2 added the restart marks
        assert [r[:-1] for r in after] == before
        assert [r[0] for r in after if r[-1]] == [4, 9, 14]
    else:
        assert after == before
    assert conn.execute("SELECT * FROM counters").fetchall() == [("g", 4, 1234.5)]
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"events_by_guest", "events_by_invocation", "events_restarts",
            "events_lifecycle"} <= indexes
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    new = state.insert(conn, "g", state.TAKEN_OVER, detail="supervisor pid 7 ended", pid=109)
    assert new == 16  # AUTOINCREMENT: never an id used before
    state.insert(conn, "g", state.RELOADED, detail="kvmagent 1 -> 2", pid=109)
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO events (guest, event, realtime, boottime, boot_id, source) "
                     "VALUES ('g', 'exploded', 0, 0, 'b', 'test')")
    s = state.summaries(conn, ["g"], Now(0, 20, "b"))["g"]
    assert s.restarts == 1 and s.counted_since == 1234.5 and s.running_since is not None


def test_list_figures_searches_an_index_per_guest(tmp_path: Path) -> None:
    """Years of events must not slow `kvmagent list` down: each listed
    guest's last event is one search of the partial index, no scan."""
    conn = state.connect(tmp_path)
    plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {state.LAST_LIFECYCLE_SQL}",
                                           ('["g"]',))]
    assert any("SEARCH e USING INDEX events_lifecycle (guest=?)" in p
               or "SEARCH e USING COVERING INDEX events_lifecycle (guest=?)" in p
               for p in plan), plan
    assert not any(re.match(r"SCAN (events|e)\b", p) for p in plan), plan


def test_summaries_read_only_their_guests_rows(tmp_path: Path) -> None:
    """`kvmagent status NAME` and `history NAME` search the guest's rows
    (events_by_guest), not every guest's years."""
    conn = state.connect(tmp_path)
    for guest in ("g", "h"):
        state.insert(conn, guest, "starting", at=Now(1, 1, BOOT1))
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    state.summaries(conn, ["g"], Now(2, 2, BOOT1))
    conn.set_trace_callback(None)
    reads = [s for s in statements if "FROM events" in s]
    assert reads
    for sql in reads:
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}")]
        assert not any(re.match(r"SCAN (events|e)\b", p) for p in plan), (sql, plan)


def test_boot_id_is_the_file_systemd_tmpfiles_wrote(tmp_path: Path) -> None:
    """Not derived from the clock: a step of the wall clock changes the
    kernel's btime, never this file (/run is new at every boot)."""
    assert state.boot_id(str(tmp_path)) == state.kernel_boot_id()  # no file: the old way
    (tmp_path / state.BOOT_ID_FILE).write_text("0f3c5a1e9b2d4c6e8a0b1c2d3e4f5a6b")
    assert state.boot_id(str(tmp_path)) == "0f3c5a1e9b2d4c6e8a0b1c2d3e4f5a6b"
    for bad in ("", "../x", "a b", "\u00e9t\u00e9"):
        (tmp_path / state.BOOT_ID_FILE).write_text(bad)
        assert state.boot_id(str(tmp_path)) == state.kernel_boot_id(), bad


def test_an_upgrade_keeps_the_boot_it_is_in(tmp_path: Path) -> None:
    """postinst on an upgrade: this boot keeps the name the old version gave
    it; a file already there (systemd-tmpfiles') is never replaced."""
    runtime = tmp_path / "run"
    state.keep_boot_id(str(runtime))
    assert state.boot_id(str(runtime)) == state.kernel_boot_id()
    assert stat.S_IMODE((runtime / state.BOOT_ID_FILE).stat().st_mode) == 0o644
    (runtime / state.BOOT_ID_FILE).write_text("abc123\n")
    state.keep_boot_id(str(runtime))
    assert state.boot_id(str(runtime)) == "abc123"
    assert sorted(p.name for p in runtime.iterdir()) == [state.BOOT_ID_FILE]


def _first_writer(state_dir: str, guest: str, barrier: Any, results: Any) -> None:
    rec = state.Recorder(guest, Path(state_dir), lambda text: None)
    barrier.wait()
    results.put(rec("starting"))


def test_processes_creating_the_database_at_once_lose_nothing(tmp_path: Path) -> None:
    """A host's first boot: every guest's first event creates the database
    at the same moment.  Switching a new file to WAL does not wait for the
    busy timeout; without retrying it, some of 30 writers lost their event
    in about a third of the rounds."""
    ctx = multiprocessing.get_context("fork")
    for round_ in range(15):
        d = tmp_path / str(round_)
        d.mkdir()
        barrier, results = ctx.Barrier(30), ctx.Queue()
        procs = [ctx.Process(target=_first_writer, args=(str(d), f"g{n}", barrier, results))
                 for n in range(30)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(60)
        assert all(outcomes), f"round {round_}: {outcomes.count(False)} of 30 events lost"
        conn = state.connect(d)
        assert len(state.events(conn)) == 30
        conn.close()


def test_a_reader_brings_an_old_database_up_to_date(tmp_path: Path) -> None:
    """After an upgrade, before any guest writes: `kvmagent list` (a reader)
    must not meet the old schema."""
    conn = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    state.migrate(conn, state.MIGRATIONS[:1])
    for i, (event, reason) in enumerate([("starting", None), ("stopped", "crashed"),
                                         ("starting", None), ("running", None)]):
        conn.execute("INSERT INTO events (guest, event, reason, realtime, boottime, boot_id, "
                     "source) VALUES ('g', ?, ?, ?, ?, 'b', 'test')", (event, reason, i, i))
    conn.close()
    conn = state.connect(tmp_path, create=False)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(state.MIGRATIONS)
    figures = state.list_figures(conn, Now(0, 9, "b"), ["g"])["g"]
    assert figures.restarts == 1 and figures.running_since is not None


# -- a guest that arrived by live migration ------------------------------------------

def arrived(i: int, t: float, booted: float, boot: str = BOOT1) -> list[Event]:
    """The arrival's starting (reason migrated) and running (booted)."""
    return [ev(i, "starting", t, "migrated", boot=boot),
            ev(i + 1, "running", t + 1, boot=boot)._replace(booted=1_700_000_000 + booted)]


def test_an_arrival_counts_its_uptime_from_its_boot_elsewhere() -> None:
    """Booted at t=-500 on the other host (its wall clock), here since 101:
    at 201 it has run 701 s; the cumulative uptime of this host is its 100."""
    s = derive("g", arrived(1, 100, -500), at(201))
    assert s.uptime == 701 and s.longest == 701 and s.cumulative == 100 and s.runs == 1
    assert s.restarts == 0
    assert s.running_since is not None and uptime.booted_at(s.running_since) == 1_699_999_500
    assert uptime.run_uptime(s.running_since, at(201)) == 701
    # moved away again at 301: the run here closes, its span here is counted
    gone = arrived(1, 100, -500) + [ev(3, "stopped", 301, "migrated")]
    s = derive("g", gone, at(400))
    assert s.uptime is None and s.cumulative == 200 and s.longest == 801


def test_an_arrival_after_a_failure_here_is_no_restart(tmp_path: Path) -> None:
    """The guest crashed here, ran elsewhere, and came back by live
    migration in the same boot: not a restart, by derive or by the marks
    that `list` counts."""
    rows = run(1, 0, 50, "crashed") + arrived(4, 100, 60)
    assert derive("g", rows, at(200)).restarts == 0
    conn = state.connect(tmp_path)
    for e in rows:
        state.insert(conn, "g", e.event, reason=e.reason, at=Now(e.realtime, e.boottime, BOOT1),
                     booted=e.booted)
    assert conn.execute("SELECT COUNT(*) FROM events WHERE restart = 1").fetchone()[0] == 0
    now = Now(1_700_000_200, 200, BOOT1)
    fig = state.list_figures(conn, now, ["g"])["g"]
    s = state.summaries(conn, ["g"], now)["g"]
    assert fig.restarts == s.restarts == 0
    assert fig.running_since == s.running_since and s.running_since is not None
    assert s.running_since.booted == 1_700_000_060
    assert uptime.run_uptime(fig.running_since, now) == s.uptime == 140
    # a plain start after that same crash is one, as before
    state.insert(conn, "g", "stopped", reason="crashed", at=Now(1_700_000_300, 300, BOOT1))
    state.insert(conn, "g", "starting", at=Now(1_700_000_301, 301, BOOT1))
    assert state.list_figures(conn, now, ["g"])["g"].restarts == 1


def test_a_version_4_database_takes_the_booted_column(tmp_path: Path) -> None:
    """The schema before live migration's record (4): its rows are kept as
    they were, booted NULL (they booted here), and an arrival is written."""
    conn = _old_database(tmp_path, 4)
    for i, (event, reason) in enumerate([("starting", None), ("running", None),
                                         ("taken-over", None), ("stopped", "crashed")]):
        conn.execute("INSERT INTO events (guest, event, reason, realtime, boottime, boot_id, "
                     "source, restart) VALUES ('g', ?, ?, ?, ?, 'b', 'test', 0)",
                     (event, reason, 1000 + i, i))
    before = conn.execute("SELECT * FROM events ORDER BY id").fetchall()
    with pytest.raises(sqlite3.OperationalError, match="booted"):
        conn.execute("SELECT booted FROM events")
    conn.close()
    conn = state.connect(tmp_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(state.MIGRATIONS) == 5
    after = conn.execute("SELECT * FROM events ORDER BY id").fetchall()
    assert [r[:-1] for r in after] == before and {r[-1] for r in after} == {None}
    state.insert(conn, "g", "starting", reason="migrated", at=Now(2000, 10, "b"))
    state.insert(conn, "g", "running", detail="migrated here from a", pid=5,
                 at=Now(2001, 11, "b"), booted=1500.0)
    s = state.summaries(conn, ["g"], Now(2101, 111, "b"))["g"]
    assert s.uptime == 601 and s.restarts == 0
    assert state.events(conn, ["g"])[-1].booted == 1500.0
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
