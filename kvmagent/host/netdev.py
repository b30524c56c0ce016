"""Taps over netlink (pyroute2), in-process.

No `ip`, bridge tool or QEMU ifup script: a guest's taps are opened here and
handed to QEMU as file descriptors (`-netdev tap,id=n0,fd=N`, or
`fds=N:M:...` for multiqueue).  The taps are not persistent, so the kernel
deletes a tap when its last fd is closed: no tap outlives its guest.

"Ours": kvmagent's live taps are non-persistent taps under names.TAP_PREFIX
with IFLA_IFALIAS "kvmagent".  If the name a guest needs is taken, open_tap()
refuses a foreign interface (not a tap, a tun-mode device, a tap owned by a
user, anything outside TAP_PREFIX) and a tap with carrier (a process holds
it: a running QEMU); it removes only a persistent tap without carrier under
TAP_PREFIX, the leftover of an older `ip tuntap add` style setup.

The bridges the taps join are kvmagent.host.bridge's; the netlink base both
stand on (pyroute2, network namespaces: netns=) is kvmagent.host.netlink.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from kvmagent.errors import config_error, host_error
from kvmagent.host import netlink
from kvmagent.host.tundev import attach as _attach, in_use as _in_use
from kvmagent.host.tundev import ifindex as _index, open_tun as _open_tun, persistent, tap_flags
from kvmagent.host.tundev import vhost_fd  # noqa: F401 - kvmagent's tap API is here
from kvmagent.names import TAP_PREFIX

TAP_ALIAS = "kvmagent"  # IFLA_IFALIAS of the taps open_tap() made
MAX_QUEUES = 256  # MAX_TAP_QUEUES in drivers/net/tun.c
IFLA_TUN_TYPE_TAP = 2


def tap_mac(name: str) -> str:
    """The tap's own MAC: fe: plus 5 bytes of a hash of its name.

    0xfe is locally administered and higher than any vendor prefix, so the
    bridge (which takes the lowest port MAC) never adopts a tap's address,
    and the guest's MAC (52:54:00:...) is only ever seen inside the guest.
    """
    tail = hashlib.sha256(name.encode()).digest()[:5]
    return "fe:" + ":".join(f"{b:02x}" for b in tail)


def _clear_name(ipr: netlink.IPRoute, name: str) -> None:
    """Make NAME free for a new tap: remove a stale tap of ours, refuse the rest."""
    link = netlink.get_link(ipr, name)
    if link is None:
        return
    data = netlink.info_data(link)
    kind = netlink.link_kind(link)
    foreign_hint = ("kvmagent does not take over interfaces it did not make: "
                    f"delete or rename {name}, or rename the guest")
    if kind != "tun" or data.get("IFLA_TUN_TYPE") != IFLA_TUN_TYPE_TAP:
        what = "a tun device" if kind == "tun" else f"a {kind or 'physical'} interface"
        raise host_error(f"interface {name} already exists and is {what}, "
                         "not a kvmagent tap", foreign_hint)
    for key, what in (("IFLA_TUN_OWNER", "uid"), ("IFLA_TUN_GROUP", "gid")):
        if data.get(key) not in (None, 0):
            raise host_error(f"tap {name} already exists and belongs to "
                             f"{what} {data[key]}", foreign_hint)
    if link.get_attr("IFLA_CARRIER") or not data.get("IFLA_TUN_PERSIST"):
        raise _in_use(name, link.get_attr("IFLA_IFALIAS") == TAP_ALIAS)
    if not name.startswith(TAP_PREFIX):
        raise host_error(f"persistent tap {name} already exists", foreign_hint)
    ipr.link("del", index=link["index"])  # stale, from an older run


def _check_created(ipr: netlink.IPRoute, fd: int, name: str, queues: int) -> None:
    """Refuse if a racing process made tap NAME between our check and
    TUNSETIFF, so that we attached to its tap instead of creating ours."""
    raced = persistent(fd)
    if queues > 1 and not raced:  # a multiqueue tap takes extra queues
        tap = netlink.get_link(ipr, name)
        raced = tap is None or netlink.info_data(tap).get("IFLA_TUN_NUM_QUEUES") != queues
    if raced:
        raise _in_use(name)


def open_tap(name: str, bridge: str, *, queues: int = 1, vnet_hdr: bool = True,
             netns: str | None = None) -> list[int]:
    """Create tap NAME on BRIDGE and return its `queues` fds.

    The tap gets the bridge's MTU, its own MAC (tap_mac()), the alias
    "kvmagent", is enslaved and set up.  It is not persistent: it disappears
    when the last fd is closed.  The fds are O_CLOEXEC; the caller hands them
    to QEMU with pass_fds= when it starts QEMU (which makes them inheritable
    in the child only) as `-netdev tap,fd=N` or `fds=N:M:...`, and closes its own
    copies once QEMU runs.  On any error the fds are closed and no tap is left.
    """
    netlink.check_ifname(name, "tap name")
    netlink.check_ifname(bridge, "bridge name")
    if not 1 <= queues <= MAX_QUEUES:
        raise config_error(f"invalid number of tap queues {queues}", f"1 to {MAX_QUEUES}")
    flags = tap_flags(queues, vnet_hdr)
    fds: list[int] = []
    try:
        with netlink.in_netns(netns), netlink.IPRoute() as ipr:
            try:
                br = netlink.bridge_link(netlink.get_link(ipr, bridge), bridge)
                if _index(name) is not None:  # cheap ioctl; netlink only if taken
                    _clear_name(ipr, name)
                for _ in range(queues):
                    fds.append(_open_tun())
                    _attach(fds[-1], name, flags)
                _check_created(ipr, fds[0], name, queues)
                _set_up(ipr, name, br)
            except netlink.NetlinkError as e:
                raise netlink.netlink_error(f"cannot set up tap {name} on {bridge}", e) from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _set_up(ipr: netlink.IPRoute, name: str, br: Any) -> None:
    ipr.link("set", index=_index(name), mtu=br.get_attr("IFLA_MTU"), address=tap_mac(name),
             master=br["index"], ifalias=TAP_ALIAS, state="up")


def configure_tap(name: str, bridge: str, queues: int = 1) -> None:
    """Finish a tap that tundev.create_tap() made (in another process, which
    holds its fds): the bridge's MTU, its own MAC, the alias, enslaved, up."""
    try:
        with netlink.IPRoute() as ipr:
            br = netlink.bridge_link(netlink.get_link(ipr, bridge), bridge)
            tap = netlink.get_link(ipr, name)
            data = {} if tap is None else netlink.info_data(tap)
            # QEMU may have disabled queues the guest has not enabled yet; more
            # than ours: another process attached to the same multiqueue tap.
            attached = (data.get("IFLA_TUN_NUM_QUEUES", 1)
                        + data.get("IFLA_TUN_NUM_DISABLED_QUEUES", 0))
            if tap is None or (queues > 1 and attached != queues):
                raise _in_use(name)
            _set_up(ipr, name, br)
    except netlink.NetlinkError as e:
        raise netlink.netlink_error(f"cannot set up tap {name} on {bridge}", e) from None
