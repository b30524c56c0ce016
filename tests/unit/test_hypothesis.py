"""Property-based tests (hypothesis) over the configuration parser and the
QEMU argv builder: for any input, either a valid argv or the documented
configuration error (KvmagentError, exit status 6), never another
exception; and no value outside [qemu] extra_args (the admin's deliberate
escape hatch) ever adds a QEMU option, an option key, a newline or a NUL.

Deterministic and bounded: a few hundred examples each, a few seconds, no
example database written into the checkout.  The seed is fixed (SEED), not
derived from the test's source as derandomize does: where that source
cannot be read (compiled files that name the checkout by another path, as
a test host sees them), derandomize picks another seed, and other examples."""

from __future__ import annotations

import math
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from kvmagent import names
from kvmagent.config.layers import Layered, merge_into, parse_toml
from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.config.guests import build_guest, build_host_config, check_unique
from kvmagent.config.model import Accel, Guest
from kvmagent.render.qemu import HostFacts, Sockets, qemu_argv
from kvmagent.config.schema import GUEST_ARRAYS, GUEST_TABLES, GUEST_TOP, HOST_KEYS
from kvmagent.render.scope import render_settings, scope_settings

# Hypothesis caches Unicode tables in .hypothesis/ of the working directory;
# not in the checkout (or a package build tree), please.
set_hypothesis_home_dir(str(Path(tempfile.gettempdir()) / "kvmagent-hypothesis"))
SEED = 1979  # the same examples wherever the tests run (the module's docstring)
SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
GUEST_FILE = Path("/etc/kvmagent/guests/g.toml")
DROPIN = Path("/etc/kvmagent/guests/g.toml.d/50-x.toml")
HOST_FILE = Path("/etc/kvmagent/kvmagent.toml")

# -- TOML text from Python values (inline tables, so one line per key) --------


def toml_string(s: str) -> str:
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    assert isinstance(v, dict)
    return "{" + ", ".join(f"{toml_string(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml_doc(doc: dict[str, Any]) -> str:
    return "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in doc.items())


# -- strategies ---------------------------------------------------------------

# Characters that mean something to QEMU's option parser, a shell, a unit
# file, a path or a terminal, plus look-alikes.
NASTY = list(",=\n\r\x00\t -/:;\"'\\[]{}#.@$%*?~\x1b\x7f\u0085\u2028\u00df\u212a\u0665é€ｇ")
chars = st.one_of(st.sampled_from(NASTY), st.characters(blacklist_categories=("Cs",)))
text = st.text(alphabet=chars, max_size=24)
abs_path = text.map(lambda t: "/" + t)
scalar = st.one_of(st.integers(min_value=-(2 ** 70), max_value=2 ** 70), st.floats(),
                   st.booleans(), text)
garbage = st.one_of(scalar, st.lists(scalar, max_size=3),
                    st.dictionaries(st.sampled_from(["a", "path", "x"]), scalar, max_size=2))
size = st.one_of(st.sampled_from(["512M", "1G", "16M", "16T", "1025K", "2048K", "1GiB", "-1G"]),
                 st.integers(min_value=-5, max_value=2 ** 45).map(lambda n: f"{n}K"), text)
duration = st.one_of(st.sampled_from(["90s", "5min", "1min 30s", "500ms", "0"]),
                     st.integers(min_value=-5, max_value=10 ** 30), text)
good_mac = st.binary(min_size=3, max_size=3).map(
    lambda b: "52:54:00:" + ":".join(f"{x:02x}" for x in b))
mac = st.one_of(good_mac, st.tuples(good_mac, text).map("".join), text)
cpu_list = st.one_of(st.sampled_from(["0-3,6", "0", "1-1", "3-1", "0-99999999999"]),
                     st.lists(st.integers(min_value=-2, max_value=5000), max_size=4), text)


def choice(*good: str) -> st.SearchStrategy[Any]:
    return st.one_of(st.sampled_from(good), text)


GOOD: dict[str, st.SearchStrategy[Any]] = {
    "description": text, "uuid": st.one_of(st.uuids().map(str), text),
    "cpus": st.integers(min_value=-2, max_value=300), "memory": size,
    "machine": choice("pc", "q35", "pc-i440fx-7.2", "pc,accel=tcg"),
    "cpu": choice("host", "Westmere", "Nehalem-v2", "qemu64,+aes"),
    "accel": choice("auto", "kvm", "tcg"),
    "boot": st.lists(choice("disk", "cdrom", "network"), max_size=3),
    "on_poweroff": choice("stop", "keep"), "on_reboot": choice("restart", "stop"),
    "kernel.image": abs_path, "kernel.initrd": abs_path, "kernel.cmdline": text,
    "console.serial": st.booleans(), "console.escape": choice("^]", "^Q", "^ß"),
    "console.log_burst": st.integers(min_value=-1, max_value=2000000),
    "console.log_interval": duration,
    "display.vnc": st.one_of(st.sampled_from(["127.0.0.1:1", ":0", "[::1]:5"]),
                             text.map(lambda t: "unix:/" + t), text),
    "stop.timeout": duration,
    "resources.cpu_weight": st.integers(min_value=-1, max_value=20000),
    "resources.cpu_affinity": cpu_list,
    "resources.io_weight": st.integers(min_value=-1, max_value=20000),
    "resources.tasks_max": st.integers(min_value=-1, max_value=2 ** 40),
    "qemu.extra_args": st.lists(text, max_size=3),
    "disk.path": abs_path, "disk.bus": choice("virtio", "ide", "scsi"),
    "disk.media": choice("disk", "cdrom"), "disk.format": choice("raw", "qcow2"),
    "disk.readonly": st.booleans(),
    "disk.cache": choice("auto", "none", "writeback", "writethrough", "directsync", "unsafe"),
    "disk.boot": st.booleans(),
    "nic.bridge": choice("br0", "br-kvm", "br0,vhost=on"), "nic.mac": mac,
    "nic.model": choice("virtio", "e1000", "rtl8139"), "nic.mode": choice("bridge", "user"),
    "nic.queues": st.integers(min_value=-1, max_value=20),
    "host.bridge": choice("br0", "br-kvm"), "host.accel": choice("auto", "kvm", "tcg"),
    "host.tcg_fallback": st.booleans(), "host.qemu": abs_path,
    "host.machine": choice("pc", "q35"), "host.stop_timeout": duration,
    "host.cpu": choice("host", "Westmere"),
    "host.memory_overhead": size, "host.device_timeout": duration,
    "host.qemu_user": choice("kvmagent-qemu", "root", "bad user", "-x"),
}


# Values that pass validation, with hostile characters wherever the type
# allows them: these are the ones that must not break out of their option.
# Strings checked by a pattern are sometimes a valid value with something
# appended, which the pattern must refuse (or the argv check catches it).
clean_chars = chars.filter(lambda c: not (ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0))
clean_text = st.text(alphabet=clean_chars, max_size=24)
clean_path = clean_text.map(lambda t: "/" + t)


def plus_tail(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(valid, valid, valid, st.tuples(valid, text).map("".join))

VALID: dict[str, st.SearchStrategy[Any]] = {
    "description": clean_text, "uuid": plus_tail(st.uuids().map(str)),
    "cpus": st.integers(min_value=1, max_value=8), "memory": st.sampled_from(["16M", "1G"]),
    "machine": plus_tail(st.sampled_from(["pc", "q35"])),
    "cpu": plus_tail(st.sampled_from(["host", "Westmere", "EPYC-v4"])),
    "accel": st.sampled_from(["auto", "kvm", "tcg"]),
    "on_poweroff": st.sampled_from(["stop", "keep"]),
    "on_reboot": st.sampled_from(["restart", "stop"]),
    "kernel.image": clean_path, "kernel.initrd": clean_path, "kernel.cmdline": clean_text,
    "console.serial": st.booleans(), "console.escape": st.sampled_from(["^]", "^Q"]),
    "console.log_burst": st.integers(min_value=0, max_value=1000), "console.log_interval":
    st.sampled_from(["1s", "10s", "1min"]),
    "display.vnc": st.one_of(plus_tail(st.sampled_from(["127.0.0.1:1", ":0", "[::1]:5"])),
                             clean_text.filter(lambda t: t and "," not in t and "=" not in t)
                             .map(lambda t: "unix:/" + t)),
    "stop.timeout": st.sampled_from(["90s", 5]),
    "resources.cpu_weight": st.integers(min_value=1, max_value=10000),
    "resources.cpu_affinity": st.sampled_from(["0-3,6", [0, 1]]),
    "resources.io_weight": st.integers(min_value=1, max_value=10000),
    "resources.tasks_max": st.integers(min_value=16, max_value=4096),
    "qemu.extra_args": st.lists(text, max_size=3),  # anything: the escape hatch
    "disk.path": clean_path, "disk.bus": st.sampled_from(["virtio", "scsi"]),
    "disk.format": st.sampled_from(["raw", "qcow2"]), "disk.readonly": st.booleans(),
    "disk.cache": st.sampled_from(["auto", "none", "writeback", "directsync", "unsafe"]),
    "nic.bridge": plus_tail(st.sampled_from(["br0", "br-kvm"])), "nic.mac": plus_tail(good_mac),
    "nic.model": st.sampled_from(["virtio", "e1000", "rtl8139"]),
    "nic.mode": st.sampled_from(["bridge", "user"]),
    "host.bridge": plus_tail(st.sampled_from(["br0"])), "host.qemu": clean_path,
    "host.machine": plus_tail(st.sampled_from(["pc", "q35"])),
    "host.cpu": plus_tail(st.sampled_from(["host", "Westmere"])),
}


def value_for(key: str, clean: bool) -> st.SearchStrategy[Any]:
    if clean:
        return VALID[key]
    # mostly plausible values, sometimes anything at all
    good = GOOD[key]
    return st.one_of(good, good, good, garbage)


def table_of(prefix: str, keys: list[str], clean: bool) -> st.SearchStrategy[dict[str, Any]]:
    if clean:
        keys = [k for k in keys if f"{prefix}{k}" in VALID]

    @st.composite
    def build(draw: Any) -> dict[str, Any]:
        chosen = draw(st.lists(st.sampled_from(keys), unique=True, max_size=len(keys)))
        out = {k: draw(value_for(f"{prefix}{k}", clean)) for k in chosen}
        if not clean and draw(st.integers(min_value=0, max_value=20)) == 0:
            out[draw(text)] = draw(scalar)  # an unknown key
        return out
    return build()


@st.composite
def guest_doc(draw: Any) -> dict[str, Any]:
    """A guest's TOML as data: either one whose values all pass validation
    (hostile characters only where a type allows them) or one with
    anything anywhere."""
    clean = draw(mostly)
    doc = draw(table_of("", list(GUEST_TOP), clean))
    for t, keys in GUEST_TABLES.items():
        if draw(st.booleans()):
            doc[t] = draw(table_of(f"{t}.", list(keys), clean))
    for a, keys in GUEST_ARRAYS.items():
        doc[a] = draw(st.lists(table_of(f"{a}.", list(keys), clean), max_size=3))
    if clean:  # the rules between keys, so that most clean guests are valid
        if "kernel" in doc:
            doc["kernel"].setdefault("image", "/vmlinuz")
        for disk in doc["disk"]:  # a disk needs its path (as many guests with disks
            disk.setdefault("path", draw(VALID["disk.path"]))  # whatever Hypothesis draws)
        for nic in doc["nic"]:
            if nic.get("mode") == "user":
                nic.pop("bridge", None)
    return doc


mostly = st.sampled_from([True, True, True, False])
host_doc = mostly.flatmap(lambda clean: table_of("host.", list(HOST_KEYS), clean))
valid_name = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
guest_name = st.one_of(valid_name, valid_name, st.sampled_from(["g", "a" * 64, "abcdefghijklmnop"]),
                       text)

# -- what a well-formed argv looks like ----------------------------------------

FLAGS = {"-no-user-config", "-nodefaults", "-no-shutdown"}
PLAIN = {"-uuid", "-smp", "-m", "-kernel", "-initrd", "-append"}
# option -> (first part is an implied value, keys the builder writes)
QEMU_OPTS: dict[str, tuple[bool, set[str]]] = {
    "-name": (False, {"guest", "debug-threads"}),
    "-machine": (True, set()), "-cpu": (True, set()), "-accel": (True, {"split-wx"}), "-vnc": (True, set()),
    "-display": (True, set()), "-serial": (True, set()),
    "-chardev": (True, {"id", "path", "server", "wait", "fd"}),
    "-mon": (False, {"chardev", "mode"}),
    "-sandbox": (True, {"obsolete", "elevateprivileges", "spawn", "resourcecontrol"}),
    "-add-fd": (False, {"fd", "set"}),
    "-drive": (False, {"file", "format", "if", "id", "cache", "aio", "readonly", "auto-read-only",
                          "discard"}),
    "-device": (True, {"drive", "id", "bootindex", "bus", "netdev", "mac", "mq", "vectors"}),
    "-netdev": (True, {"id", "ifname", "script", "downscript", "queues", "vhost", "fd", "fds"}),
    "-action": (False, {"panic", "reboot"}),
}


def split_opts(value: str) -> list[str]:
    """QEMU's reading of "a=1,b=x,,y": parts split at single commas, ",,"
    being a literal comma (QemuOpts' get_opt_value)."""
    parts, cur, i = [], [], 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(value[i])
        i += 1
    parts.append("".join(cur))
    return parts


def check_argv(argv: list[str], guest: Guest, qemu: str, sockets: Sockets) -> None:
    extra = list(guest.extra_args)
    if extra:
        assert argv[-len(extra):] == extra
        argv = argv[:-len(extra)]
    assert argv[0] == qemu
    for a in argv:
        assert "\n" not in a and "\0" not in a and "\r" not in a, a
    seen: dict[str, list[dict[str, str]]] = {}
    i = 1
    while i < len(argv):
        opt = argv[i]
        if opt in FLAGS:
            i += 1
            continue
        assert opt in PLAIN or opt in QEMU_OPTS, f"unexpected option {opt!r} in {argv}"
        value = argv[i + 1]
        i += 2
        if opt in PLAIN:
            continue
        implied, allowed = QEMU_OPTS[opt]
        parts = split_opts(value)
        keys: dict[str, str] = {}
        if implied:
            assert "=" not in parts[0], (opt, value)
            keys[""] = parts[0]
            parts = parts[1:]
        for part in parts:
            key, eq, val = part.partition("=")
            assert eq and key in allowed, f"{opt} {value!r}: key {key!r}"
            assert key not in keys, f"{opt} {value!r}: {key} twice"
            keys[key] = val
        seen.setdefault(opt, []).append(keys)
    # user strings arrive whole, quoted, where they belong
    assert [d["file"] for d in seen.get("-drive", [])] == [str(d.path) for d in guest.disks]
    assert seen["-machine"] == [{"": guest.machine}]
    assert seen["-cpu"] in ([{"": guest.cpu}], [{"": "max"}] * (guest.cpu == "host"))
    assert [k[""] for k in seen.get("-vnc", [])] == ([guest.display.vnc] if guest.display.vnc
                                                     else [])
    paths = [k["path"] for k in seen["-chardev"] if "path" in k]
    assert paths == [p for p in (sockets.qmp, sockets.console) if p and not p.startswith("fd=")
                     and (p == sockets.qmp or guest.console.serial)]
    macs = [k["mac"] for k in seen.get("-device", []) if "mac" in k]
    assert macs == [n.mac for n in guest.nics]


def check_settings(guest: Guest, host: Any, facts: HostFacts) -> None:
    for line in render_settings(scope_settings(guest, host, facts)):
        assert "\n" not in line and "\0" not in line, line


# -- the properties -------------------------------------------------------------

def layered(*docs: tuple[dict[str, Any], Path]) -> Layered:
    out = Layered()
    for doc, path in docs:
        data = parse_toml(toml_doc(doc).encode(), path)
        assert data == doc or _has_nan(doc)  # the emitter writes what tomllib reads
        merge_into(out, data, str(path))
        out.files.append(path)
    return out


def _has_nan(v: Any) -> bool:
    if isinstance(v, float):
        return math.isnan(v)
    if isinstance(v, dict):
        return any(_has_nan(x) for x in v.values())
    if isinstance(v, list):
        return any(_has_nan(x) for x in v)
    return False


def test_any_config_gives_argv_or_config_error():
    outcomes: Counter[str] = Counter()

    @seed(SEED)
    @settings(SETTINGS, max_examples=400)  # ~1 in 7 makes an argv
    @given(name=guest_name, host=host_doc, main=guest_doc(),
           dropin=st.one_of(st.none(), guest_doc()), data=st.data())
    def run(name, host, main, dropin, data):
        try:
            hostcfg = build_host_config(layered((host, HOST_FILE)), HOST_FILE)
            docs = [(main, GUEST_FILE)] + ([(dropin, DROPIN)] if dropin is not None else [])
            guest = build_guest(name, layered(*docs), hostcfg, GUEST_FILE)
            check_unique([guest])
        except KvmagentError as e:
            assert e.status == ExitStatus.CONFIG, e
            assert "\n" not in e.message, e.message
            assert e.message.startswith(("/etc/kvmagent/", "default")), e.message
            outcomes["refused"] += 1
            return
        facts = HostFacts(data.draw(st.sampled_from([Accel.KVM, Accel.TCG])),
                          {d.path: data.draw(st.booleans()) for d in guest.disks},
                          data.draw(st.booleans()))
        if data.draw(st.booleans()):
            sockets = Sockets.in_dir(Path("/run/kvmagent") / guest.name)
        else:
            sockets = Sockets("fd=3", "fd=4", {n.index: (f"fd={10 + n.index}" if n.queues == 1
                                                         else f"fds={20 + n.index}:{30 + n.index}")
                                               for n in guest.nics})
        argv = qemu_argv(guest, hostcfg, facts, sockets)
        check_argv(argv, guest, str(hostcfg.qemu), sockets)
        check_settings(guest, hostcfg, facts)
        outcomes["argv"] += 1
        outcomes["argv with disks"] += bool(guest.disks)
        outcomes["argv with nics"] += bool(guest.nics)

    run()
    # both outcomes are exercised, not just one
    assert outcomes["argv"] >= 30 and outcomes["refused"] >= 30, outcomes
    assert outcomes["argv with disks"] >= 5 and outcomes["argv with nics"] >= 5, outcomes


FRAGMENTS = ["[[disk]]\n", "[[nic]]\n", "[kernel]\n", "[qemu]\n", "path = ", "cpus = ",
             'memory = "1G"\n', '"/x,y=z"', "\n", "[", "]", "{", "}", ".", "=", ",", '"', "'''",
             '"""', "\\", "\x00", "a.b.c", "1e400", "0x10", "1979-05-27T07:32:00Z", "#", "\t"]


@seed(SEED)
@SETTINGS
@given(st.one_of(st.binary(max_size=200),
                 st.lists(st.one_of(st.sampled_from(FRAGMENTS), text), max_size=30)
                 .map(lambda parts: "".join(parts).encode("utf-8", "surrogatepass"))))
def test_any_bytes_parse_or_config_error(raw):
    try:
        data = parse_toml(raw, GUEST_FILE)
        lay = Layered()
        merge_into(lay, data, str(GUEST_FILE))
        lay.files.append(GUEST_FILE)
        build_guest("g", lay, build_host_config(Layered(), HOST_FILE), GUEST_FILE)
    except KvmagentError as e:
        assert e.status == ExitStatus.CONFIG and e.message.startswith(str(GUEST_FILE)), e


@seed(SEED)
@SETTINGS
@given(st.one_of(guest_name, st.text(max_size=80),
                 st.tuples(valid_name, st.sampled_from(NASTY)).map("".join)))
def test_guest_names_are_safe_everywhere(name):
    """A valid name is at once a file name, a systemd instance, a machine
    name and the stem of a tap name; nothing is escaped, so two names never
    meet in one derived name (taps, which are cut, are checked across guests
    by check_unique)."""
    if not names.valid_guest_name(name):
        return
    assert re.fullmatch(r"[a-z0-9-]{1,64}", name) and not name.startswith("-")
    assert not name.endswith("-") and "--" not in name
    assert names.service_unit(name) == f"kvm@{name}.service"
    for index in (0, 9, 15):
        tap = names.tap_name(name, index)
        assert len(tap.encode()) <= names.IFNAMSIZ and re.fullmatch(r"kvm-[a-z0-9-]+", tap)
        assert "--" not in tap and tap != names.tap_name(name, index + 1)
