"""The state database's schema (kvmagent.host.state), version by version:
each entry of MIGRATIONS moves it from version N to N+1 (PRAGMA
user_version), and migrate() brings a database up to date, in place, once,
whoever opens it first.  A migration, once released, is never changed: a
database of any earlier version must come out the same."""

from __future__ import annotations

import sqlite3

from kvmagent.lifecycle import RESTARTED

# Each entry moves the schema from version N to N+1 (PRAGMA user_version).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        guest TEXT NOT NULL,
        event TEXT NOT NULL CHECK (event IN ('starting', 'running', 'stopping', 'stopped')),
        reason TEXT,
        detail TEXT,
        realtime REAL NOT NULL,
        boottime REAL NOT NULL,
        boot_id TEXT NOT NULL,
        invocation TEXT,
        pid INTEGER,
        source TEXT NOT NULL
    );
    CREATE INDEX events_by_guest ON events (guest, id);
    CREATE INDEX events_by_invocation ON events (invocation);
    CREATE TABLE counters (
        guest TEXT PRIMARY KEY,
        reset_after INTEGER NOT NULL,
        reset_realtime REAL NOT NULL
    );
    """,
    # 2: `restart` marks each start that is a restart, set when the start is
    # recorded, so `kvmagent list` counts them through a small partial index
    # instead of walking every guest's history.  Rows already there are
    # marked by the same rule (restarts_sql).
    """
    ALTER TABLE events ADD COLUMN restart INTEGER NOT NULL DEFAULT 0;
    UPDATE events SET restart = 1 WHERE id IN (RESTARTS_SQL);
    CREATE INDEX events_restarts ON events (guest, id) WHERE restart = 1
    """,
    # 3: each guest's last start, run or stop (list_figures) from an index
    # search per guest, not a look at every row.
    """
    CREATE INDEX events_lifecycle ON events (guest, id)
        WHERE event IN ('starting', 'running', 'stopped')
    """,
    # 4: a supervisor taking a running guest over (the last one died) and a
    # supervisor's reload are events of their own: 'taken-over', 'reloaded'.
    # SQLite changes a CHECK only by making the table anew: the rows are
    # copied with their ids (counters.reset_after names them), and the
    # AUTOINCREMENT counter (no id is ever used twice), the indexes made again.
    """
    CREATE TABLE events_new (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        guest TEXT NOT NULL,
        event TEXT NOT NULL CHECK (event IN ('starting', 'running', 'stopping', 'stopped',
                                             'taken-over', 'reloaded')),
        reason TEXT,
        detail TEXT,
        realtime REAL NOT NULL,
        boottime REAL NOT NULL,
        boot_id TEXT NOT NULL,
        invocation TEXT,
        pid INTEGER,
        source TEXT NOT NULL,
        restart INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO events_new (id, guest, event, reason, detail, realtime, boottime, boot_id,
                            invocation, pid, source, restart)
        SELECT id, guest, event, reason, detail, realtime, boottime, boot_id, invocation, pid,
               source, restart FROM events ORDER BY id;
    DELETE FROM sqlite_sequence WHERE name = 'events_new';
    INSERT INTO sqlite_sequence (name, seq) SELECT 'events_new', seq FROM sqlite_sequence
        WHERE name = 'events';
    DROP TABLE events;
    ALTER TABLE events_new RENAME TO events;
    CREATE INDEX events_by_guest ON events (guest, id);
    CREATE INDEX events_by_invocation ON events (invocation);
    CREATE INDEX events_restarts ON events (guest, id) WHERE restart = 1;
    CREATE INDEX events_lifecycle ON events (guest, id)
        WHERE event IN ('starting', 'running', 'stopped')
    """,
    # 5: a guest that arrived by live migration did not boot here: `booted`
    # (the wall clock of its boot, elsewhere; NULL: it booted at this
    # `running`) carries its uptime over from the host it came from.
    """
    ALTER TABLE events ADD COLUMN booted REAL
    """,
)


def migrate(conn: sqlite3.Connection, migrations: tuple[str, ...] = MIGRATIONS) -> int:
    """Bring the schema up to date; returns the version.  Concurrent openers
    are serialised by BEGIN IMMEDIATE, and each re-reads the version inside
    the transaction, so a migration runs exactly once."""
    if conn.execute("PRAGMA user_version").fetchone()[0] == len(migrations):
        return len(migrations)
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(migrations):
            raise sqlite3.DatabaseError(f"the state database has schema version {version}; "
                                        f"this kvmagent knows {len(migrations)}")
        for number, script in enumerate(migrations[version:], version + 1):
            for statement in filter(str.strip, script.split(";")):
                conn.execute(statement.replace("RESTARTS_SQL", restarts_sql()))
            conn.execute(f"PRAGMA user_version = {number}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return len(migrations)


def restarts_sql() -> str:
    """The ids of the `starting` events that are restarts (see kvmagent.host.state's
    docstring): the starting/stopped event before them is a stop for a
    failure systemd restarts after, in the same boot."""
    failures = ", ".join(f"'{r}'" for r in sorted(RESTARTED))
    return f"""
        SELECT id FROM (
            SELECT id, event, boot_id, LAG(event) OVER w AS prev_event,
                   LAG(reason) OVER w AS prev_reason, LAG(boot_id) OVER w AS prev_boot
            FROM events WHERE event IN ('starting', 'stopped')
            WINDOW w AS (PARTITION BY guest ORDER BY id))
        WHERE event = 'starting' AND prev_event = 'stopped'
          AND prev_reason IN ({failures}) AND prev_boot = boot_id"""
