"""What the supervisor's short-lived children do while QEMU initialises:
put the guest on the host.  Taps onto their bridges (pyroute2), QEMU into
its scope and the guest registered with machined (pystemd, pydbus).

Kept apart from kvmagent.unit.startup (the configuration machinery) so that the
children preload only the library each step needs; those are imported here
only when a step runs, never by the long-lived supervisor."""

from __future__ import annotations

import socket
from kvmagent.host import tundev
from kvmagent.render.plan import Plan


def open_taps(taps: tundev.Taps, vhost: bool) -> tuple[dict[int, str], list[int]]:
    """The slow way: open, check and set up each tap over netlink (a name
    that is taken: a stale tap is replaced, a foreign interface refused)."""
    from kvmagent.host import netdev  # pyroute2
    return tundev.open_taps(taps, vhost, lambda tap, bridge, queues:
                            netdev.open_tap(tap, bridge, queues=queues))


def configure_taps(taps: tundev.Taps) -> tuple[None, list[int]]:
    """Put the taps that the supervisor made (tundev.create_tap) on their
    bridges, while QEMU initialises."""
    from kvmagent.host import netdev  # pyroute2
    for tap in taps:
        netdev.configure_tap(tap.name, tap.bridge, tap.queues)
    return None, []


def make_scope(plan: Plan, pid: int) -> tuple[None, list[int]]:
    """Move QEMU into its scope and register the guest with machined."""
    from kvmagent.host import machined, systemd  # pystemd, pydbus
    systemd.start_scope(plan.scope_unit, pid, plan.scope)
    ifindices = [socket.if_nametoindex(tap.name) for tap in plan.taps]
    machined.register(plan.name, plan.uuid, pid, ifindices)
    return None, []
