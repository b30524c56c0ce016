"""The names of a guest's lifecycle events and of their reasons: what the
state database stores (kvmagent.host.state) and `--json` shows; and the file by
which a run tells its ExecStopPost= that it recorded its own end.  A module
of its own that imports nothing, so that the long-lived supervisor, the
event writer and the command line's short ways share these names without
importing one another (or sqlite3)."""

from __future__ import annotations

# In the unit's runtime directory, written by the supervisor's event writer
# once it has recorded the end of its run: the INVOCATION_ID of that run.
# `kvmagent stop-post` (kvmagent.cli.main's short way) then has nothing to do.
RECORDED_FILE = "recorded"

# A guest's run: starting, running, stopping, stopped.  Within a run, a new
# supervisor may take the running QEMU over (the last one died: taken-over)
# or the supervisor may move to the installed code (reloaded): the guest runs
# on, so these neither end its run nor start one, and are never a restart.
TAKEN_OVER = "taken-over"
RELOADED = "reloaded"
EVENTS = ("starting", "running", "stopping", "stopped", TAKEN_OVER, RELOADED)
# Reasons of stopping/stopped rows (stable: they are in --json output).
POWEROFF = "poweroff"  # the guest powered itself off
ADMIN = "admin"  # systemctl stop, kvmagent stop [--force]
SHUTDOWN = "shutdown"  # the host shut down or rebooted
CRASHED = "crashed"  # QEMU exited or was killed on its own
WATCHDOG = "watchdog"  # systemd's watchdog killed the supervisor
CONFIG = "config"  # bad configuration or unknown guest (exit 6 or 8)
KILLED = "killed"  # the supervisor itself was killed by a signal
OOM = "oom"  # the kernel's OOM killer
TIMEOUT = "timeout"  # a start or stop timeout of systemd
FAILED = "failed"  # any other failure: host not ready (exit 5), a runtime error
# kvmagent migrate: the guest moved to another host (the source's run ends),
# or an incoming migration did not complete (nothing ran on the destination)
MIGRATED = "migrated"
# The detail of an arrival's `running` (kvmagent.cli.arrival adds the downtime)
ARRIVED_FROM = "migrated here from "
REASONS = (POWEROFF, ADMIN, SHUTDOWN, CRASHED, WATCHDOG, CONFIG, KILLED, OOM, TIMEOUT, FAILED,
           MIGRATED)
FAILURES = frozenset({CRASHED, WATCHDOG, CONFIG, KILLED, OOM, TIMEOUT, FAILED})
# Failures systemd restarts after (RestartPreventExitStatus=6 8 stops the rest).
RESTARTED = FAILURES - {CONFIG}
