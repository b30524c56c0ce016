"""The D-Bus types kvmagent marshals unit properties with
(kvmagent.host.systemd.SIGNATURES) are the ones the real systemd declares: read
from its introspection data in the test host, for every property, also
those pystemd's own table does not know."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from kvmagent.host import systemd

pytestmark = pytest.mark.system

# PIDs is no property of a unit; systemd takes it only when a transient scope
# is created (StartTransientUnit), as "au" (org.freedesktop.systemd1(5)).
CREATION_ONLY = {"PIDs": b"au"}
# Exec*Ex= are set as (path, argv, flags) and read back with the status of
# the last run appended (sd-bus's bus_append_exec_command; kvmagent's transient
# units with them start in tests/system/test_transient.py).
SET_AS_PREFIX = {"ExecStartEx", "ExecStopPostEx", "ExecReloadEx"}
OBJECTS = ("/org/freedesktop/systemd1/unit/systemd_2djournald_2eservice",
           "/org/freedesktop/systemd1/unit/init_2escope")


def declared(testhost) -> dict[str, str]:  # type: ignore[no-untyped-def]
    types: dict[str, str] = {}
    for path in OBJECTS:
        xml = testhost.exec(["busctl", "--xml-interface", "introspect",
                             "org.freedesktop.systemd1", path], timeout=60).stdout
        for iface in ET.fromstring(xml).iter("interface"):
            for prop in iface.iter("property"):
                types.setdefault(prop.get("name"), prop.get("type"))
    return types


def test_every_property_has_systemds_type(testhost) -> None:  # type: ignore[no-untyped-def]
    types = declared(testhost)
    assert "ExecStart" in types and "Delegate" in types, sorted(types)[:20]
    wrong = {}
    for name, sig in systemd.SIGNATURES.items():
        if name in CREATION_ONLY:
            assert sig == CREATION_ONLY[name], name
            continue
        if name in SET_AS_PREFIX:
            assert sig == b"a(sasas)" and types[name].startswith("a(sasas"), (name, types[name])
            continue
        if types.get(name) != sig.decode():
            wrong[name] = (sig.decode(), types.get(name, "not declared"))
    assert not wrong, f"ours, systemd's: {wrong}"
