"""Taps and bridges over netlink (pyroute2), in-process.

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

netns= (a name under /run/netns, or a path) runs the netlink socket *and* the
/dev/net/tun open in that namespace; in_netns() moves the calling thread only
(setns(2) is per thread).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import ipaddress
import os
import re
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from kvmagent.errors import ExitStatus, KvmagentError, config_error, host_error
from kvmagent.host import leanimport
from kvmagent.host.tundev import attach as _attach, in_use as _in_use
from kvmagent.host.tundev import ifindex as _index, open_tun as _open_tun, persistent, tap_flags
from kvmagent.host.tundev import vhost_fd  # noqa: F401 - kvmagent's tap API is here
from kvmagent.names import IFNAMSIZ, TAP_PREFIX, tap_name, valid_guest_name

# pyroute2 is imported after this call, on purpose (E402): see kvmagent.host.leanimport.
leanimport.enter("pyroute2")  # its IPRoute without every other module (~90 ms)
try:
    from pyroute2.iproute.linux import IPRoute  # noqa: E402
    from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402
except ImportError as e:  # a pyroute2 laid out otherwise than Debian 12's and 13's
    raise leanimport.missing("pyroute2", e) from None

NETNS_DIR = "/run/netns"
TAP_ALIAS = "kvmagent"  # IFLA_IFALIAS of the taps open_tap() made
MAX_QUEUES = 256  # MAX_TAP_QUEUES in drivers/net/tun.c
IFLA_TUN_TYPE_TAP = 2
IFF_UP = 0x1
CLONE_NEWNET = 0x40000000
USER_HZ = 100  # bridge timers are clock_t (centiseconds) over netlink
RT_SCOPE_LINK = 253

# Bridge timers: netlink attribute and the kernel's range in seconds.
_TIMERS = {"forward_delay": ("IFLA_BR_FORWARD_DELAY", 2, 30),
           "hello_time": ("IFLA_BR_HELLO_TIME", 1, 10),
           "max_age": ("IFLA_BR_MAX_AGE", 6, 40)}
_BRIDGE_HINT = ("create it with 'kvmagent bridge ensure {0}', or declare it in "
                "the host's network configuration: systemd.netdev(5) with "
                "Kind=bridge, or bridge_ports in /etc/network/interfaces "
                "(bridge-utils-interfaces(5))")

_libc = ctypes.CDLL(None, use_errno=True)


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


# -- namespaces and netlink helpers ------------------------------------------

def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@contextlib.contextmanager
def in_netns(netns: str | None) -> Iterator[None]:
    """Run the block with this thread in network namespace NETNS (None: stay).

    Only the calling thread moves; it is moved back even if the block fails.
    Threads started inside the block inherit the namespace.
    """
    if netns is None:
        yield
        return
    path = netns if "/" in netns else os.path.join(NETNS_DIR, netns)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise host_error(f"network namespace {netns} does not exist") from None
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
    except OSError as e:
        os.close(home)
        raise KvmagentError(f"cannot enter network namespace {netns}: {e.strerror}") from None
    finally:
        os.close(target)
    try:
        yield
    finally:
        _setns(home)
        os.close(home)


def _link(ipr: IPRoute, name: str) -> Any | None:
    """The RTM_NEWLINK message of interface NAME, or None."""
    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise


def _kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return None if info is None else info.get_attr("IFLA_INFO_KIND")


def _info_data(link: Any) -> dict[str, Any]:
    info = link.get_attr("IFLA_LINKINFO")
    data = None if info is None else info.get_attr("IFLA_INFO_DATA")
    if data is None or not hasattr(data, "get"):
        return {}
    return {key: value for key, value in data.get("attrs", [])}


def _netlink_error(action: str, e: NetlinkError) -> KvmagentError:
    return KvmagentError(f"{action}: {os.strerror(e.code)} (netlink)", None,
                         ExitStatus.NOPERMISSION if e.code == errno.EPERM else ExitStatus.FAILURE)


def _check_ifname(name: str, what: str) -> None:
    # The kernel's dev_valid_name(), plus IFNAMSIZ counted in bytes.
    if (not name or len(name.encode()) > IFNAMSIZ or name in (".", "..")
            or re.search(r"[/:\s]", name)):
        raise config_error(f"invalid {what} {name!r}",
                           f"1-{IFNAMSIZ} bytes, no '/', ':' or white space")


# -- taps ----------------------------------------------------------------------

def tap_mac(name: str) -> str:
    """The tap's own MAC: fe: plus 5 bytes of a hash of its name.

    0xfe is locally administered and higher than any vendor prefix, so the
    bridge (which takes the lowest port MAC) never adopts a tap's address,
    and the guest's MAC (52:54:00:...) is only ever seen inside the guest.
    """
    tail = hashlib.sha256(name.encode()).digest()[:5]
    return "fe:" + ":".join(f"{b:02x}" for b in tail)


def _bridge(link: Any, bridge: str) -> Any:
    """LINK (the message for BRIDGE, or None) if it is a bridge, else an error."""
    if link is None:
        raise host_error(f"bridge {bridge} does not exist", _BRIDGE_HINT.format(bridge))
    if (kind := _kind(link)) != "bridge":
        raise host_error(f"{bridge} is a {kind or 'physical'} interface, not a bridge",
                         f"a guest's network must name a bridge; rename or remove {bridge}")
    return link


def _clear_name(ipr: IPRoute, name: str) -> None:
    """Make NAME free for a new tap: remove a stale tap of ours, refuse the rest."""
    link = _link(ipr, name)
    if link is None:
        return
    data = _info_data(link)
    kind = _kind(link)
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


def _check_created(ipr: IPRoute, fd: int, name: str, queues: int) -> None:
    """Refuse if a racing process made tap NAME between our check and
    TUNSETIFF, so that we attached to its tap instead of creating ours."""
    raced = persistent(fd)
    if queues > 1 and not raced:  # a multiqueue tap takes extra queues
        tap = _link(ipr, name)
        raced = tap is None or _info_data(tap).get("IFLA_TUN_NUM_QUEUES") != queues
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
    _check_ifname(name, "tap name")
    _check_ifname(bridge, "bridge name")
    if not 1 <= queues <= MAX_QUEUES:
        raise config_error(f"invalid number of tap queues {queues}", f"1 to {MAX_QUEUES}")
    flags = tap_flags(queues, vnet_hdr)
    fds: list[int] = []
    try:
        with in_netns(netns), IPRoute() as ipr:
            try:
                br = _bridge(_link(ipr, bridge), bridge)
                if _index(name) is not None:  # cheap ioctl; netlink only if taken
                    _clear_name(ipr, name)
                for _ in range(queues):
                    fds.append(_open_tun())
                    _attach(fds[-1], name, flags)
                _check_created(ipr, fds[0], name, queues)
                _set_up(ipr, name, br)
            except NetlinkError as e:
                raise _netlink_error(f"cannot set up tap {name} on {bridge}", e) from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _set_up(ipr: IPRoute, name: str, br: Any) -> None:
    ipr.link("set", index=_index(name), mtu=br.get_attr("IFLA_MTU"), address=tap_mac(name),
             master=br["index"], ifalias=TAP_ALIAS, state="up")


def configure_tap(name: str, bridge: str, queues: int = 1) -> None:
    """Finish a tap that tundev.create_tap() made (in another process, which
    holds its fds): the bridge's MTU, its own MAC, the alias, enslaved, up."""
    try:
        with IPRoute() as ipr:
            br = _bridge(_link(ipr, bridge), bridge)
            tap = _link(ipr, name)
            data = {} if tap is None else _info_data(tap)
            # QEMU may have disabled queues the guest has not enabled yet; more
            # than ours: another process attached to the same multiqueue tap.
            attached = (data.get("IFLA_TUN_NUM_QUEUES", 1)
                        + data.get("IFLA_TUN_NUM_DISABLED_QUEUES", 0))
            if tap is None or (queues > 1 and attached != queues):
                raise _in_use(name)
            _set_up(ipr, name, br)
    except NetlinkError as e:
        raise _netlink_error(f"cannot set up tap {name} on {bridge}", e) from None


# -- bridges -------------------------------------------------------------------

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


def _global_addresses(ipr: IPRoute, index: int) -> list[str]:
    return [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
            for a in ipr.get_addr(index=index) if a["scope"] < RT_SCOPE_LINK]


def _enslave_uplink(ipr: IPRoute, br: Any, bridge: str, uplink: str) -> list[str]:
    link = _link(ipr, uplink)
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
        addresses = _global_addresses(ipr, link["index"])
        if addresses:
            raise host_error(
                f"uplink {uplink} carries {', '.join(addresses)}; enslaving it "
                "would cut the host off that address",
                f"move the address to {bridge} in the host's network "
                "configuration (or pass address=) and remove it from the uplink")
        ipr.link("set", index=link["index"], master=br["index"])
        changes.append(f"enslaved {uplink}")
    if not link["flags"] & IFF_UP:
        ipr.link("set", index=link["index"], state="up")
        changes.append(f"set {uplink} up")
    return changes


def _ensure_address(ipr: IPRoute, index: int,
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
    except NetlinkError as e:
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
    _check_ifname(name, "bridge name")
    if uplink is not None:
        _check_ifname(uplink, "uplink")
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
    with in_netns(netns), IPRoute() as ipr:
        try:
            link = _link(ipr, name)
            created = False
            if link is None:
                mac = {} if uplink else {"address": _bridge_mac(name)}
                try:
                    ipr.link("add", ifname=name, kind="bridge", **mac,
                             **{a[5:].lower(): v for a, v in wanted.items()})
                    created = True
                    changes.append(f"created bridge {name}")
                except NetlinkError as e:
                    if e.code != errno.EEXIST:
                        raise  # (EEXIST: made meanwhile by another `bridge ensure`)
                link = ipr.link("get", ifname=name)[0]
            if not created:
                have = _info_data(_bridge(link, name))
                diff = {a: v for a, v in wanted.items() if have.get(a) != v}
                if diff:
                    ipr.link("set", index=link["index"], kind="bridge",
                             **{a[5:].lower(): v for a, v in diff.items()})
                changes += [lines[a] for a in diff]
            if uplink is not None:
                changes += _enslave_uplink(ipr, link, name, uplink)
            if iface is not None:
                changes += _ensure_address(ipr, link["index"], iface)
            if not link["flags"] & IFF_UP:
                ipr.link("set", index=link["index"], state="up")
                changes.append("set up")
        except NetlinkError as e:
            raise _netlink_error(f"cannot set up bridge {name}", e) from None
    return changes


def tap_guest(name: str, guests: Mapping[str, str] | None = None) -> str | None:
    """The guest that owns tap NAME: from GUESTS (tap name -> guest) if given,
    else read from kvm-NAME-INDEX; "?" for a hashed long name; None if NAME
    is not under TAP_PREFIX."""
    if guests and name in guests:
        return guests[name]
    if not name.startswith(TAP_PREFIX):
        return None
    m = re.fullmatch(r"(.+)-(\d+)", name[len(TAP_PREFIX):])
    if (m is None or not valid_guest_name(m[1])
            or tap_name(m[1], int(m[2])) != name):
        return "?"
    # kvm-PREFIX-HASH-INDEX of a long name reads like a short name: ambiguous.
    hashed = re.fullmatch(r"(.+)-[0-9a-f]{4}", m[1])
    if hashed:
        room = IFNAMSIZ - len(TAP_PREFIX) - len(f"-abcd-{m[2]}")
        if len(hashed[1]) in (room, room - 1):
            return "?"
    return m[1]


def bridge_report(guests: Mapping[str, str] | None = None, *,
                  netns: str | None = None) -> list[BridgeInfo]:
    """All bridges with their ports; taps under TAP_PREFIX are attributed to
    their guest (GUESTS: optional tap name -> guest mapping)."""
    with in_netns(netns), IPRoute() as ipr:
        try:
            links = list(ipr.get_links())
            addrs = list(ipr.get_addr())
        except NetlinkError as e:
            raise _netlink_error("cannot list interfaces", e) from None
    report = []
    for br in links:
        if _kind(br) != "bridge":
            continue
        data = _info_data(br)
        ports = []
        for link in links:
            if link.get_attr("IFLA_MASTER") != br["index"]:
                continue
            pname = link.get_attr("IFLA_IFNAME")
            ports.append(PortInfo(
                name=pname, kind=_kind(link), mac=link.get_attr("IFLA_ADDRESS"),
                mtu=link.get_attr("IFLA_MTU"), up=bool(link["flags"] & IFF_UP),
                carrier=bool(link.get_attr("IFLA_CARRIER")),
                kvmagent_tap=pname.startswith(TAP_PREFIX),
                guest=tap_guest(pname, guests)))
        report.append(BridgeInfo(
            name=br.get_attr("IFLA_IFNAME"), mtu=br.get_attr("IFLA_MTU"),
            up=bool(br["flags"] & IFF_UP), stp=bool(data.get("IFLA_BR_STP_STATE")),
            forward_delay=data.get("IFLA_BR_FORWARD_DELAY", 0) / USER_HZ,
            hello_time=data.get("IFLA_BR_HELLO_TIME", 0) / USER_HZ,
            max_age=data.get("IFLA_BR_MAX_AGE", 0) / USER_HZ,
            addresses=tuple(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                            for a in addrs if a["index"] == br["index"]
                            and a["scope"] < RT_SCOPE_LINK),
            ports=tuple(sorted(ports, key=lambda p: p.name))))
    return sorted(report, key=lambda b: b.name)


def host_addresses() -> list[str]:
    """This host's IP addresses (not link-local ones), interface by interface."""
    with IPRoute() as ipr:
        try:
            return [str(a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS"))
                    for a in ipr.get_addr() if a["scope"] < RT_SCOPE_LINK]
        except NetlinkError as e:
            raise _netlink_error("cannot list addresses", e) from None
