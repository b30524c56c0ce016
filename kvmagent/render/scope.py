"""systemd settings of the transient scope that holds a guest's QEMU.

One pure function produces (name, value) pairs; kvmagent renders them as
D-Bus properties for StartTransientUnit and as text for `kvmagent show`, so
the two can never disagree."""

from __future__ import annotations

from typing import cast

from kvmagent.config.model import Guest, HostConfig
from kvmagent.config.values import format_cpu_list
from kvmagent.names import service_unit
from kvmagent.render.qemu import HostFacts

Setting = tuple[str, str | int | list[str] | list[tuple[str, str]]]


def scope_settings(guest: Guest, host: HostConfig, facts: HostFacts | None = None, *,
                   service: str | None = None) -> list[Setting]:
    """service: the supervisor's unit, kvm@NAME.service unless a one-off's."""
    service = service or service_unit(guest.name)
    settings: list[Setting] = [
        ("Description", f"QEMU of {guest.description}" if guest.description
         else f"QEMU of guest {guest.name}"),
        ("Slice", "machine.slice"),
        # PartOf=, not BindsTo=: QEMU outlives a supervisor that dies (systemd
        # restarts it, and the new one takes the guest over), and is stopped
        # with the service.
        ("PartOf", [service]),
        # Before=, not After=: systemd stops units in the reverse of their
        # start order, so at shutdown the supervisor is told first, while
        # QEMU is still alive, and can power the guest off; with After= the
        # scope (and QEMU) would be killed before the guest had a chance.
        ("Before", [service]),
        ("CollectMode", "inactive-or-failed"),
        ("MemoryMax", guest.memory + host.memory_overhead),
        # QEMU gets its taps, vhost-net, QMP and console as fds; of device
        # nodes it needs only /dev/kvm and its own block devices (plus the
        # pseudo devices DevicePolicy=closed always allows).
        ("DevicePolicy", "closed"),
        ("DeviceAllow", [("/dev/kvm", "rw")] + [
            (str(d.path), "r" if d.readonly else "rw") for d in guest.disks
            if facts is not None and d.path in facts.block_devices]),
    ]
    r = guest.resources
    if r.cpu_weight is not None:
        settings.append(("CPUWeight", r.cpu_weight))
    if r.cpu_affinity is not None:
        settings.append(("AllowedCPUs", format_cpu_list(r.cpu_affinity)))
    if r.io_weight is not None:
        settings.append(("IOWeight", r.io_weight))
    if r.tasks_max is not None:
        settings.append(("TasksMax", r.tasks_max))
    return settings


def render_settings(settings: list[Setting]) -> list[str]:
    lines = []
    for key, value in settings:
        if key == "DeviceAllow":
            # scope_settings gives DeviceAllow as (path, mode) pairs
            pairs = cast("list[tuple[str, str]]", value)
            lines += [f"DeviceAllow={path} {mode}" for path, mode in pairs]
        elif isinstance(value, list):
            lines.append(f"{key}={' '.join(map(str, value))}")
        else:
            lines.append(f"{key}={value}")
    return lines
