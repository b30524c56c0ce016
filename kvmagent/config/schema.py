"""The settings table: every configuration key, its type, default and
documentation, and the pure (first-stage) validation that turns merged TOML
into the frozen model.  docs/kvmagent.toml.5.md documents exactly these keys
(a unit test keeps the two in step)."""

from __future__ import annotations

import json
import re
import uuid as uuidlib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Callable

from kvmagent.config import values
from kvmagent.config.layers import DEFAULT, Layered, key_str
from kvmagent.config.model import (Accel, BootClass, Bus, Cache, Format, Media, NicMode,
                                   NicModel, OnPoweroff, OnReboot)
from kvmagent.errors import KvmagentError, config_error


@dataclass(frozen=True)
class Key:
    name: str
    type: str  # as the documentation states it
    default: str  # as the documentation states it ("" = not set)
    doc: str
    parse: Callable[[Any], Any]


# -- value parsers (raise ValueError with a reason) ---------------------------

# C0 and C1 control characters and DEL: a newline would end a line of a
# unit file or the journal, NUL a C string; none belongs in a name or path.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _text(max_len: int = 4096, pattern: str | None = None,
          rule: str = "") -> Callable[[Any], str]:
    rx = re.compile(pattern, re.ASCII) if pattern else None

    def parse(v: Any) -> str:
        if not isinstance(v, str):
            raise ValueError("expected a string")
        if _CONTROL.search(v):
            raise ValueError("must not contain newlines, NUL bytes or other control characters")
        if len(v) > max_len:
            raise ValueError(f"longer than {max_len} characters")
        if rx and not rx.fullmatch(v):
            raise ValueError(rule or f"must match {pattern}")
        return v
    return parse


def _integer(lo: int, hi: int) -> Callable[[Any], int]:
    def parse(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError("expected an integer")
        if not lo <= v <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return v
    return parse


def _boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("expected true or false")
    return v


def _choice(enum: type[StrEnum]) -> Callable[[Any], StrEnum]:
    def parse(v: Any) -> StrEnum:
        try:
            return enum(v)
        except ValueError:
            raise ValueError("expected one of " + ", ".join(
                f'"{m.value}"' for m in enum)) from None
    return parse


def _abs_path(v: Any) -> Path:
    text = _text()(v)
    if not text.startswith("/"):
        raise ValueError("expected an absolute path")
    return Path(text)


def _size(lo: int, hi: int, align: int = 1) -> Callable[[Any], int]:
    def parse(v: Any) -> int:
        n = values.parse_size(v)
        if not lo <= n <= hi:
            raise ValueError(f"must be between {values.format_size(lo) if lo else '0'} "
                             f"and {values.format_size(hi)}")
        if n % align:
            raise ValueError(f"must be a multiple of {values.format_size(align)}")
        return n
    return parse


def _duration(lo: float, hi: float) -> Callable[[Any], float]:
    def parse(v: Any) -> float:
        s = values.parse_duration(v)
        if not lo <= s <= hi:
            raise ValueError(f"must be between {values.format_duration(lo)} "
                             f"and {values.format_duration(hi)}")
        return s
    return parse


def _str_list(item: Callable[[Any], Any]) -> Callable[[Any], tuple[Any, ...]]:
    def parse(v: Any) -> tuple[Any, ...]:
        if not isinstance(v, list):
            raise ValueError("expected a list")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(item(x))
            except ValueError as e:
                raise ValueError(f"item {i}: {e}") from None
        return tuple(out)
    return parse


def _uuid(v: Any) -> str:
    try:
        return str(uuidlib.UUID(_text()(v)))
    except ValueError:
        raise ValueError("expected a UUID such as 6f1d5f6e-2b0c-4f3e-9a57-6b766d616765") from None


def parse_vnc(v: Any) -> str:
    """[display] vnc (and `kvmagent install --vnc`): ValueError with a reason."""
    # No "," or "=" in the socket path: QEMU would read "unix:/a=b" as an
    # option named "unix:/a".
    return _text(256, r"unix:/[^,=]+|(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]*):[0-9]{1,4}",
                 'expected "ADDRESS:DISPLAY" (e.g. "127.0.0.1:1") or "unix:/PATH"')(v)


def _extra_arg(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("expected a string")
    if "\0" in v:
        raise ValueError("must not contain NUL bytes")
    return v


_BRIDGE = _text(15, r"[A-Za-z0-9_.-]+", "expected an interface name (at most 15 of "
                "letters, digits, '-', '_', '.')")
_MACHINE = _text(64, r"[a-z0-9][a-z0-9._-]*",
                 'expected a QEMU machine type such as "pc" or "q35"')
# A model name alone: no ",+flag" (QEMU's own option syntax), so that the
# name is the whole -cpu value and can be checked against the host's QEMU.
_CPU = _text(64, r"[A-Za-z0-9][A-Za-z0-9._-]*",
             'expected "host" or a QEMU CPU model such as "Westmere"')
# Migratable, in QEMU 7.2 and 10.0, the x86-64-v2 level plus AES (what
# Proxmox VE 8 calls x86-64-v2-AES), and quiet under TCG: docs/kvmagent.toml.5.md.
DEFAULT_CPU = "Westmere"

# -- the table -----------------------------------------------------------------

HOST_KEYS: dict[str, Key] = {k.name: k for k in [
    Key("bridge", "string", '"br-kvm"', "Bridge for [[nic]] entries that name none.", _BRIDGE),
    Key("accel", '"auto", "kvm" or "tcg"', '"auto"',
        "Accelerator for guests that set none.", _choice(Accel)),
    Key("tcg_fallback", "boolean", "false",
        'Whether accel = "auto" may fall back to TCG (slow software emulation) when '
        "/dev/kvm does not work. By default such a guest does not start.", _boolean),
    Key("qemu", "absolute path", '"/usr/bin/qemu-system-x86_64"', "The QEMU binary.",
        _abs_path),
    Key("machine", "string", '"pc"', "Machine type for guests that set none.", _MACHINE),
    Key("cpu", "string", f'"{DEFAULT_CPU}"', "CPU model for guests that set none.", _CPU),
    Key("stop_timeout", "duration", '"90s"',
        "How long a guest gets to power off after the ACPI power button before QEMU is "
        "stopped hard, for guests without [stop] timeout.", _duration(1, 86400)),
    Key("memory_overhead", "size", '"256M"',
        "Added to a guest's memory for the MemoryMax= of its QEMU scope.",
        _size(0, 1 << 40)),
    Key("qemu_user", "user name", '"kvmagent-qemu"',
        "The unprivileged user QEMU runs as (the package creates it); its disks come as file "
        'descriptors, its kernel and initrd must be readable by it. "root" keeps QEMU root.',
        _text(32, r"^[a-z_][a-z0-9_-]*[$]?$", "expected a user name")),
    Key("device_timeout", "duration", '"90s"',
        "How long a starting guest waits for its bridges and disks to appear (at boot they "
        "may come late) before it fails with exit status 5.", _duration(0, 3600)),
]}

BRIDGE_KEYS: dict[str, Key] = {k.name: k for k in [
    Key("uplink", "interface name", "(none)", "Interface enslaved to the bridge.", _BRIDGE),
    Key("address", "CIDR string", "(none)", 'Address of the bridge, "10.0.0.1/24".',
        _text(64, r"[0-9a-fA-F.:]+/[0-9]{1,3}", 'expected an address with prefix, "10.0.0.1/24"')),
    Key("stp", "boolean", "false", "Spanning tree protocol.", _boolean),
    Key("forward_delay", "seconds (integer)", "9", "Forward delay.", _integer(2, 30)),
    Key("hello_time", "seconds (integer)", "2", "Hello time.", _integer(1, 10)),
    Key("max_age", "seconds (integer)", "12", "Max age.", _integer(6, 40)),
]}

GUEST_TOP: dict[str, Key] = {k.name: k for k in [
    Key("description", "string", '"KVM guest NAME"', "Shown by systemctl and machinectl.",
        _text(256)),
    Key("uuid", "UUID string", "derived from the name",
        "SMBIOS and machined UUID of the guest.", _uuid),
    Key("cpus", "integer 1-255", "1", "Number of virtual CPUs.", _integer(1, 255)),
    Key("memory", "size", '"512M"', "Guest RAM (16M to 16T, whole MiB).",
        _size(16 << 20, 16 << 40, 1 << 20)),
    Key("machine", "string", "host machine", 'QEMU machine type, "pc" or "q35"; the first '
        "start pins the versioned type it stands for.", _MACHINE),
    Key("cpu", "string", "host cpu", '"host": the host\'s own CPU, fastest, not migratable; '
        f'or a QEMU CPU model, such as "{DEFAULT_CPU}" (migratable).', _CPU),
    Key("accel", '"auto", "kvm" or "tcg"', "host accel",
        '"auto" uses KVM when /dev/kvm really works.', _choice(Accel)),
    Key("boot", 'list of "disk", "cdrom", "network"', '["disk", "cdrom"]',
        "Boot order by device class.", _str_list(_choice(BootClass))),
    Key("on_poweroff", '"stop" or "keep"', '"stop"',
        '"keep" leaves QEMU running with the guest stopped (for installs).',
        _choice(OnPoweroff)),
    Key("on_reboot", '"restart" or "stop"', '"restart"',
        '"stop": a guest reboot ends the run as a poweroff would.', _choice(OnReboot)),
]}

GUEST_TABLES: dict[str, dict[str, Key]] = {
    "kernel": {k.name: k for k in [
        Key("image", "absolute path", "", "Kernel for direct kernel boot.", _abs_path),
        Key("initrd", "absolute path", "", "Initial ramdisk.", _abs_path),
        Key("cmdline", "string", "", "Kernel command line.", _text(4096)),
    ]},
    "console": {k.name: k for k in [
        Key("serial", "boolean", "true", "Serial console (ttyS0) kept by kvmagent.", _boolean),
        Key("escape", "control key", '"^]"', "Key that leaves `kvmagent console`.",
            lambda v: (values.parse_escape(v), v)[1]),
        Key("log_burst", "integer 0-1000000", "1000",
            "At most this many console lines go to the journal per log_interval; the rest "
            "are counted and reported, not logged (viewers still see them). 0: none.",
            _integer(0, 1000000)),
        Key("log_interval", "duration", '"10s"', "The interval of log_burst.",
            _duration(1, 3600)),
    ]},
    "display": {k.name: k for k in [
        Key("vnc", "string", "", 'VNC display, "127.0.0.1:1" or "unix:/PATH"; none: headless.',
            parse_vnc),
    ]},
    "stop": {k.name: k for k in [
        Key("timeout", "duration", "host stop_timeout",
            "Time to power off after the ACPI power button.", _duration(1, 86400)),
    ]},
    "resources": {k.name: k for k in [
        Key("cpu_weight", "integer 1-10000", "", "CPUWeight= of the QEMU scope.",
            _integer(1, 10000)),
        Key("cpu_affinity", 'CPU list ("0-3,6" or [0, 1])', "",
            "AllowedCPUs= of the QEMU scope.", values.parse_cpu_list),
        Key("io_weight", "integer 1-10000", "", "IOWeight= of the QEMU scope.",
            _integer(1, 10000)),
        Key("tasks_max", "integer", "", "TasksMax= of the QEMU scope.",
            _integer(16, 1 << 22)),
    ]},
    "qemu": {k.name: k for k in [
        Key("extra_args", "list of strings", "[]",
            "Appended verbatim to QEMU's command line; the only escape hatch.",
            _str_list(_extra_arg)),
    ]},
}

GUEST_ARRAYS: dict[str, dict[str, Key]] = {
    "disk": {k.name: k for k in [
        Key("path", "absolute path", "(required)", "Block device or image file.", _abs_path),
        Key("bus", '"virtio", "ide" or "scsi"', '"virtio"', "Controller.", _choice(Bus)),
        Key("media", '"disk" or "cdrom"', '"disk"', "Kind of drive.", _choice(Media)),
        Key("format", '"raw" or "qcow2"', '"raw"', "Image format; never probed.",
            _choice(Format)),
        Key("readonly", "boolean", "false (true for cdrom)", "Read-only drive.", _boolean),
        Key("cache", '"auto", "none", "writeback", "writethrough", "directsync" or "unsafe"',
            '"auto"', '"auto": "none" with native AIO where O_DIRECT works, else "writeback".',
            _choice(Cache)),
        Key("boot", "boolean", "not set", "true: boot from this drive of its class; "
            "false: never.", _boolean),
    ]},
    "nic": {k.name: k for k in [
        Key("bridge", "string", "host bridge", "Bridge the tap is enslaved to.", _BRIDGE),
        Key("mac", "MAC address", "derived from name and index", "Guest MAC address.",
            values.parse_mac),
        Key("model", '"virtio", "e1000" or "rtl8139"', '"virtio"', "NIC model.",
            _choice(NicModel)),
        Key("mode", '"bridge" or "user"', '"bridge"',
            '"user": QEMU user-mode NAT, no tap.', _choice(NicMode)),
        Key("queues", "integer 1-16", "1", "Multiqueue virtio-net: tap queues, at most the "
            "guest's cpus.", _integer(1, 16)),
    ]},
}


def render(value: Any) -> str:
    """A configuration value as the admin wrote it (TOML-ish)."""
    try:
        return json.dumps(value)
    except TypeError:
        return str(value)


def shown(value: Any, limit: int = 80) -> str:
    """render(VALUE) for a message: a 1 MiB string is cut, not repeated."""
    text = render(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def shown_key(path: tuple[str | int, ...]) -> str:
    """key_str(PATH) for a message; a key that is not a bare TOML key
    (newlines, quotes, 1000 characters) is shown quoted and cut."""
    text = key_str(path)
    if re.fullmatch(r"[A-Za-z0-9_.\[\]-]{1,80}", text, re.ASCII):
        return text
    return shown(text)


def did_you_mean(word: str, choices: list[str]) -> str | None:
    if len(word) > 100:
        return None
    import difflib  # for a mistake only
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


class Reader:
    """Reads typed values out of a Layered config, recording origins and
    failing with file, key and value named."""

    def __init__(self, layered: Layered, fallback_file: Path) -> None:
        self.layered = layered
        self.fallback = str(fallback_file)
        self.origin: dict[str, str] = {}

    def file_of(self, path: tuple[str | int, ...]) -> str:
        return self.layered.origin.get(key_str(path)) or (
            self.layered.origin_of(path) if self.layered.files else self.fallback)

    def fail(self, path: tuple[str | int, ...], reason: str,
             hint: str | None = None) -> KvmagentError:
        return config_error(f"{self.file_of(path)}: {shown_key(path)}: {reason}", hint)

    def check_keys(self, table: dict[str, Any], keys: dict[str, Key] | list[str],
                   path: tuple[str | int, ...]) -> None:
        names = list(keys)
        for key in table:
            if key not in names:
                where = self.file_of(path + (key,))
                raise config_error(f"{where}: unknown key '{shown_key(path + (key,))}'",
                                   did_you_mean(key, names) or
                                   "see kvmagent.toml(5) for the keys")

    def value(self, table: dict[str, Any], keys: dict[str, Key],
              path: tuple[str | int, ...], name: str, default: Any,
              default_origin: str = DEFAULT) -> Any:
        here = path + (name,)
        if name not in table:
            self.origin[key_str(here)] = default_origin
            return default
        raw = table[name]
        try:
            parsed = keys[name].parse(raw)
        except ValueError as e:
            raise config_error(f"{self.file_of(here)}: {key_str(here)} = {shown(raw)}: {e}",
                               f"{name} is {keys[name].type}") from None
        self.origin[key_str(here)] = self.file_of(here)
        return parsed

    def table(self, data: dict[str, Any], name: str,
              keys: dict[str, Key]) -> dict[str, Any]:
        value = data.get(name, {})
        if not isinstance(value, dict):
            raise self.fail((name,), f"must be a table [{name}], not {shown(value)}",
                            f"write [{name}] on a line of its own, keys below it")
        self.check_keys(value, keys, (name,))
        return value

    def array(self, data: dict[str, Any], name: str,
              keys: dict[str, Key]) -> list[dict[str, Any]]:
        value = data.get(name, [])
        if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
            raise self.fail((name,), f"must be an array of tables [[{name}]]",
                            f"write one [[{name}]] block per {name}")
        for i, item in enumerate(value):
            self.check_keys(item, keys, (name, i))
        return value
