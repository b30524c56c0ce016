"""The machine type a guest is pinned to, decided purely.

"pc" and "q35" are aliases: QEMU 7.2 (Debian 12) makes "pc" pc-i440fx-7.2,
QEMU 10.0 (Debian 13) pc-i440fx-10.0, and the versioned type fixes the
hardware the guest sees (devices, their defaults, ACPI tables).  A guest
keeps the versioned type of its first start: after the host is upgraded it
still gets the hardware it was installed on, and it can move live between
the two releases (10.0 still has pc-i440fx-7.2).  The pin is kept in the
state directory (kvmagent.host.pinfile); these functions say what to run
and what to keep."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple


class Pin(NamedTuple):
    """Guest NAME's machine = REQUESTED ran as the versioned MACHINE."""

    requested: str  # the guest's machine when it was pinned ("pc")
    machine: str  # what it stood for then ("pc-i440fx-7.2")


def pinned_machine(requested: str, pin: Pin | None, aliases: Mapping[str, str]) -> str:
    """The machine type to run: the pinned one while the guest still asks
    for what it was pinned for; else what this QEMU makes of REQUESTED (an
    alias resolved, a versioned type as it is)."""
    if pin is not None and pin.requested == requested:
        return pin.machine
    return aliases.get(requested, requested)


def pin_change(requested: str, pin: Pin | None, machine: str) -> Pin | None:
    """The pin to write once the guest starts with MACHINE: None when the
    one kept is right already."""
    new = Pin(requested, machine)
    return None if pin == new else new


def pin_message(name: str, old: Pin | None, new: Pin) -> str:
    """What the journal says when a pin is written."""
    if old is None:
        return (f"guest {name}: machine \"{new.requested}\" pinned to {new.machine}; "
                "later starts use it, also after QEMU is upgraded")
    return (f"guest {name}: machine changed from \"{old.requested}\" (pinned to {old.machine}) "
            f"to \"{new.requested}\": re-pinned to {new.machine}")


def pin_status(requested: str, pin: Pin | None, machine: str | None) -> str:
    """What `kvmagent show` says of the guest's machine type: pinned, or
    what its next start pins (MACHINE: what the host checks chose)."""
    if machine is None:
        return f"machine \"{requested}\": QEMU was not asked, the pin is not known"
    if pin is not None and pin.requested == requested:
        return f"machine \"{requested}\" is pinned to {pin.machine}"
    if pin is not None:
        return (f"machine \"{requested}\" (was \"{pin.requested}\", pinned to {pin.machine}): "
                f"the next start re-pins it to {machine}")
    return f"machine \"{requested}\" is not pinned yet: the next start pins it to {machine}"
