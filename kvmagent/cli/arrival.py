"""The record that follows a guest moved by `kvmagent migrate` (#20): what
the source sends with it, what the destination writes.

The guest did not boot on the destination, so its uptime goes on there:
the source sends the wall clock of the guest's boot from its own record
(guest_booted: the open run's `running`, or the boot that run carried if
the guest had arrived here the same way) as migrate-incoming's --booted;
the destination's supervisor writes it with its `running` event
(kvmagent.host.state: booted), and its `starting` has the reason
`migrated`, so that `kvmagent list` counts no restart.

QEMU's downtime is known only once the move is over, on the source: the
source then tells the destination (`migrate-incoming NAME --arrived --from
HOST --downtime MS`, a second short ssh session), and record_downtime adds
it to the arrival's `running` event.  `kvmagent history` then shows the
move on both hosts: "to HOST, downtime N ms" on the source's `stopped`,
"migrated here from HOST, downtime N ms" and the boot on the
destination's `running`.  If that last word is lost, only the downtime is
missing there."""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import time

from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.host import ssh, state
from kvmagent.lifecycle import ARRIVED_FROM
from kvmagent.paths import Paths
from kvmagent.render import uptime

ROW_WAIT = 10.0  # seconds for the supervisor's writer to record the arrival
TELL_TIMEOUT = 30.0  # seconds for the destination to take the downtime


def guest_booted(paths: Paths, name: str) -> float | None:
    """The wall clock of guest NAME's boot, from this host's record of its
    open run; None when the record has none (the arrival then counts its
    uptime from there)."""
    try:
        conn = state.connect(paths.state_dir, create=False)
    except (FileNotFoundError, sqlite3.Error, OSError):
        return None
    try:
        run = state.summaries(conn, [name], state.now())[name].running_since
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return None if run is None else uptime.booted_at(run)


def record_downtime(paths: Paths, name: str, source: str, downtime_ms: int,
                    wait: float | None = None) -> bool:
    """Add the downtime to the last `running` of guest NAME, if it is the
    arrival from SOURCE still without it (waiting up to WAIT seconds for
    the supervisor's writer to record it); False if there is none."""
    detail = f"{ARRIVED_FROM}{source}"  # as the supervisor wrote it
    deadline = time.monotonic() + (ROW_WAIT if wait is None else wait)
    conn = state.connect(paths.state_dir)
    try:
        while True:
            conn.execute("BEGIN IMMEDIATE")
            try:
                done = conn.execute(
                    "UPDATE events SET detail = ? WHERE id = (SELECT MAX(id) FROM events "
                    "WHERE guest = ? AND event = 'running') AND detail = ?",
                    (f"{detail}, downtime {downtime_ms} ms", name, detail)).rowcount
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            if done or time.monotonic() > deadline:
                return bool(done)
            time.sleep(0.1)
    finally:
        conn.close()


def cmd_arrived(args: argparse.Namespace, paths: Paths) -> int:
    """migrate-incoming NAME --arrived --from HOST --downtime MS."""
    if not args.source or args.downtime is None:
        raise KvmagentError("migrate-incoming --arrived needs --from and --downtime (it is run "
                            "by kvmagent migrate)", None, ExitStatus.USAGE)
    try:
        found = record_downtime(paths, args.name, args.source, args.downtime)
    except (sqlite3.Error, OSError) as e:
        raise KvmagentError(f"cannot write {state.db_path(paths.state_dir)}: {e}") from None
    if not found:
        raise KvmagentError(f"guest {args.name} has no arrival from {args.source} in this "
                            "host's record", None, ExitStatus.FAILURE)
    return ExitStatus.OK


def tell_destination(target: ssh.Target, name: str, source: str, downtime_ms: int) -> str:
    """The source, once the guest runs there: the downtime to the
    destination's record.  Why it failed, or ""."""
    argv = ssh.ssh_argv(target, ["migrate-incoming", name, "--arrived", "--from", source,
                                 "--downtime", str(downtime_ms)])
    try:
        r = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                           timeout=TELL_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return "" if r.returncode == 0 else (r.stderr.strip() or f"exit status {r.returncode}")
