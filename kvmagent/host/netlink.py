"""The netlink base of kvmagent's taps (kvmagent.host.netdev) and bridges
(kvmagent.host.bridge): pyroute2's IPRoute, imported lean
(kvmagent.host.leanimport), a network namespace to work in, and the
interface facts and checks both need.

netns= (a name under /run/netns, or a path) runs the netlink socket *and* the
/dev/net/tun open in that namespace; in_netns() moves the calling thread only
(setns(2) is per thread).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
from collections.abc import Iterator
from typing import Any

from kvmagent.errors import ExitStatus, KvmagentError, config_error, host_error
from kvmagent.host import leanimport
from kvmagent.names import IFNAMSIZ

# pyroute2 is imported after this call, on purpose (E402): see kvmagent.host.leanimport.
leanimport.enter("pyroute2")  # its IPRoute without every other module (~90 ms)
try:
    from pyroute2.iproute.linux import IPRoute  # noqa: E402
    from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402
except ImportError as e:  # a pyroute2 laid out otherwise than Debian 12's and 13's
    raise leanimport.missing("pyroute2", e) from None

__all__ = ["BRIDGE_HINT", "IFF_UP", "IPRoute", "NETNS_DIR", "NetlinkError", "RT_SCOPE_LINK",
           "bridge_link", "check_ifname", "get_link", "host_addresses", "in_netns", "info_data",
           "link_kind", "netlink_error"]

NETNS_DIR = "/run/netns"
IFF_UP = 0x1
CLONE_NEWNET = 0x40000000
RT_SCOPE_LINK = 253

BRIDGE_HINT = ("create it with 'kvmagent bridge ensure {0}', or declare it in "
               "the host's network configuration: systemd.netdev(5) with "
               "Kind=bridge, or bridge_ports in /etc/network/interfaces "
               "(bridge-utils-interfaces(5))")

_libc = ctypes.CDLL(None, use_errno=True)


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


def get_link(ipr: IPRoute, name: str) -> Any | None:
    """The RTM_NEWLINK message of interface NAME, or None."""
    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise


def link_kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return None if info is None else info.get_attr("IFLA_INFO_KIND")


def info_data(link: Any) -> dict[str, Any]:
    info = link.get_attr("IFLA_LINKINFO")
    data = None if info is None else info.get_attr("IFLA_INFO_DATA")
    if data is None or not hasattr(data, "get"):
        return {}
    return {key: value for key, value in data.get("attrs", [])}


def netlink_error(action: str, e: NetlinkError) -> KvmagentError:
    return KvmagentError(f"{action}: {os.strerror(e.code)} (netlink)", None,
                         ExitStatus.NOPERMISSION if e.code == errno.EPERM else ExitStatus.FAILURE)


def check_ifname(name: str, what: str) -> None:
    # The kernel's dev_valid_name(), plus IFNAMSIZ counted in bytes.
    if (not name or len(name.encode()) > IFNAMSIZ or name in (".", "..")
            or re.search(r"[/:\s]", name)):
        raise config_error(f"invalid {what} {name!r}",
                           f"1-{IFNAMSIZ} bytes, no '/', ':' or white space")


def bridge_link(link: Any, bridge: str) -> Any:
    """LINK (the message for BRIDGE, or None) if it is a bridge, else an error."""
    if link is None:
        raise host_error(f"bridge {bridge} does not exist", BRIDGE_HINT.format(bridge))
    if (kind := link_kind(link)) != "bridge":
        raise host_error(f"{bridge} is a {kind or 'physical'} interface, not a bridge",
                         f"a guest's network must name a bridge; rename or remove {bridge}")
    return link


def host_addresses() -> list[str]:
    """This host's IP addresses (not link-local ones), interface by interface."""
    with IPRoute() as ipr:
        try:
            return [str(a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS"))
                    for a in ipr.get_addr() if a["scope"] < RT_SCOPE_LINK]
        except NetlinkError as e:
            raise netlink_error("cannot list addresses", e) from None
