"""kvmagent status NAME: like `systemctl status` for a guest -- its state,
uptime, restarts, last failure, taps and bridges, console socket, and the
last lines of its journal."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from kvmagent.cli.hostlist import duration, paint
from kvmagent.cli.tracking import (STATES, UP_STATES, _history, _known, _note, _summary_json,
                                   qemu_of, reason_text, stamp)
from kvmagent.config.values import format_size
from kvmagent.unit import protocol
from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.host import journal
from kvmagent.names import oneoff_unit, scope_unit, service_unit
from kvmagent.paths import Paths
from kvmagent.render.uptime import booted_at

PROPERTIES = ("ActiveState", "SubState", "Result", "MainPID", "InvocationID",
              "ActiveEnterTimestamp", "UnitFileState", "StatusText", "NRestarts")


def unit_view(unit: str) -> tuple[dict[str, Any], str]:
    if not os.path.isdir("/run/systemd/system"):
        return {}, "systemd is not running on this host (not PID 1): state unknown"
    from kvmagent.host import systemd
    try:
        props = systemd.unit_properties(unit, PROPERTIES)
    except KvmagentError as e:
        return {}, f"state unknown: {e.message}"
    inv = props.get("InvocationID")
    if isinstance(inv, (list, tuple)):
        props["InvocationID"] = bytes(inv).hex()
    return props, ""


def _guest(paths: Paths, name: str) -> tuple[Any, str]:
    from kvmagent.config.guests import load_guest, load_host_config
    try:
        return load_guest(paths, name, load_host_config(paths)), ""
    except KvmagentError as e:
        if e.status == ExitStatus.UNKNOWN_GUEST:
            raise
        return None, e.message


def supervisor(paths: Paths, name: str) -> protocol.Status | None:
    """What the running supervisor says of itself (None: no answer)."""
    path = paths.control_socket(name)
    if not path.is_socket():
        return None
    try:
        return protocol.call(path, protocol.StatusAsk(), protocol.Status, timeout=2.0)
    except KvmagentError:
        return None


def status(args: argparse.Namespace, paths: Paths) -> int:
    name = args.name
    unit = service_unit(name)
    guest, config_problem = _guest(paths, name)
    props, note = unit_view(unit)
    if not note and props.get("ActiveState") not in UP_STATES:
        # Its install run (or a one-off from a copy of its file) instead?
        other, note3 = unit_view(oneoff_unit(name))
        if not note3 and other.get("ActiveState") in (*UP_STATES, "activating"):
            unit, props = oneoff_unit(name), other
    _, summary, note2 = _history(paths, name)
    active = props.get("ActiveState")
    word = STATES.get(active or "", "unknown")
    nics = []
    if guest is not None:
        nics = [{"tap": n.tap if n.bridge else None, "bridge": n.bridge, "mac": n.mac}
                for n in guest.nics]
    console = paths.console_socket(name)
    sup = supervisor(paths, name) if active in UP_STATES else None
    qemu_pid = _qemu_pid(summary)
    since = booted_at(summary.running_since) if summary is not None and \
        summary.running_since is not None else None
    uptime = summary.uptime if summary is not None else None
    if active in UP_STATES and (qemu_pid is None or since is None):
        # the record says nothing of this run (a damaged database started
        # anew): what systemd knows of QEMU's scope
        scope = scope_view(name)
        if scope is not None:
            qemu_pid = qemu_pid or qemu_of(name, scope.processes)
            if since is None and scope.since is not None:
                since, uptime = scope.since, max(0.0, time.time() - scope.since)
    lines = [] if args.json else journal.tail(unit, args.lines)
    if args.json:
        doc = {"name": name, "unit": unit, "state": word, "active_state": active,
               "sub_state": props.get("SubState"), "result": props.get("Result"),
               "enabled": (props.get("UnitFileState") in ("enabled", "enabled-runtime")
                           if props else None),
               "invocation_id": props.get("InvocationID"),
               "supervisor_pid": props.get("MainPID") or None,
               "qemu_pid": qemu_pid, "config_error": config_problem or None,
               "cpus": guest.cpus if guest else None,
               "memory_bytes": guest.memory if guest else None,
               "nics": nics, "console_socket": str(console) if console.exists() else None,
               "supervisor": None if sup is None else {
                   "kvmagent_version": sup.version, "since": sup.supervising_since,
                   "qemu_started_by": sup.started_by, "qemu_since": sup.qemu_since,
                   "takeovers": sup.takeovers},
               **_summary_json(summary, known=not note2)}
        if doc["uptime_seconds"] is None and uptime is not None:
            doc["uptime_seconds"] = int(uptime)
        if props and active not in UP_STATES:
            # systemd says it does not run: a run left open in the record
            # (both the supervisor's and stop-post's writes lost) is no uptime
            doc["uptime_seconds"] = doc["qemu_pid"] = None
        _note(note)
        _note(note2)
        json.dump(doc, sys.stdout, indent=2)
        print()
        return ExitStatus.OK
    _note(note)
    _note(note2)
    desc = f" - {guest.description}" if guest is not None else ""
    print(f"{name}{desc}")
    out: list[tuple[str, str]] = []
    state_text = paint(word, word)
    if props:
        state_text += f" ({active}/{props.get('SubState')})"
        if active == "failed":
            state_text += f", result {props.get('Result')}"
    if since is not None and active == "active":
        state_text += f" since {stamp(since)}; up {duration(uptime)}"
    out.append(("State", state_text))
    if props.get("StatusText"):
        out.append(("Status", str(props["StatusText"])))
    if config_problem:
        out.append(("Config", paint("invalid", "invalid") + f": {config_problem}"))
    elif guest is not None:
        out.append(("Config", f"{guest.config_file}; {guest.cpus} vCPU, "
                              f"{format_size(guest.memory)}"))
    if props:
        out.append(("Boot", "enabled" if props.get("UnitFileState") == "enabled"
                    else str(props.get("UnitFileState") or "-")))
    if summary is not None:
        counted = f" (counted since {stamp(summary.counted_since)})" \
            if summary.counted_since else ""
        out.append(("Restarts", f"{summary.restarts} after failures{counted}"))
        out.append(("Uptime", f"total {duration(summary.cumulative)} in {summary.runs} runs, "
                              f"longest {duration(summary.longest)}"))
        if summary.last_failure is not None:
            f = summary.last_failure
            out.append(("Failure", f"{stamp(f.realtime)} {reason_text(f)}"))
    else:
        out.append(("Restarts", "no record yet"))
    if props.get("MainPID"):
        out.append(("PIDs", f"supervisor {props['MainPID']}, QEMU {qemu_pid or '-'} "
                            f"(in {scope_unit(name)})"))
    if sup is not None:
        out.append(("Supervisor", f"kvmagent {sup.version} since "
                                  f"{stamp(sup.supervising_since)} (QEMU started by kvmagent "
                                  f"{sup.started_by} {stamp(sup.qemu_since)}; "
                                  f"{sup.takeovers} takeovers since)"))
    for n in nics:
        where = f"{n['tap']} on {n['bridge']}" if n["tap"] else "user-mode network"
        out.append(("NIC", f"{where}, MAC {n['mac']}"))
    if console.exists():
        out.append(("Console", f"{console} (kvmagent console {name})"))
    out.append(("Unit", unit + (f", invocation {props['InvocationID']}"
                                if props.get("InvocationID") else "")))
    for label, text in out:
        print(f"{label:>10}: {text}")
    if lines:
        print()
        print("\n".join(lines))
    return ExitStatus.OK


def scope_view(name: str) -> Any:
    """systemd's view of the guest's QEMU scope (host.systemd.Scope), or None."""
    from kvmagent.host import systemd
    try:
        scope = systemd.scopes([scope_unit(name)]).get(scope_unit(name))
    except KvmagentError:
        return None
    return scope if scope is not None and scope.active_state in UP_STATES else None


def _qemu_pid(summary: Any) -> int | None:
    run = summary.running_since if summary is not None else None
    if run is not None and run.pid and os.path.exists(f"/proc/{run.pid}"):
        return int(run.pid)
    return None


def cmd_status(args: argparse.Namespace, paths: Paths) -> int:
    _known(paths, args.name)
    return status(args, paths)
