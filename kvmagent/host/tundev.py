"""Tap devices on /dev/net/tun: the ioctls only, in the standard library.

Creating a tap is one TUNSETIFF ioctl; naming its MTU, MAC and bridge is
netlink's job (kvmagent.host.netdev, pyroute2).  Split so that the supervisor can
create a guest's taps itself at once, hand them to QEMU, and have them
configured over netlink while QEMU initialises (pyroute2's import takes a
quarter of a second): QEMU starts paused, and the guest runs only after the
taps are on their bridge.  A name that is already taken goes the slow way,
netdev.open_tap(), which tells a stale tap from a foreign interface."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from typing import TYPE_CHECKING

from kvmagent.errors import ExitStatus, KvmagentError, host_error
from kvmagent.render.plan import Tap

if TYPE_CHECKING:  # the supervisor imports this module
    from collections.abc import Callable

TUN_PATH = "/dev/net/tun"
VHOST_NET_PATH = "/dev/vhost-net"

# <linux/if_tun.h>: _IOW('T', 202, int), _IOR('T', 210, unsigned int); the
# direction bits differ on these architectures.
_IOC_ALT = os.uname().machine.startswith(("ppc", "mips", "sparc"))
TUNSETIFF = (0x80000000 if _IOC_ALT else 0x40000000) | 0x000454CA
TUNGETIFF = (0x40000000 if _IOC_ALT else 0x80000000) | 0x000454D2
IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, flags (40 bytes)
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_PERSIST = 0x0800
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000


class TapTaken(KvmagentError):
    """The name is in use: netdev.open_tap() sorts out whose it is."""


def tap_flags(queues: int, vnet_hdr: bool = True) -> int:
    return (IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
            | (IFF_MULTI_QUEUE if queues > 1 else 0))


def errno_status(code: int | None) -> ExitStatus:
    return (ExitStatus.NOPERMISSION if code in (errno.EACCES, errno.EPERM)
            else ExitStatus.FAILURE)


def in_use(name: str, ours: bool = False) -> KvmagentError:
    holder = "another kvmagent QEMU" if ours else "another process"
    return KvmagentError(f"tap {name} is in use by {holder}",
                         "is the guest already running? stop it first")


def open_tun() -> int:
    try:
        return os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise host_error(f"{TUN_PATH} is missing",
                         "load the tun module (modprobe tun); a container "
                         "needs the device passed in") from None
    except OSError as e:
        raise KvmagentError(f"cannot open {TUN_PATH}: {e.strerror}",
                            "taps need root (CAP_NET_ADMIN)", errno_status(e.errno)) from None


def attach(fd: int, name: str, flags: int) -> None:
    try:
        fcntl.ioctl(fd, TUNSETIFF, IFREQ.pack(name.encode(), flags))
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise in_use(name) from None
        raise KvmagentError(f"cannot create tap {name}: {e.strerror}",
                            None, errno_status(e.errno)) from None


def ifindex(name: str) -> int | None:
    """NAME's ifindex in this thread's netns (an ioctl, no netlink), or None."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def persistent(fd: int) -> bool:
    """Did TUNSETIFF attach FD to an existing persistent tap (a race with
    another process) rather than create ours?"""
    return bool(IFREQ.unpack(fcntl.ioctl(fd, TUNGETIFF, bytes(IFREQ.size)))[1] & IFF_PERSIST)


def create_tap(name: str, queues: int = 1, vnet_hdr: bool = True) -> list[int]:
    """A new tap NAME, down and on no bridge, as QUEUES O_CLOEXEC fds; TapTaken
    if the name exists.  netdev.configure_tap() finishes it.  Nothing is left
    on failure."""
    if ifindex(name) is not None:
        raise TapTaken(f"interface {name} exists")
    fds: list[int] = []
    try:
        for _ in range(queues):
            fds.append(open_tun())
            attach(fds[-1], name, tap_flags(queues, vnet_hdr))
        if persistent(fds[0]):
            raise in_use(name)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def vhost_fd() -> int | None:
    """An O_CLOEXEC fd of /dev/vhost-net for `vhostfd=` (passed like the tap
    fds), or None where the host has no vhost-net."""
    try:
        return os.open(VHOST_NET_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
            return None
        raise KvmagentError(f"cannot open {VHOST_NET_PATH}: {e.strerror}") from None


Taps = list[Tap]  # kvmagent.render.plan's


def open_taps(taps: Taps, vhost: bool,
              opener: Callable[[str, str, int], list[int]]) -> tuple[dict[int, str], list[int]]:
    """Open each tap with OPENER(name, bridge, queues) (and a vhost-net fd
    per queue where the host has vhost-net).  Value: nic index -> QEMU's
    -netdev tap options naming the fds' positions in the list as {N}."""
    fds: list[int] = []
    options: dict[int, str] = {}
    try:
        for index, tap, bridge, queues in taps:
            tap_pos = [len(fds) + i for i in range(queues)]
            fds += opener(tap, bridge, queues)
            vhost_pos = []
            for _ in range(queues if vhost else 0):
                vfd = vhost_fd()
                if vfd is None:
                    break
                vhost_pos.append(len(fds))
                fds.append(vfd)
            plural = "" if queues == 1 else "s"
            opt = f"fd{plural}=" + ":".join(f"{{{i}}}" for i in tap_pos)
            if vhost_pos:
                opt += f",vhostfd{plural}=" + ":".join(f"{{{i}}}" for i in vhost_pos)
            options[index] = opt
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return options, fds
