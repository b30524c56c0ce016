"""kvmagent.host.systemd and kvmagent.host.machined against the real systemd 252 and machined of a
test host.  The code under test runs inside the host as a unit (PYTHONPATH=/src/kvmagent),
like the supervisor; the checks use systemctl and machinectl.

cgroup limits are set and read back but not enforced on this machine (its
hybrid cgroup setup leaves the v1 controllers read-only in the container):
these tests assert properties and placement only."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from typing import Any

import pytest

from tests.harness import TestHost

pytestmark = pytest.mark.system

PY = "/usr/bin/python3"
ENV = {"PYTHONPATH": "/src/kvmagent"}
SUP = "sup-test.service"
SCOPE = "kvm-t.scope"

# Starts a child like QEMU, moves it into its scope, registers it, then says READY=1.
# On SIGTERM it records whether the child was still alive (Before= ordering), then ends it.
SUPERVISOR = textwrap.dedent(f"""
    import json, signal, subprocess, sys, time
    from pystemd.daemon import notify
    from kvmagent.host import machined, systemd
    from kvmagent.names import guest_uuid

    child = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def on_term(signum, frame):
        open("/run/sup-test.term", "w").write("alive" if child.poll() is None else "dead")
        child.terminate(); child.wait(); sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    settings = [("Description", "QEMU of t"), ("Slice", "machine.slice"),
                ("BindsTo", ["{SUP}"]), ("PartOf", ["{SUP}"]), ("Before", ["{SUP}"]),
                ("CollectMode", "inactive-or-failed"), ("MemoryMax", 300 << 20),
                ("CPUWeight", 50), ("AllowedCPUs", "0,2-3"), ("IOWeight", 200),
                ("TasksMax", 64)]
    t0 = time.monotonic()
    systemd.start_scope("{SCOPE}", child.pid, settings)
    t1 = time.monotonic()
    machined.register("t", guest_uuid("t"), child.pid, [])
    t2 = time.monotonic()
    json.dump({{"pid": child.pid, "scope_ms": (t1 - t0) * 1e3, "register_ms": (t2 - t1) * 1e3}},
              open("/run/sup-test.json", "w"))
    notify(False, "READY=1")
    time.sleep(300)
""")

# A scope left over from a crashed run, in state failed (its RuntimeMaxSec= ran out).
LEFTOVER = textwrap.dedent("""
    import subprocess
    from kvmagent.host import systemd
    child = subprocess.Popen(["sleep", "300"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    systemd.start_scope("kvm-t2.scope", child.pid, [("Slice", "machine.slice")])
    print(open(f"/proc/{child.pid}/cgroup").read().splitlines()[-1])
    print(systemd.unit_properties("kvm-t2.scope", ["ActiveState"])["ActiveState"])
    systemd.stop_unit("kvm-t2.scope")
""")

BAD_VALUE = textwrap.dedent("""
    import subprocess
    from kvmagent.host import systemd
    from kvmagent.errors import KvmagentError
    child = subprocess.Popen(["sleep", "300"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        systemd.start_scope("kvm-bad.scope", child.pid, [("IOWeight", 20000)])
        print("no error")
    except KvmagentError as e:
        print(e.message)
    finally:
        child.kill()
""")

JOBS = textwrap.dedent("""
    import json
    from kvmagent.host import systemd
    calls = []
    real = systemd._Manager.call_raw
    def counted(self, method, *args, **kw):
        calls.append(method)
        return real(self, method, *args, **kw)
    systemd._Manager.call_raw = counted
    out = {
        "start": systemd.start_unit("adapt-ok.service", wait=True, timeout=30),
        "restart": systemd.restart_unit("adapt-ok.service", wait=True, timeout=30),
        "state": systemd.unit_properties("adapt-ok.service", ["ActiveState", "SubState"]),
        "start_failing": systemd.start_unit("adapt-fail.service", wait=True, timeout=30),
        "start_dependent": systemd.start_unit("adapt-dep.service", wait=True, timeout=30),
        "nowait": systemd.start_unit("adapt-nowait.service", wait=False),
        "template": systemd.template_installed("adapt@.service"),
        "no_template": systemd.template_installed("adapt-none@.service"),
    }
    del calls[:]
    out["units"] = systemd.list_units(["adapt-*"])
    out["list_calls"] = list(calls)
    out["stop"] = systemd.stop_unit("adapt-ok.service", wait=True, timeout=30)
    print(json.dumps(out))
""")


def _show(th: TestHost, unit: str, *props: str) -> dict[str, str]:
    out = th.exec(["systemctl", "show", unit, "-p", ",".join(props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _machines(th: TestHost) -> list[str]:
    out = th.exec(["machinectl", "list", "--no-legend", "--no-pager"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _python(th: TestHost, script: str) -> str:
    return str(th.run([PY, "-c", script], env=ENV, timeout=60).stdout)


def test_scope_machine_and_teardown(testhost: TestHost,
                                    record_property: Callable[[str, object], None]) -> None:
    th = testhost
    th.exec(["systemd-run", f"--unit={SUP}", "--quiet", "--collect", "-p", "Type=notify",
             "-p", "RuntimeMaxSec=300", f"--setenv=PYTHONPATH={ENV['PYTHONPATH']}",
             PY, "-c", SUPERVISOR], timeout=60)
    try:
        info: dict[str, Any] = json.loads(th.exec(["cat", "/run/sup-test.json"]).stdout)
        record_property("start_scope_ms", round(info["scope_ms"], 1))
        record_property("register_ms", round(info["register_ms"], 1))
        pid = info["pid"]
        assert th.exec(["cat", f"/proc/{pid}/cgroup"]).stdout.splitlines()[-1] == \
            "0::/machine.slice/kvm-t.scope"
        shown = _show(th, SCOPE, "ActiveState", "MemoryMax", "CPUWeight", "AllowedCPUs",
                      "IOWeight", "TasksMax", "BindsTo", "PartOf", "Before", "Slice",
                      "Description", "CollectMode")
        assert shown == {
            "ActiveState": "active", "MemoryMax": str(300 << 20), "CPUWeight": "50",
            "AllowedCPUs": "0 2-3", "IOWeight": "200", "TasksMax": "64",
            "BindsTo": SUP, "PartOf": SUP, "Before": shown["Before"],
            "Slice": "machine.slice", "Description": "QEMU of t",
            "CollectMode": "inactive-or-failed",
        }
        assert set(shown["Before"].split()) == {SUP, "shutdown.target"}
        assert "t" in _machines(th)
        machine = _show_machine(th, "t")
        assert (machine["Unit"], machine["Leader"], machine["Class"], machine["Service"]) == \
            (SCOPE, str(pid), "vm", "kvmagent")
    finally:
        th.exec(["systemctl", "stop", SUP], timeout=60)
    assert th.exec(["cat", "/run/sup-test.term"]).stdout == "alive"  # Before= at work
    assert _show(th, SCOPE, "ActiveState")["ActiveState"] == "inactive"
    assert "t" not in _machines(th)
    assert th.exec(["test", "-e", f"/proc/{pid}"], check=False).returncode != 0


def _show_machine(th: TestHost, name: str) -> dict[str, str]:
    out = th.exec(["machinectl", "show", name]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_start_scope_over_a_failed_leftover(testhost: TestHost) -> None:
    th = testhost
    th.exec(["systemd-run", "--scope", "--quiet", "--unit=kvm-t2.scope",
             "-p", "RuntimeMaxSec=1", "sleep", "300"], check=False, timeout=30)
    assert _show(testhost, "kvm-t2.scope", "ActiveState", "Result") == \
        {"ActiveState": "failed", "Result": "timeout"}
    assert _python(th, LEFTOVER).splitlines() == ["0::/machine.slice/kvm-t2.scope", "active"]


def test_invalid_value_names_the_unit(testhost: TestHost) -> None:
    assert _python(testhost, BAD_VALUE).strip() == (
        "cannot start kvm-bad.scope: org.freedesktop.DBus.Error.InvalidArgs: "
        "Value specified in IOWeight is out of range")


def test_unit_jobs_and_listing(testhost: TestHost) -> None:
    th = testhost
    units = {
        "adapt-ok.service": "[Service]\nExecStart=/bin/sleep 300\n",
        "adapt-fail.service": "[Service]\nType=oneshot\nExecStart=/bin/false\n",
        "adapt-dep.service": "[Unit]\nRequires=adapt-fail.service\nAfter=adapt-fail.service\n"
                             "[Service]\nExecStart=/bin/sleep 300\n",
        "adapt-nowait.service": "[Service]\nExecStart=/bin/sleep 300\n",
        "adapt@.service": "[Service]\nExecStart=/bin/sleep 300\n",
    }
    for name, text in units.items():
        th.write_file(f"/run/systemd/system/{name}", text)
    th.exec(["systemctl", "daemon-reload"])
    try:
        out = json.loads(_python(th, JOBS))
    finally:
        th.exec(["systemctl", "stop", "adapt-*"], check=False)
    assert (out["start"], out["restart"], out["stop"]) == ("done", "done", "done")
    assert out["state"] == {"ActiveState": "active", "SubState": "running"}
    assert (out["start_failing"], out["start_dependent"], out["nowait"]) == \
        ("failed", "dependency", None)
    assert (out["template"], out["no_template"]) == (True, False)
    assert out["list_calls"] == ["ListUnitsByPatterns"]
    listed = {u["name"]: u for u in out["units"]}
    assert listed["adapt-ok.service"] == {
        "name": "adapt-ok.service", "description": "adapt-ok.service", "load_state": "loaded",
        "active_state": "active", "sub_state": "running"}
    assert listed["adapt-fail.service"]["active_state"] == "failed"
    assert all(name.startswith("adapt-") for name in listed)
