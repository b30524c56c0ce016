"""Parsers for the value types of the configuration: sizes, durations, CPU
lists, MAC addresses.  Pure functions; each raises ValueError with a short
reason, which the config layer turns into a message naming file and key.

Patterns are ASCII-only and matched whole (fullmatch): "\\d" would accept
Arabic-Indic digits, "$" a trailing newline, and re.IGNORECASE the Kelvin
sign for "K"."""

from __future__ import annotations

import re

_SIZE_RE = re.compile(r" *([0-9]{1,20}) *([KMGT]?)(i?B)? *", re.IGNORECASE | re.ASCII)
_SIZE_FACTORS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

_DURATION_TOKEN = re.compile(r"([0-9]{1,20}(?:\.[0-9]{1,20})?) *([a-z]*) *", re.ASCII)
_DURATION_UNITS = {
    "us": 1e-6, "usec": 1e-6,
    "ms": 1e-3, "msec": 1e-3,
    "": 1.0, "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
}

_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", re.ASCII)
# Larger than any duration or CPU number kvmagent accepts, small enough to
# convert to float: TOML integers are unbounded.
_MAX_INT = 10 ** 12


def parse_size(value: object) -> int:
    """IEC size string ("512M", "1G", "2T", "4096K", "1GiB") -> bytes.

    Plain integers are refused on purpose: `memory = 1024` would be bytes to
    us and MiB to QEMU's -m; the unit must be written out."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError('expected a size string with a unit, e.g. "512M" or "2G"')
    m = _SIZE_RE.fullmatch(value)
    if not m:
        raise ValueError('expected a size such as "512M", "2G" (suffixes K, M, G, T)')
    number, unit = int(m.group(1)), m.group(2).upper()
    return number * _SIZE_FACTORS[unit]


def format_size(nbytes: int) -> str:
    for unit in ("T", "G", "M", "K"):
        factor = _SIZE_FACTORS[unit]
        if nbytes >= factor and nbytes % factor == 0:
            return f"{nbytes // factor}{unit}"
    return f"{nbytes}B"


def parse_duration(value: object) -> float:
    """Seconds from an integer or a systemd-style string ("90s", "5min",
    "1min 30s", "500ms")."""
    if isinstance(value, bool):
        raise ValueError('expected a duration such as "90s" or "5min"')
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        if value > _MAX_INT:
            raise ValueError("too large for a duration")
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError('expected a duration such as "90s" or "5min", or integer seconds')
    text = value.strip(" ").lower()
    total, pos = 0.0, 0
    while pos < len(text):
        m = _DURATION_TOKEN.match(text, pos)
        if not m or m.end() == pos or m.group(2) not in _DURATION_UNITS:
            raise ValueError('expected a duration such as "90s", "5min" or "1min 30s" '
                             "(units: ms, s, min, h, d)")
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return total


def format_duration(seconds: float) -> str:
    if seconds and seconds % 60 == 0:
        return f"{int(seconds // 60)}min"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{int(round(seconds * 1000))}ms"


def parse_cpu_list(value: object, max_cpu: int = 4095) -> tuple[int, ...]:
    """CPU affinity: "0-3,6" or a list of integers -> sorted unique CPUs."""
    cpus: set[int] = set()
    out_of_range = ValueError(f"CPU numbers must be between 0 and {max_cpu}")
    if isinstance(value, list):
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int):
                raise ValueError("expected CPU numbers, e.g. [0, 1] or \"0-3,6\"")
            cpus.add(item)
    elif isinstance(value, str) and value.strip():
        for part in value.split(","):
            part = part.strip()
            m = re.fullmatch(r"([0-9]{1,9})(?:-([0-9]{1,9}))?", part, re.ASCII)
            if not m:
                raise ValueError(f"bad CPU range {part[:40]!r}; expected e.g. \"0-3,6\"")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) else lo
            if hi < lo:
                raise ValueError(f"bad CPU range {part!r}: end before start")
            if hi > max_cpu:  # before expanding: "0-999999999" is not a list to build
                raise out_of_range
            cpus.update(range(lo, hi + 1))
    else:
        raise ValueError("expected a CPU list such as \"0-3,6\" or [0, 1]")
    if not cpus:
        raise ValueError("empty CPU list")
    if any(c < 0 or c > max_cpu for c in cpus):
        raise out_of_range
    return tuple(sorted(cpus))


def format_cpu_list(cpus: tuple[int, ...]) -> str:
    """(0,1,2,3,6) -> "0-3,6", the form systemd's AllowedCPUs= prints."""
    parts: list[str] = []
    start = prev = None
    for c in cpus:
        if start is None:
            start = prev = c
        elif c == prev + 1:  # type: ignore[operator]
            prev = c
        else:
            parts.append(f"{start}-{prev}" if start != prev else f"{start}")
            start = prev = c
    if start is not None:
        parts.append(f"{start}-{prev}" if start != prev else f"{start}")
    return ",".join(parts)


def parse_mac(value: object) -> str:
    if not isinstance(value, str) or not _MAC_RE.fullmatch(value.lower()):
        raise ValueError('expected a MAC address such as "52:54:00:12:34:56"')
    mac = value.lower()
    first = int(mac[:2], 16)
    if first & 1:
        raise ValueError("a multicast MAC (odd first byte) cannot be a NIC address")
    if mac == "00:00:00:00:00:00":
        raise ValueError("the all-zero MAC is not a NIC address")
    return mac


def parse_escape(value: object) -> str:
    """Console escape key in caret notation, "^]" (default) or "^Q": returns
    the control character itself."""
    if isinstance(value, str) and len(value) == 2 and value[0] == "^" and value.isascii():
        c = value[1].upper()
        if "@" <= c <= "_":
            return chr(ord(c) - 64)
    raise ValueError('expected a control key in caret notation, e.g. "^]" or "^Q"')
