"""kvmagent stop-orphan NAME: kvmagent-orphan@NAME.service, the OnFailure=
of kvm@NAME.service.

A guest's QEMU outlives its supervisor (kvm-NAME.scope is PartOf= the
service, not bound to it), so that systemd can restart a supervisor that
died and the new one take the guest over (kvmagent.unit.adopt).  When
systemd gives up restarting (the unit's start limit), nothing supervises
that QEMU any more: this stops its scope, and records the end of the run.
systemd 257 starts OnFailure= units before every automatic restart too: it
acts only when no supervisor is running or about to."""

from __future__ import annotations

import argparse
import sys

from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.host import state, systemd
from kvmagent.lifecycle import FAILED
from kvmagent.names import oneoff_unit, scope_unit, service_unit, valid_guest_name
from kvmagent.paths import Paths

# ActiveStates of a service in which a supervisor runs or is about to.
ALIVE = frozenset({"active", "activating", "deactivating", "reloading", "refreshing"})


def orphaned(service_states: list[str | None], scope_state: str | None) -> bool:
    """Is the guest's scope left without a supervisor?  Pure."""
    return scope_state in ALIVE and not any(s in ALIVE for s in service_states)


def cmd_stop_orphan(args: argparse.Namespace, paths: Paths) -> int:
    name = args.name
    if not valid_guest_name(name):
        print(f"kvmagent: invalid guest name {name!r}", file=sys.stderr)
        return ExitStatus.UNKNOWN_GUEST
    scope = scope_unit(name)
    try:
        services = [systemd.active_state(service_unit(name)),
                    systemd.active_state(oneoff_unit(name))]
        if not orphaned(services, systemd.active_state(scope)):
            return ExitStatus.OK
        print(f"kvmagent: the supervisor of guest {name} failed too often (the unit's start "
              f"limit): stopping its QEMU ({scope})", file=sys.stderr)
        systemd.stop_unit(scope, timeout=60.0)
    except KvmagentError as e:
        print(f"kvmagent: {e}", file=sys.stderr)
        return int(e.status)
    try:
        conn = state.connect(paths.state_dir)
        try:
            state.insert(conn, name, "stopped", reason=FAILED,
                         detail="its supervisor failed too often; QEMU stopped",
                         source="stop-orphan")
        finally:
            conn.close()
    except Exception as e:  # the stop is done; the record is second
        print(f"kvmagent: cannot record the stop of guest {name}: {e}", file=sys.stderr)
    return ExitStatus.OK
