"""What the installed QEMU supports, asked of the binary itself, not assumed
from its version (a Debian 12 host has QEMU 7.2, a Debian 13 host QEMU 10.0,
and builds differ: seccomp, VNC and user networking are build options).

One QMP session with an empty machine answers everything at once: version,
machine types, device types, accelerators, option groups, CPU models and the QAPI
schema (for the values of -action panic= and the netdev backends).  The
answer is plain data (QemuCaps), cached in the state directory keyed by the
binary's path and stat, so a start reads a small file instead of spawning
QEMU; a changed binary (an upgrade, another path) is asked again.

qemu_problems() is pure: the guest's QEMU command line (kvmagent.render.qemu, so
whatever the argv uses is checked, nothing listed twice) against QemuCaps,
as host errors naming the file, key and value that need what is missing.
Only the planner child and the CLI import this module, never the supervisor.
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator

from kvmagent.config.model import Bus, Guest, HostConfig
from kvmagent.config.schema import DEFAULT_CPU, did_you_mean
from kvmagent.errors import KvmagentError, host_error
from kvmagent.render.qemu import HostFacts, Sockets, qemu_argv

# Bumped whenever what is asked or kept changes: a cache of another format
# is simply asked again.
CACHE_FORMAT = 2  # 2: CPU models
PROBE_TIMEOUT = 10.0  # an empty machine answers in ~0.1 s; a busy host is slower

# The session, written to QEMU's stdin at once: QMP runs commands in order,
# and "quit" ends it.  Replies come back in the same order, events between.
PROBE_COMMANDS: tuple[dict[str, Any], ...] = (
    {"execute": "qmp_capabilities"},
    {"execute": "query-version"},
    {"execute": "query-machines"},
    {"execute": "qom-list-types", "arguments": {"implements": "device", "abstract": False}},
    {"execute": "qom-list-types", "arguments": {"implements": "accel"}},
    {"execute": "query-command-line-options"},
    {"execute": "query-qmp-schema"},
    {"execute": "query-cpu-definitions"},
    {"execute": "quit"},
)

# Options whose presence depends on the build or the version (seccomp, VNC,
# 6.0's -action); the others kvmagent uses are in every QEMU it can run.
OPTIONAL_OPTIONS = frozenset({"sandbox", "vnc", "action", "add-fd"})


@dataclass(frozen=True)
class QemuCaps:
    """What one QEMU binary answered."""

    binary: str
    version: tuple[int, int, int]
    package: str  # e.g. "Debian 1:7.2+dfsg-7+deb12u18"
    machines: frozenset[str]  # names and their aliases ("pc", "q35")
    aliases: dict[str, str]  # alias -> machine type ("pc" -> "pc-i440fx-7.2")
    deprecated: frozenset[str]  # machine types QEMU will remove in a coming release
    devices: frozenset[str]  # device types that can be created
    accels: frozenset[str]  # "kvm", "tcg"
    options: frozenset[str]  # option groups of the command line ("sandbox", "vnc", ...)
    sandbox: frozenset[str]  # parameters of -sandbox
    panic_actions: frozenset[str]  # values of -action panic=
    netdevs: frozenset[str]  # -netdev backends ("tap", "user")
    cpu_models: frozenset[str]  # -cpu models and their aliases ("Westmere", "host", "max")
    cpu_unsafe: frozenset[str]  # models QEMU says are not migration-safe ("host", "max")

    @property
    def name(self) -> str:
        """How messages name this QEMU: version, package and binary."""
        version = ".".join(map(str, self.version))
        package = f", {self.package}" if self.package else ""
        return f"QEMU {version} ({self.binary}{package})"


# ---------------------------------------------------------------- parsing

def _replies(transcript: str) -> list[Any]:
    """The "return" of each command, in order; the greeting and events are
    skipped, an "error" reply is a host error."""
    out = []
    for line in transcript.splitlines():
        if not line.strip():
            continue
        msg = json.loads(line)
        if "return" in msg:
            out.append(msg["return"])
        elif "error" in msg:
            raise ValueError(f"QMP error: {msg['error'].get('desc', msg['error'])}")
    return out


def _schema_enum(schema: list[dict[str, Any]], command: str, member: str) -> frozenset[str]:
    """Values of the enum that is argument MEMBER of COMMAND (the schema's
    type names are opaque numbers: only commands keep their names)."""
    types = {entry["name"]: entry for entry in schema}
    args = types.get(types.get(command, {}).get("arg-type", ""), {})
    for m in args.get("members", ()):
        if m["name"] == member:
            return frozenset(types.get(m["type"], {}).get("values", ()))
    return frozenset()


def _schema_variants(schema: list[dict[str, Any]], command: str) -> frozenset[str]:
    """The cases of the union that is COMMAND's argument (netdev_add: the
    -netdev backends this build has)."""
    types = {entry["name"]: entry for entry in schema}
    args = types.get(types.get(command, {}).get("arg-type", ""), {})
    return frozenset(v["case"] for v in args.get("variants", ()))


def parse_transcript(binary: str, transcript: str) -> QemuCaps:
    """QemuCaps from QEMU's stdout for PROBE_COMMANDS.  Pure: the unit tests
    feed it recorded answers of real QEMUs."""
    replies = _replies(transcript)
    if len(replies) != len(PROBE_COMMANDS):
        raise ValueError(f"{len(replies)} QMP replies for {len(PROBE_COMMANDS)} commands")
    _, version, machines, devices, accels, options, schema, cpus, _ = replies
    q = version["qemu"]
    names = {m["name"] for m in machines}
    aliases = {m["alias"]: m["name"] for m in machines if m.get("alias")}
    deprecated = frozenset(m["name"] for m in machines if m.get("deprecated"))
    sandbox: frozenset[str] = frozenset()
    for opt in options:
        if opt["option"] == "sandbox":
            sandbox = frozenset(p["name"] for p in opt["parameters"])
    return QemuCaps(
        binary=binary,
        version=(q["major"], q["minor"], q["micro"]),
        package=version.get("package", "").strip(),
        machines=frozenset(names | set(aliases)),
        aliases=aliases,
        deprecated=deprecated,
        devices=frozenset(t["name"] for t in devices),
        accels=frozenset(t["name"].removesuffix("-accel") for t in accels
                         if t["name"] != "accel"),
        options=frozenset(o["option"] for o in options),
        sandbox=sandbox,
        panic_actions=_schema_enum(schema, "set-action", "panic"),
        netdevs=_schema_variants(schema, "netdev_add"),
        cpu_models=frozenset(c["name"] for c in cpus),
        cpu_unsafe=frozenset(c["name"] for c in cpus if not c.get("migration-safe")),
    )


# ---------------------------------------------------------------- probing

def probe_argv(qemu: Path) -> list[str]:
    """An empty machine, paused, QMP on stdio.  TCG with split-wx, as guests
    run it: the probe also runs in kvm@.service's sandbox, where a
    writable and executable mapping is refused (KVM as the fallback of a
    build without TCG)."""
    return [str(qemu), "-machine", "none", "-nodefaults", "-no-user-config",
            "-display", "none", "-S", "-accel", "tcg,split-wx=on", "-accel", "kvm",
            "-qmp", "stdio"]


def _answered(out: bytes) -> bool:
    """Whether OUT holds a reply (return or error) to every probe command.
    QEMU stops at the end of its QMP input even with replies still unwritten
    (a pipe holds 64 KiB; the answers are ~300 KiB): its input stays open
    until they are all read."""
    replies = 0
    for line in out.splitlines(keepends=True):
        if line.endswith(b"\n") and (line.startswith(b'{"return"') or line.startswith(b'{"error"')):
            replies += 1
    return replies >= len(PROBE_COMMANDS)


def probe(qemu: Path, timeout: float = PROBE_TIMEOUT) -> QemuCaps:
    """Ask QEMU itself.  An argv, never a shell; a fixed locale, so that
    its messages are the same everywhere; killed after TIMEOUT."""
    import select
    import subprocess  # only here: a start that finds the cache never needs it (~2 ms)
    import time
    session = "".join(json.dumps(c) + "\n" for c in PROBE_COMMANDS)
    env = {"LANG": "C", "LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    why = "kvmagent asks it what it supports before it starts a guest"
    try:
        proc = subprocess.Popen(probe_argv(qemu), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env)
    except OSError as e:
        raise host_error(f"{qemu}: cannot run QEMU: {e.strerror}", why) from None
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    out, err = bytearray(), bytearray()
    deadline = time.monotonic() + timeout
    try:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(session.encode())
            proc.stdin.flush()
        streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
        while streams and not _answered(bytes(out)):
            left = deadline - time.monotonic()
            if left <= 0:
                raise host_error(f"{qemu}: QEMU did not answer within {timeout:g} s", why)
            for fd in select.select(list(streams), [], [], left)[0]:
                data = os.read(fd, 65536)
                if data:
                    streams[fd] += data
                else:
                    del streams[fd]
        proc.stdin.close()  # QEMU ends at the end of its input
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise host_error(f"{qemu}: QEMU did not answer within {timeout:g} s", why) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                f.close()
    stderr = err.decode(errors="replace").strip()
    try:
        if proc.returncode != 0:
            raise ValueError(f"exit status {proc.returncode}")
        return parse_transcript(str(qemu), out.decode(errors="replace"))
    except (ValueError, KeyError, TypeError) as e:
        detail = f": {stderr.splitlines()[-1]}" if stderr else ""
        raise host_error(f"{qemu}: QEMU did not say what it supports ({e}){detail}",
                         why) from None


# ---------------------------------------------------------------- the cache

def binary_key(qemu: Path) -> list[Any]:
    """What identifies one build of QEMU here: its path and the stat of the
    file it leads to (an upgrade replaces the file: a new inode and ctime)."""
    st = os.stat(qemu)
    return [str(qemu), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def cache_file(cache_dir: Path, qemu: Path) -> Path:
    """One file per binary path.  A checksum names it, not a hash (hashlib
    loads OpenSSL, ~2 ms of every start): two paths that share a name only
    ask QEMU again, as the key inside tells them apart."""
    return cache_dir / f"qemu-caps-{zlib.crc32(os.fsencode(qemu)):08x}.json"


def _to_json(caps: QemuCaps) -> dict[str, Any]:
    return {k: sorted(v) if isinstance(v, frozenset) else v for k, v in asdict(caps).items()}


_KINDS: dict[str, Any] = {"str": str, "tuple": tuple, "dict": dict, "frozenset": frozenset}


def _from_json(doc: dict[str, Any]) -> QemuCaps:
    """_to_json's inverse, each field made the kind QemuCaps declares (a
    field added there needs nothing here)."""
    return QemuCaps(**{f.name: _KINDS[str(f.type).partition("[")[0]](doc[f.name])
                       for f in fields(QemuCaps)})


def read_cache(path: Path, key: list[Any]) -> QemuCaps | None:
    """The cached answer for this binary, or None: missing, unreadable,
    corrupt, of another format or of another binary all mean "ask again"."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if doc.get("format") != CACHE_FORMAT or doc.get("key") != key:
            return None
        return _from_json(doc["caps"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_cache(path: Path, key: list[Any], caps: QemuCaps) -> None:
    """Atomically (a temporary file renamed over it): a start reading it at
    the same moment sees the old file or the new one, never half of one.
    A cache that cannot be written (not root, a read-only file system) only
    costs the next start a probe."""
    import tempfile  # only here, as subprocess in probe()
    doc = {"format": CACHE_FORMAT, "key": key, "caps": _to_json(caps)}
    try:
        fd, tmp = tempfile.mkstemp(prefix=".qemu-caps-", dir=path.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, separators=(",", ":"))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


_MEMO: dict[tuple[Any, ...], QemuCaps] = {}


def capabilities(qemu: Path, cache_dir: Path) -> QemuCaps:
    """QEMU's answer: from this process's memory, else the cache, else the
    binary itself (then cached).  A start waiting for its devices checks
    again every half second: it stats the binary, nothing more."""
    try:
        key = binary_key(qemu)
    except OSError as e:  # gone since the host checks saw it (an upgrade under way)
        raise host_error(f"{qemu}: {e.strerror}", "apt-get install qemu-system-x86") from None
    memo = tuple(key)
    if memo in _MEMO:
        return _MEMO[memo]
    path = cache_file(cache_dir, qemu)
    caps = read_cache(path, key)
    if caps is None:
        caps = probe(qemu)
        # Replaced while it was asked (an upgrade under way): use the
        # answer, but do not file it under a key it may not belong to.
        if binary_key(qemu) == key:
            write_cache(path, key, caps)
    _MEMO[memo] = caps
    return caps


# ---------------------------------------------------------------- the check

def qemu_notices(guest: Guest, caps: QemuCaps) -> list[str]:
    """What works today but will not with a coming QEMU: a deprecated
    machine type (QEMU deprecates versioned ones after three years and
    removes them after six; Debian 13's 10.0 has none of pc-i440fx-2.0's
    age).  A notice, not a problem: the guest starts."""
    machine = caps.aliases.get(guest.machine, guest.machine)
    if machine not in caps.deprecated:
        return []
    return [f"{guest.origin_of('machine')}: machine = \"{guest.machine}\" is deprecated in "
            f"{caps.name} and will be removed from a coming release; "
            f"\"pc\" or \"q35\" is its newest"]


# The options kvmagent writes without an argument; every other takes one
# (which may itself start with "-", as a kernel command line can).
FLAGS = frozenset({"no-user-config", "nodefaults", "S", "no-shutdown"})


def _options(argv: list[str]) -> Iterator[tuple[str, str | None]]:
    """(option, its argument or None) of kvmagent's QEMU command line."""
    i = 1
    while i < len(argv):
        opt = argv[i].removeprefix("-")
        value = None if opt in FLAGS or i + 1 >= len(argv) else argv[i + 1]
        yield opt, value
        i += 1 if value is None else 2


def _params(value: str) -> dict[str, str]:
    """"a,b=c,id=x" -> {"": "a", "b": "c", "id": "x"} (the first part is the
    type or driver); ",," inside a value is a comma and splits nothing."""
    parts = value.replace(",,", "\0").split(",")
    out: dict[str, str] = {}
    for n, part in enumerate(parts):
        part = part.replace("\0", ",")
        k, eq, v = part.partition("=")
        if n == 0 and not eq:
            out[""] = part
        else:
            out[k] = v if eq else "on"
    return out


def _index(ident: str, prefix: str) -> int | None:
    rest = ident.removeprefix(prefix).removesuffix("-dev")
    return int(rest) if ident.startswith(prefix) and rest.isdigit() else None


def qemu_problems(guest: Guest, host: HostConfig, facts: HostFacts,
                  caps: QemuCaps) -> list[KvmagentError]:
    """Every machine type, accelerator, device, option and value the guest's
    QEMU command line uses that this QEMU lacks, each a host error naming
    the file and key that asks for it (kvmagent's own needs name the qemu
    key of kvmagent.toml).  The guest's verbatim extra_args are not checked:
    they are the admin's, and QEMU's own message names them."""
    argv = qemu_argv(guest, host, facts, Sockets.in_dir(Path("/run")))
    if guest.extra_args:
        argv = argv[:-len(guest.extra_args)]
    problems: list[KvmagentError] = []
    qemu_key = f"{host.origin.get('qemu', 'kvmagent.toml')}: qemu = \"{host.qemu}\""
    own_hint = ("kvmagent needs a QEMU with seccomp support, such as Debian 12's 7.2 "
                "or Debian 13's 10.0 (package qemu-system-x86)")

    def guest_key(key: str, value: object) -> str:
        return f"{guest.origin_of(key)}: {key} = \"{value}\""

    def lacks(where: str, what: str, hint: str | None) -> None:
        problems.append(host_error(f"{where}: {caps.name} has no {what}", hint))

    def device_owner(kind: str, ident: str) -> tuple[str, str | None]:
        n = _index(ident, "disk")
        if n is not None:
            d = guest.disks[n]
            return (guest_key(f"disk[{n}].bus", d.bus),
                    "use another bus for this disk (virtio, ide or scsi)")
        n = _index(ident, "net")
        if n is not None:
            return (guest_key(f"nic[{n}].model", guest.nics[n].model),
                    "use another model for this nic (virtio, e1000 or rtl8139)")
        if ident == "scsi0":
            n = next(d.index for d in guest.disks if d.bus is Bus.SCSI)
            return guest_key(f"disk[{n}].bus", Bus.SCSI), 'use bus = "virtio" for this disk'
        if guest.display.vnc and kind in ("VGA", "qemu-xhci", "usb-tablet"):
            return guest_key("display.vnc", guest.display.vnc), "remove [display] vnc"
        return qemu_key, own_hint

    for opt, value in _options(argv):
        if opt in OPTIONAL_OPTIONS and opt not in caps.options:
            if opt == "vnc":
                lacks(guest_key("display.vnc", guest.display.vnc), "VNC (it was built "
                      "without it)", "remove [display] vnc")
            else:
                lacks(qemu_key, f"option -{opt}", own_hint)
            continue
        if value is None:
            continue
        p = _params(value)
        kind = p.get("", "")
        if opt == "machine" and facts.machine not in (None, guest.machine):
            pass  # a pinned type: kvmagent.host.hostcheck names the pin's file
        elif opt == "machine" and kind not in caps.machines:
            newest = ", ".join(f'"{a}" ({caps.aliases[a]})' for a in ("pc", "q35")
                               if a in caps.aliases)
            lacks(guest_key("machine", kind), "such machine type",
                  f"use a machine type it has: {newest}" if newest else None)
        elif opt == "cpu" and kind not in caps.cpu_models:
            lacks(guest_key("cpu", guest.cpu), "such CPU model",
                  did_you_mean(kind, sorted(caps.cpu_models)) or
                  f'use "host" or a model that `{host.qemu} -cpu help` lists, such as '
                  f'"{DEFAULT_CPU}"')
        elif opt == "accel" and kind not in caps.accels:
            lacks(guest_key("accel", guest.accel), f"{kind.upper()} accelerator",
                  'use accel = "tcg" or "kvm", whichever it has')
        elif opt == "device" and kind not in caps.devices:
            where, hint = device_owner(kind, p.get("id", ""))
            lacks(where, f"device {kind}", hint)
        elif opt == "netdev" and kind not in caps.netdevs:
            n = _index(p.get("id", ""), "net")
            where = qemu_key if n is None else guest_key(f"nic[{n}].mode", guest.nics[n].mode)
            lacks(where, f"network backend {kind} (-netdev {kind})",
                  'use mode = "bridge"' if kind == "user" else own_hint)
        elif opt == "sandbox" and caps.sandbox:
            missing = sorted(set(p) - {""} - caps.sandbox)
            if missing:
                lacks(qemu_key, f"-sandbox {', '.join(missing)}", own_hint)
        elif opt == "action" and "panic" in p and p["panic"] not in caps.panic_actions:
            lacks(qemu_key, f"-action panic={p['panic']} (QEMU 7.1 added it)", own_hint)
    return problems
