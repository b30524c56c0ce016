"""How `kvmagent migrate` carries a guest's state (#20), pure: the
--transport option and the address the destination listens on.

ssh (the default): the stream goes through the ssh session that also
carries the control (encrypted, authenticated by the admin's keys).
tcp[:ADDR[:PORT]] and tcp:CIDR[:PORT]: the control still goes over ssh,
the stream over plain TCP, unencrypted, for a dedicated migration
network: the destination listens on ADDR (one of its own addresses), on
its address in the network CIDR, or, with neither, on the address the ssh
session reached it at; on PORT, or on a free port its kernel picks.  An
IPv6 address or network with a port is written in brackets:
tcp:[fd00::2]:4444, tcp:[fd00::/64]:4444."""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

from kvmagent.errors import ExitStatus, KvmagentError

FORMS = "ssh, tcp, tcp:ADDR[:PORT] or tcp:CIDR[:PORT] (IPv6 with a port: tcp:[ADDR]:PORT)"
SSH, TCP = "ssh", "tcp"


class Transport(NamedTuple):
    kind: str  # SSH or TCP
    address: str | None = None  # tcp: the destination's address to listen on
    network: str | None = None  # tcp: ... or its address in this network
    port: int = 0  # tcp: 0: a free port, the destination's kernel picks it

    def __str__(self) -> str:
        """The option's text again (what migrate-incoming is given)."""
        where = self.address or self.network
        if self.kind == SSH or (where is None and not self.port):
            return self.kind
        if where is None:
            raise AssertionError("a port without an address")  # parse never makes one
        if not self.port:
            return f"tcp:{where}"
        return f"tcp:[{where}]:{self.port}" if ":" in where else f"tcp:{where}:{self.port}"


def _usage(text: str, why: str) -> KvmagentError:
    return KvmagentError(f"--transport {text!r}: {why}", f"give {FORMS}", ExitStatus.USAGE)


def _where(text: str, part: str) -> tuple[str | None, str | None]:
    """(address, network) of PART, an address or a network in CIDR form."""
    try:
        if "/" in part:
            return None, str(ipaddress.ip_network(part, strict=False))
        return str(ipaddress.ip_address(part)), None
    except ValueError:
        raise _usage(text, f"{part!r} is neither an IP address nor a network "
                     "(ADDR/PREFIX)") from None


def parse_transport(text: str) -> Transport:
    """--transport's value; KvmagentError (usage, exit 2) otherwise."""
    if text in (SSH, TCP):
        return Transport(text)
    kind, colon, rest = text.partition(":")
    if kind != TCP or not colon or not rest:
        raise _usage(text, "not a transport")
    port_text: str | None = None
    if rest.startswith("["):
        part, close, tail = rest[1:].partition("]")
        if not close or (tail and not tail.startswith(":")):
            raise _usage(text, "no ']' after the address, or no ':PORT' after it")
        port_text = tail[1:] if tail else None
        if tail and not port_text:
            raise _usage(text, "no port after ':'")
    elif rest.count(":") == 1:  # an IPv4 address or network, a port
        part, _, port_text = rest.partition(":")
    else:  # an address or network alone (IPv6 ones have colons of their own)
        part = rest
    address, network = _where(text, part)
    port = 0
    if port_text is not None:
        if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise _usage(text, f"port {port_text!r} is not a number from 1 to 65535")
        port = int(port_text)
    return Transport(TCP, address, network, port)


def listen_address(transport: Transport, local: list[str], ssh_connection: str | None) -> str:
    """Where the destination listens: ADDR if it is one of LOCAL (this host's
    addresses), its address in the network, or the one the ssh session
    reached it at (SSH_CONNECTION: "client port server port").  KvmagentError
    (host not ready, exit 5) naming what was looked for and what is there."""
    have = ", ".join(local) or "none"
    if transport.address is not None:
        wanted = ipaddress.ip_address(transport.address)
        if not any(_same(wanted, a) for a in local):
            raise KvmagentError(f"--transport {transport}: {transport.address} is not an "
                                f"address of this host (it has: {have})",
                                "give the address of this host on the migration network",
                                ExitStatus.HOST_NOT_READY)
        return str(wanted)
    if transport.network is not None:
        net = ipaddress.ip_network(transport.network)
        for a in local:
            addr = _address(a)
            if addr is not None and addr.version == net.version and addr in net:
                return str(addr)
        raise KvmagentError(f"--transport {transport}: this host has no address in "
                            f"{transport.network} (it has: {have})",
                            "give the migration network's address on this host first",
                            ExitStatus.HOST_NOT_READY)
    words = (ssh_connection or "").split()
    if len(words) == 4 and _address(words[2]) is not None:
        return str(_address(words[2]))
    raise KvmagentError(f"--transport {transport}: no ssh session says which address of "
                        "this host to listen on (SSH_CONNECTION is not set)",
                        "give the address: --transport tcp:ADDR", ExitStatus.HOST_NOT_READY)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped  # how sshd may name an IPv4 peer on a dual-stack socket
    return addr


def _same(wanted: ipaddress.IPv4Address | ipaddress.IPv6Address, text: str) -> bool:
    return _address(text) == wanted


def endpoint(address: str, port: int) -> str:
    """ADDR:PORT as people and ssh write it ([ADDR]:PORT for IPv6)."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def warning(name: str, address: str, port: int) -> str:
    """What the source says on stderr, loudly, before a TCP migration."""
    return (f"WARNING: guest {name}'s memory and device state go to {endpoint(address, port)} "
            "over plain TCP, UNENCRYPTED: anyone on that network can read them (and the "
            "one-time token that admits the stream protects the destination only against "
            "strangers connecting first). Use --transport tcp on a dedicated migration "
            "network only; ssh (the default) encrypts.")
