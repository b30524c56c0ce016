"""Bridges over netlink (pyroute2), in-process: ensure_bridge() creates or
adjusts one (`kvmagent bridge ensure`: idempotent; an uplink carrying the
host's addresses is refused rather than enslaved), bridge_report() lists
them with their ports (`kvmagent bridge list`), each tap attributed to its
guest.  The taps are kvmagent.host.netdev's."""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kvmagent.errors import config_error, host_error
from kvmagent.host import netlink
from kvmagent.names import TAP_PREFIX, tap_guest

USER_HZ = 100  # bridge timers are clock_t (centiseconds) over netlink

# Bridge timers: netlink attribute and the kernel's range in seconds.
_TIMERS = {"forward_delay": ("IFLA_BR_FORWARD_DELAY", 2, 30),
           "hello_time": ("IFLA_BR_HELLO_TIME", 1, 10),
           "max_age": ("IFLA_BR_MAX_AGE", 6, 40)}


@dataclass(frozen=True)
class PortInfo:
    name: str
    kind: str | None  # "tun", "veth", ... (None: a physical NIC)
    mac: str
    mtu: int
    up: bool
    carrier: bool
    kvmagent_tap: bool  # the name is under names.TAP_PREFIX
    guest: str | None  # owning guest; "?" if unknown; None if not a tap


@dataclass(frozen=True)
class BridgeInfo:
    name: str
    mtu: int
    up: bool
    stp: bool
    forward_delay: float  # seconds
    hello_time: float
    max_age: float
    addresses: tuple[str, ...]
    ports: tuple[PortInfo, ...]


def _parse_cidr(address: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    hint = "an address with its prefix length, e.g. 10.0.0.1/24 or fd00::1/64"
    try:
        iface = ipaddress.ip_interface(address)
    except ValueError as e:
        raise config_error(f"invalid bridge address {address!r}: {e}", hint) from None
    if "/" not in address:
        raise config_error(f"bridge address {address!r} lacks a prefix length", hint)
    net = iface.network
    if (iface.version == 4 and net.prefixlen < 31
            and iface.ip in (net.network_address, net.broadcast_address)):
        raise config_error(f"bridge address {address!r} is not a host address", hint)
    return iface


def _bridge_mac(name: str) -> str:
    tail = hashlib.sha256(f"bridge/{name}".encode()).digest()[:5]
    return "02:" + ":".join(f"{b:02x}" for b in tail)  # local, unicast


def _global_addresses(addrs: Iterable[Any], index: int) -> list[str]:
    """Interface INDEX's addresses in ADDRS (RTM_NEWADDR messages), as
    ADDRESS/PREFIX, not link-local ones."""
    return [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
            for a in addrs if a["index"] == index and a["scope"] < netlink.RT_SCOPE_LINK]


def _enslave_uplink(ipr: netlink.IPRoute, br: Any, bridge: str, uplink: str) -> list[str]:
    link = netlink.get_link(ipr, uplink)
    if link is None:
        raise host_error(f"uplink {uplink} of bridge {bridge} does not exist",
                         "name an existing NIC, or leave the uplink out")
    changes = []
    master = link.get_attr("IFLA_MASTER")
    if master != br["index"]:
        if master:
            owner = ipr.get_links(master)[0].get_attr("IFLA_IFNAME")
            raise host_error(f"uplink {uplink} already belongs to {owner}",
                             f"release it from {owner} first")
        addresses = _global_addresses(ipr.get_addr(index=link["index"]), link["index"])
        if addresses:
            raise host_error(
                f"uplink {uplink} carries {', '.join(addresses)}; enslaving it "
                "would cut the host off that address",
                f"move the address to {bridge} in the host's network "
                "configuration (or pass address=) and remove it from the uplink")
        ipr.link("set", index=link["index"], master=br["index"])
        changes.append(f"enslaved {uplink}")
    if not link["flags"] & netlink.IFF_UP:
        ipr.link("set", index=link["index"], state="up")
        changes.append(f"set {uplink} up")
    return changes


def _ensure_address(ipr: netlink.IPRoute, index: int,
                    iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> list[str]:
    """The bridge has address IFACE: added, or changed from the same IP with
    another prefix length (which IPv4 would take as a second address and
    IPv6 refuse).  Other addresses are the admin's: left alone."""
    family = socket.AF_INET if iface.version == 4 else socket.AF_INET6
    old = None
    for a in ipr.get_addr(index=index, family=family):
        if str(iface.ip) in (a.get_attr("IFA_LOCAL"), a.get_attr("IFA_ADDRESS")):
            if a["prefixlen"] == iface.network.prefixlen:
                return []
            old = a["prefixlen"]
    if old is not None:
        ipr.addr("del", index=index, address=str(iface.ip), prefixlen=old, family=family)
    try:
        ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen,
                 family=family)
    except netlink.NetlinkError as e:
        if e.code == errno.EACCES and iface.version == 6:  # not a permission: IPv6 is off
            name = ipr.link("get", index=index)[0].get_attr("IFLA_IFNAME")
            raise host_error(f"cannot add address {iface.with_prefixlen} to {name}: IPv6 is "
                             f"disabled there (net.ipv6.conf.{name}.disable_ipv6 = 1)",
                             "enable IPv6 on the bridge, or give it an IPv4 address") from None
        raise
    if old is not None:
        return [f"changed address {iface.ip}/{old} to {iface.with_prefixlen}"]
    return [f"added address {iface.with_prefixlen}"]


def ensure_bridge(name: str = "br-kvm", *, uplink: str | None = None,
                  address: str | None = None, stp: bool = False,
                  forward_delay: float = 9, hello_time: float = 2,
                  max_age: float = 12, netns: str | None = None) -> list[str]:
    """Create or adjust bridge NAME (defaults: the seed's br-kvm settings).

    Idempotent: returns one line per change made, [] if nothing changed.
    Times are in seconds here, centiseconds (clock_t) on the wire.  An
    uplink that carries host addresses is refused rather than enslaved.  A
    bridge created without uplink gets a fixed MAC (else it would take the
    lowest tap MAC and change it as guests come and go); with one, it takes
    the uplink's (lower than any fe: tap MAC).
    """
    netlink.check_ifname(name, "bridge name")
    if uplink is not None:
        netlink.check_ifname(uplink, "uplink")
        if uplink == name:
            raise config_error(f"bridge {name} cannot be its own uplink")
    iface = None if address is None else _parse_cidr(address)
    wanted = {"IFLA_BR_STP_STATE": int(stp)}
    lines = {"IFLA_BR_STP_STATE": f"set stp {'on' if stp else 'off'}"}
    given = {"forward_delay": forward_delay, "hello_time": hello_time, "max_age": max_age}
    for key, value in given.items():
        attr, low, high = _TIMERS[key]
        if not low <= value <= high:
            raise config_error(f"bridge {key} {value} s is out of range",
                               f"the kernel accepts {low} to {high} s")
        wanted[attr] = round(value * USER_HZ)
        lines[attr] = f"set {key} {value:g} s"
    changes: list[str] = []
    with netlink.in_netns(netns), netlink.IPRoute() as ipr:
        try:
            link = netlink.get_link(ipr, name)
            created = False
            if link is None:
                mac = {} if uplink else {"address": _bridge_mac(name)}
                try:
                    ipr.link("add", ifname=name, kind="bridge", **mac,
                             **{a[5:].lower(): v for a, v in wanted.items()})
                    created = True
                    changes.append(f"created bridge {name}")
                except netlink.NetlinkError as e:
                    if e.code != errno.EEXIST:
                        raise  # (EEXIST: made meanwhile by another `bridge ensure`)
                link = ipr.link("get", ifname=name)[0]
            if not created:
                have = netlink.info_data(netlink.bridge_link(link, name))
                diff = {a: v for a, v in wanted.items() if have.get(a) != v}
                if diff:
                    ipr.link("set", index=link["index"], kind="bridge",
                             **{a[5:].lower(): v for a, v in diff.items()})
                changes += [lines[a] for a in diff]
            if uplink is not None:
                changes += _enslave_uplink(ipr, link, name, uplink)
            if iface is not None:
                changes += _ensure_address(ipr, link["index"], iface)
            if not link["flags"] & netlink.IFF_UP:
                ipr.link("set", index=link["index"], state="up")
                changes.append("set up")
        except netlink.NetlinkError as e:
            raise netlink.netlink_error(f"cannot set up bridge {name}", e) from None
    return changes


def bridge_report(guests: Mapping[str, str] | None = None, *,
                  netns: str | None = None) -> list[BridgeInfo]:
    """All bridges with their ports; taps under TAP_PREFIX are attributed to
    their guest (GUESTS: optional tap name -> guest mapping)."""
    with netlink.in_netns(netns), netlink.IPRoute() as ipr:
        try:
            links = list(ipr.get_links())
            addrs = list(ipr.get_addr())
        except netlink.NetlinkError as e:
            raise netlink.netlink_error("cannot list interfaces", e) from None
    report = []
    for br in links:
        if netlink.link_kind(br) != "bridge":
            continue
        data = netlink.info_data(br)
        ports = []
        for link in links:
            if link.get_attr("IFLA_MASTER") != br["index"]:
                continue
            pname = link.get_attr("IFLA_IFNAME")
            ports.append(PortInfo(
                name=pname, kind=netlink.link_kind(link), mac=link.get_attr("IFLA_ADDRESS"),
                mtu=link.get_attr("IFLA_MTU"), up=bool(link["flags"] & netlink.IFF_UP),
                carrier=bool(link.get_attr("IFLA_CARRIER")),
                kvmagent_tap=pname.startswith(TAP_PREFIX),
                guest=tap_guest(pname, guests)))
        report.append(BridgeInfo(
            name=br.get_attr("IFLA_IFNAME"), mtu=br.get_attr("IFLA_MTU"),
            up=bool(br["flags"] & netlink.IFF_UP), stp=bool(data.get("IFLA_BR_STP_STATE")),
            forward_delay=data.get("IFLA_BR_FORWARD_DELAY", 0) / USER_HZ,
            hello_time=data.get("IFLA_BR_HELLO_TIME", 0) / USER_HZ,
            max_age=data.get("IFLA_BR_MAX_AGE", 0) / USER_HZ,
            addresses=tuple(_global_addresses(addrs, br["index"])),
            ports=tuple(sorted(ports, key=lambda p: p.name))))
    return sorted(report, key=lambda b: b.name)
