"""Names derived from a guest's name: unit names, tap names, MACs, UUIDs.

All functions are pure.  A guest name is restricted (not escaped) so that it
is at once a valid systemd instance name, a machined machine name (a host
name label), a file name and the stem of a network interface name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# fullmatch, not "$": "$" also matches before a trailing newline.
GUEST_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?", re.ASCII)
GUEST_NAME_RULE = ("1-64 characters: lower-case letters, digits and '-', "
                   "starting and ending with a letter or digit")

IFNAMSIZ = 15  # bytes of an interface name, without the terminating NUL
TAP_PREFIX = "kvm-"

# Namespace for the stable per-guest UUID (uuid5 of the guest name).
_UUID_NAMESPACE = "6f1d5f6e-2b0c-4f3e-9a57-6b766d616765"


def valid_guest_name(name: str) -> bool:
    return GUEST_NAME_RE.fullmatch(name) is not None and "--" not in name


def service_unit(name: str) -> str:
    """The supervisor's unit: kvm@NAME.service."""
    return f"kvm@{name}.service"


def oneoff_unit(name: str) -> str:
    """The service of a one-off guest (kvmagent start --transient FILE) and
    of a guest's install run (kvmagent install NAME --iso FILE).  Not
    kvm@NAME.service: systemd refuses a transient unit of that name where
    the kvm@.service template exists."""
    return f"kvm-oneoff@{name}.service"


def guest_unit(name: str, oneoff: bool) -> str:
    """The unit a guest's supervisor runs in: kvm@NAME.service, or for a
    one-off guest and an install run kvm-oneoff@NAME.service."""
    return oneoff_unit(name) if oneoff else service_unit(name)


def scope_unit(name: str) -> str:
    """The transient scope that holds QEMU (and only QEMU)."""
    return f"kvm-{name}.scope"


def _digest(text: str) -> bytes:
    import hashlib  # only for long names: loading OpenSSL costs every start ~5 ms
    return hashlib.sha256(text.encode()).digest()


def tap_name(guest: str, index: int) -> str:
    """Deterministic tap name, at most IFNAMSIZ bytes: kvm-NAME-INDEX.

    Long guest names are cut and get a 4-hex-digit hash of the whole name,
    so two long names with the same prefix still get different taps:
    kvm-PREFIX-HASH-INDEX.  Collisions between guests (a short name that
    happens to look like a hashed one) are caught by the validation of all
    guests together, not here.
    """
    plain = f"{TAP_PREFIX}{guest}-{index}"
    if len(plain.encode()) <= IFNAMSIZ:
        return plain
    suffix = f"-{_digest(guest).hex()[:4]}-{index}"
    room = IFNAMSIZ - len(TAP_PREFIX) - len(suffix)
    return f"{TAP_PREFIX}{guest[:room].rstrip('-')}{suffix}"


def default_mac(guest: str, index: int) -> str:
    """A stable MAC for NIC number INDEX of GUEST: 52:54:00 (QEMU's locally
    administered prefix) plus three bytes of a hash of name and index."""
    tail = _digest(f"{guest}/nic{index}")[:3]
    return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)


def guest_uuid(guest: str) -> str:
    """A stable SMBIOS/machined UUID for the guest."""
    import uuid  # not for every command: it imports platform (~5 ms)
    return str(uuid.uuid5(uuid.UUID(_UUID_NAMESPACE), guest))


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
