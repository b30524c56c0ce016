"""kvmagent stop-post NAME: the ExecStopPost= of kvm@NAME.service.

Records how a run ended when the supervisor could not (killed by SIGKILL,
the OOM killer, systemd's watchdog), from systemd's $SERVICE_RESULT,
$EXIT_CODE and $EXIT_STATUS, and marks a stop during host shutdown as
such.  Runs after every run, so it adds a `stopped` row only when the
supervisor did not record one for this invocation ($INVOCATION_ID), and
none at all when the guest's QEMU outlived its supervisor (the guest runs
on, and the supervisor that systemd starts next takes it over)."""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import sys
from contextlib import suppress

from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.host import state
from kvmagent.paths import Paths
from kvmagent.unit import adopt


def stop_reason(result: str, code: str, status: str) -> tuple[str, str | None]:
    """systemd's $SERVICE_RESULT, $EXIT_CODE, $EXIT_STATUS -> (reason, detail)
    for a run the supervisor could not record itself.  Pure."""
    if result == "success":
        return state.ADMIN, None
    if result == "watchdog":
        return state.WATCHDOG, "no watchdog ping from the supervisor"
    if result == "oom-kill":
        return state.OOM, "killed by the OOM killer"
    if result in ("timeout", "start-limit-hit"):
        return state.TIMEOUT, result
    if code in ("killed", "dumped") or result in ("signal", "core-dump"):
        return state.KILLED, f"supervisor killed by signal {status or '?'}"
    if code == "exited" and status in ("6", "8"):
        return state.CONFIG, f"supervisor exited with status {status}"
    return state.FAILED, (f"supervisor exited with status {status}" if status
                          else f"service result {result or '?'}")


def host_stopping() -> bool:
    """Is the host shutting down?  While it is, shutdown.target has a start
    job queued and systemd's SystemState is "stopping".  Asked here, in
    ExecStopPost=, which runs while the guest's stop job (part of that
    shutdown) is still running; the supervisor, standard library only,
    cannot ask cheaply.  Through `systemctl is-system-running`, not the
    system bus: at shutdown dbus.service may be gone already (kvm@ is not
    ordered after it), and systemctl, as root, talks to PID 1 over its
    private socket."""
    import subprocess
    if not os.path.isdir("/run/systemd/system"):
        return False
    try:
        r = subprocess.run(["systemctl", "is-system-running"], capture_output=True, text=True,
                           timeout=10, stdin=subprocess.DEVNULL,
                           env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.stdout.strip() == "stopping"


def _systemctl(*args: str) -> str | None:
    """systemctl's output, None when it cannot be run.  Over PID 1's private
    socket as root: at shutdown dbus.service may be gone already."""
    import subprocess
    if not os.path.isdir("/run/systemd/system"):
        return None
    try:
        r = subprocess.run(["systemctl", *args], capture_output=True, text=True,
                           timeout=10, stdin=subprocess.DEVNULL,
                           env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout


def stop_jobs(listing: str, units: tuple[str, ...]) -> bool:
    """Does `systemctl list-jobs --plain --no-legend` (systemd's ListJobs:
    JOB UNIT TYPE STATE) show a stop or restart of one of UNITS?  Pure."""
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] in units and fields[2] in ("stop", "restart"):
            return True
    return False


def being_stopped(name: str) -> bool:
    """Is the guest's unit being stopped (or restarted), rather than ended by
    its supervisor's death, which systemd answers with a new supervisor?
    A supervisor that died while the guest powered off, or a stop that came
    while no supervisor ran, leaves the stop job running while this runs."""
    from kvmagent.names import service_unit
    listing = _systemctl("list-jobs", "--plain", "--no-legend")
    return listing is not None and stop_jobs(
        listing, (service_unit(name), f"kvm-oneoff@{name}.service"))


def end_leftover_scope(name: str) -> bool:
    """A supervisor killed while its guest started (QEMU in kvm-NAME.scope,
    but not yet kept for a successor: nothing to take over) leaves that
    scope and its QEMU behind: killed here (no stop job, which would wait
    for this unit's own stop), and waited for, so that the next supervisor
    starts the guest anew with its taps free.  True if there was one."""
    import time
    from kvmagent.names import scope_unit
    scope = scope_unit(name)
    if (_systemctl("is-active", scope) or "").strip() not in ("active", "activating"):
        return False
    _systemctl("kill", "--signal=SIGKILL", scope)
    deadline = time.monotonic() + 10
    alive = ("active", "activating", "deactivating")
    while (_systemctl("is-active", scope) or "").strip() in alive:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return True


def qemu_runs_on(paths: Paths, name: str) -> int | None:
    """The pid of the guest's QEMU if it outlived its supervisor (the guest
    did not stop: no `stopped` is recorded, a new supervisor takes it over,
    or kvmagent-orphan@NAME.service stops it past the start limit)."""
    try:
        running = adopt.read_running(paths, name)
        qemu = adopt.AdoptedQemu.find(running) if running is not None else None
    except KvmagentError:
        return None
    if qemu is None:
        return None
    qemu.close()
    return qemu.pid


def kill_qemu(paths: Paths, name: str, signum: int = signal.SIGKILL) -> None:
    """SIGNUM to the guest's QEMU (this guest's, checked), and wait for it
    (SIGKILL after 10 s)."""
    try:
        running = adopt.read_running(paths, name)
        qemu = adopt.AdoptedQemu.find(running) if running is not None else None
    except KvmagentError:
        return
    if qemu is not None:
        with suppress(ProcessLookupError):
            signal.pidfd_send_signal(qemu.pidfd, signum)
        if qemu.poll() is None and signum != signal.SIGKILL:
            qemu.wait(10.0)
            qemu.kill()
        qemu.wait(10.0)
        qemu.close()


def cmd_stop_post(args: argparse.Namespace, paths: Paths) -> int:
    env = os.environ
    admin = None
    invocation = env.get("INVOCATION_ID") or None
    result, code, status = (env.get("SERVICE_RESULT", ""), env.get("EXIT_CODE", ""),
                            env.get("EXIT_STATUS", ""))
    if result == "watchdog" and (pid := qemu_runs_on(paths, args.name)) is not None:
        # The supervisor stopped pinging because QEMU did not answer QMP: a
        # hung guest, which no new supervisor could take over.  It ends here.
        print(f"kvmagent: QEMU of guest {args.name} (pid {pid}) does not answer: killing it",
              file=sys.stderr)
        kill_qemu(paths, args.name)
    elif result != "success" and (pid := qemu_runs_on(paths, args.name)) is not None:
        if not being_stopped(args.name):
            print(f"kvmagent: the supervisor of guest {args.name} ended ({result or '?'}); its "
                  f"QEMU (pid {pid}) runs on for the next supervisor to take over",
                  file=sys.stderr)
            return ExitStatus.OK
        # The guest was being stopped when its supervisor died, or the stop
        # came while none ran: no supervisor follows to power it off.
        print(f"kvmagent: guest {args.name} is being stopped and has no supervisor "
              f"({result or '?'}): stopping its QEMU (pid {pid}) with SIGTERM", file=sys.stderr)
        kill_qemu(paths, args.name, signal.SIGTERM)
        result, admin = "success", "QEMU stopped by stop-post (no supervisor to power it off)"
    elif result != "success" and end_leftover_scope(args.name):
        print(f"kvmagent: the supervisor of guest {args.name} ended ({result or '?'}) while "
              "the guest started: its QEMU was stopped; the guest starts anew", file=sys.stderr)
    try:
        conn = state.connect(paths.state_dir)
    except (sqlite3.Error, OSError) as e:
        print(f"kvmagent: cannot record the stop of guest {args.name}: {e}", file=sys.stderr)
        return ExitStatus.FAILURE
    try:
        done = state.stopped_in(conn, invocation) if invocation else None
        if done is None:
            reason, detail = stop_reason(result, code, status)
            detail = admin or detail
            state.insert(conn, args.name, "stopped", reason=reason, detail=detail,
                         source="stop-post", invocation=invocation)
            if reason == state.ADMIN and host_stopping():
                state.mark_shutdown(conn, invocation or "")
        elif done.reason == state.ADMIN and invocation and host_stopping():
            state.mark_shutdown(conn, invocation)
    except sqlite3.Error as e:
        print(f"kvmagent: cannot record the stop of guest {args.name}: {e}", file=sys.stderr)
        return ExitStatus.FAILURE
    finally:
        conn.close()
    return ExitStatus.OK
