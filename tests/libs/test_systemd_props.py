"""scope_settings() and service_settings() -> StartTransientUnit properties
marshalled by pystemd's D-Bus module, and D-Bus error mapping (no bus, no root)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from gi.repository import GLib
from pystemd.dbusexc import DBusError
from pystemd.systemd1.unit_signatures import KNOWN_UNIT_SIGNATURES, signature_array

from kvmagent.host import machined, systemd
from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.config.guests import load_guest, load_host_config
from kvmagent.render.scope import scope_settings
from kvmagent.render.service import INSTANCE, service_settings
from kvmagent.host.systemd import dbus_error
from kvmagent.render.unitprops import SIGNATURES, UINT64_MAX, cpu_mask, props_for_dbus

REPO = Path(__file__).resolve().parents[2]


def test_scope_settings_of_a_guest(conf: Any) -> None:
    conf.write("kvmagent.toml", 'memory_overhead = "128M"\n')
    conf.write("guests/g.toml", 'memory = "1G"\ndescription = "web"\n[resources]\n'
               'cpu_weight = 200\ncpu_affinity = [0, 1, 2, 5]\nio_weight = 50\n'
               'tasks_max = 100\n')
    host = load_host_config(conf.paths)
    props = props_for_dbus(scope_settings(load_guest(conf.paths, "g", host), host))
    assert props == {
        b"Description": b"QEMU of web",
        b"Slice": b"machine.slice",
        b"PartOf": [b"kvm@g.service"],
        b"Before": [b"kvm@g.service"],
        b"CollectMode": b"inactive-or-failed",
        b"MemoryMax": (1 << 30) + (128 << 20),
        b"DevicePolicy": b"closed",
        b"DeviceAllow": [(b"/dev/kvm", b"rw")],
        b"CPUWeight": 200,
        b"AllowedCPUs": b"\x27",  # CPUs 0, 1, 2 and 5
        b"IOWeight": 50,
        b"TasksMax": 100,
    }
    # pystemd can marshal every one of them (a missing signature is a KeyError there)
    assert systemd.property_array({**props, b"PIDs": [1234]})


@pytest.mark.parametrize("value, mask", [
    ("0-2,5", b"\x27"), ("0", b"\x01"), ("7", b"\x80"), ("8", b"\x00\x01"),
    ("0-15", b"\xff\xff"), ([0, 9], b"\x01\x02"), ((3,), b"\x08"),
    ("1,63", b"\x02" + bytes(6) + b"\x80"),
])
def test_cpu_mask(value: object, mask: bytes) -> None:
    assert cpu_mask(value) == mask


def test_other_types() -> None:
    props = props_for_dbus([
        ("TasksMax", "infinity"), ("MemoryMax", "infinity"), ("After", "a.service"),
        ("DevicePolicy", "closed"), ("DeviceAllow", [("/dev/kvm", "rw"), "/dev/net/tun rwm"]),
        ("PIDs", [1, 2]),
    ])
    assert props == {
        b"TasksMax": UINT64_MAX, b"MemoryMax": UINT64_MAX, b"After": [b"a.service"],
        b"DevicePolicy": b"closed",
        b"DeviceAllow": [(b"/dev/kvm", b"rw"), (b"/dev/net/tun", b"rwm")],
        b"PIDs": [1, 2],
    }
    assert systemd.property_array(props)


def test_every_service_setting_marshals() -> None:
    """The template's settings, and a per-guest service's, as pystemd sends them."""
    assert systemd.property_array(props_for_dbus(service_settings(INSTANCE)))
    settings = service_settings("g", ["/usr/bin/python3", "-m", "kvmagent"],
                                environment=["PYTHONPATH=/src/kvmagent"])
    assert systemd.property_array(props_for_dbus(settings))
    # an install run: BindReadOnlyPaths= (a(ssbt)), which pystemd's table lacks
    install = service_settings("g", iso="/var/tmp/d.iso", vnc="127.0.0.1:1",
                               writable=["/srv/g.img"], inet=True)
    assert systemd.property_array(props_for_dbus(install))


def test_signature_table_agrees_with_pystemd() -> None:
    """Where pystemd's table knows a property, it has the same D-Bus type.
    All of them, those pystemd does not know too, are compared with what the
    real systemd says in tests/system/test_dbus_types.py."""
    known = {name: sig for name, sig in SIGNATURES.items()
             if name.encode() in KNOWN_UNIT_SIGNATURES}
    assert len(known) >= 10, sorted(known)
    for name, sig in known.items():
        assert KNOWN_UNIT_SIGNATURES[name.encode()] == sig, name


def test_property_array_marshals_like_pystemd() -> None:
    props = {b"Description": b"d", b"MemoryMax": 5, b"After": [b"a.service"]}
    assert systemd.property_array(props) == signature_array(props)


def test_lean_library_imports() -> None:
    """kvmagent.host.systemd leaves pystemd's high-level API (and lxml) unimported,
    kvmagent.host.netdev pyroute2's other modules (kvmagent.host.leanimport)."""
    code = ("import sys; import kvmagent.host.systemd, kvmagent.host.netdev; "
            "assert 'lxml' not in sys.modules and 'pystemd.systemd1' not in sys.modules; "
            "assert 'pyroute2.ndb' not in sys.modules and 'pyroute2.ipdb' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.parametrize("first", ["", "import pprint; "])
def test_dbuslib_without_pprint(first: str) -> None:
    """pystemd.dbuslib's `from pprint import pformat` (one error message) is
    a stand-in until called: pprint (dataclasses, inspect: ~10 ms) stays out
    of every kvmagent command, the stand-in out of sys.modules, and the
    error message is the real pformat's."""
    stand_in = "kvmagent.host.leanimport" if not first else "pprint"
    code = (f"import sys; {first}import kvmagent.host.systemd; import pystemd.dbuslib as d; "
            f"assert ('pprint' in sys.modules) == {bool(first)}, sys.modules.get('pprint'); "
            # pystemd still takes pformat from pprint (else the stand-in is no longer
            # needed: remove leanimport.import_without and this test)
            f"assert d.pformat.__module__ == {stand_in!r}, d.pformat; "
            "x = {'a': [1] * 30}; text = d.pformat(x, width=20); "
            "import pprint; assert hasattr(pprint, 'PrettyPrinter'); "
            "assert text == pprint.pformat(x, width=20) and text.count(chr(10)) == 29, text")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_gi_without_asyncio() -> None:
    """kvmagent.host.machined imports gi and pydbus without asyncio, which
    Debian 13's gi imports as it loads (~95 ms of every guest's start, in
    the child that registers it with machined): no asyncio module is left
    in sys.modules, the stand-in is gone, a later import gets the real one,
    and a D-Bus error still splits.  Fails when a gi takes another name from
    asyncio as it loads (then it belongs in the stand-in, or the stand-in
    goes)."""
    code = ("import sys; import kvmagent.host.machined as m; "
            "left = [k for k in sys.modules if k.split('.')[0] == 'asyncio']; "
            "assert not left, left; "
            "import asyncio, asyncio.base_events; "
            "assert asyncio.InvalidStateError is not m.GiFutureStateError; "
            "e = m.GLib.Error('GDBus.Error:org.x.Error: no'); "
            "assert m._split(e) == ('org.x.Error', 'no'), m._split(e)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.parametrize("setting, why", [
    (("MemoryMax", -1), "MemoryMax=-1"),
    (("MemoryMax", 1 << 64), "MemoryMax="),
    (("CPUWeight", True), "CPUWeight=True"),
    (("CPUWeight", "100"), "CPUWeight='100'"),
    (("AllowedCPUs", "2-1"), "AllowedCPUs='2-1'"),
    (("AllowedCPUs", ""), "AllowedCPUs=''"),
    (("BindsTo", [1]), "BindsTo=[1]"),
    (("DeviceAllow", ["/dev/kvm"]), "DeviceAllow=['/dev/kvm']"),
    (("PIDs", [0]), "PIDs=[0]"),
    (("Description", 5), "Description=5"),
])
def test_bad_values_name_the_setting(setting: tuple[str, Any], why: str) -> None:
    with pytest.raises(KvmagentError, match="bad unit setting " + why.replace("[", r"\[")
                       .replace("]", r"\]")):
        props_for_dbus([setting])


def test_unknown_setting() -> None:
    with pytest.raises(KvmagentError, match="RestartMode= has no known D-Bus type"):
        props_for_dbus([("RestartMode", "normal")])


# -- error mapping ------------------------------------------------------------------------

@pytest.mark.parametrize("errno, name, text, expect, status", [
    (-17, b"org.freedesktop.systemd1.UnitExists",
     b"Unit kvm-t.scope was already loaded or has a fragment file.",
     "cannot start kvm-t.scope: org.freedesktop.systemd1.UnitExists: Unit kvm-t.scope was "
     "already loaded or has a fragment file.", ExitStatus.FAILURE),
    (-2, b"org.freedesktop.systemd1.NoSuchUnit", b"Unit x.service not found.",
     "cannot start kvm-t.scope: org.freedesktop.systemd1.NoSuchUnit: Unit x.service not found.",
     ExitStatus.FAILURE),
    (-22, b"org.freedesktop.DBus.Error.InvalidArgs", b"Invalid unit name ../x",
     "cannot start kvm-t.scope: org.freedesktop.DBus.Error.InvalidArgs: Invalid unit name ../x",
     ExitStatus.FAILURE),
    (-1, b"org.freedesktop.DBus.Error.InteractiveAuthorizationRequired", b"Interactive auth",
     "cannot start kvm-t.scope: org.freedesktop.DBus.Error.InteractiveAuthorizationRequired: "
     "Interactive auth", ExitStatus.NOPERMISSION),
])
def test_dbus_error(errno: int, name: bytes, text: bytes, expect: str,
                    status: ExitStatus) -> None:
    err = dbus_error("cannot start kvm-t.scope", DBusError(errno, name, text))
    assert (err.message, err.status) == (expect, status)


class _NoBus:
    def open(self) -> None:
        raise DBusError(-2, None, "Could not open a bus to DBus")


def test_no_system_bus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(systemd, "DBus", _NoBus)
    with pytest.raises(KvmagentError) as info:
        systemd.list_units(["kvm@*"])
    assert info.value.message == "cannot connect to the system bus: System.Error.ENOENT"
    assert info.value.status == ExitStatus.HOST_NOT_READY and info.value.hint


def test_machined_error_split() -> None:
    exc = GLib.Error("GDBus.Error:System.Error.ENXIO: Failed to determine unit of process 557 "
                     ": No such device or address")
    err = machined._error("cannot register machine t (leader 557)", exc)
    assert err.message == ("cannot register machine t (leader 557): System.Error.ENXIO: "
                           "Failed to determine unit of process 557 : No such device or address")
