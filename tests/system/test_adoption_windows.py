"""The windows of #18: the supervisor killed (kill -9) or failing (an
exception, injected by kvmagent.unit.testhook) while its guest starts
(before and after QEMU is let run), while the guest runs, and while an ACPI
stop is under way.  Each time the guest ends in the state the user asked
for — a started guest runs (a running one stays the same QEMU, taken over),
a stop under way still ends it — with one QEMU, and no tap, scope or socket
left over once it is stopped.  And supervisor kills in a row up to the
unit's start limit with the console read throughout, then one past it: the
documented end (the unit failed, kvmagent-orphan@NAME.service stopped the
QEMU).  On each release's own root (systemd 252 and 257).

The hooks are on for the test guests only: a drop-in for their
kvm@NAME.service sets KVMAGENT_TEST_HOOKS=1 in this throwaway test host."""

from __future__ import annotations

import json
import re
import time

import pytest

from kvmagent.unit.messages import MSG_FAILED_QEMU_KEPT
from tests.harness import TestHost
from tests.harness.install import copy_guest, define_guest, guest_toml
from tests.harness.install import install_on_release
from tests.system.test_adoption import console_counts, listed
from tests.system.test_kvm_service import qemu_pid, show, wait_for

pytestmark = pytest.mark.system

HOOKS = "[Service]\nEnvironment=KVMAGENT_TEST_HOOKS=1\n"
BOOTED = r"Enter 'help'"
SHORT = {"before-cont": "bc", "after-cont": "ac", "running": "run", "stopping": "stop"}
WINDOWS = [(point, action) for point in ("before-cont", "after-cont", "running", "stopping")
           for action in ("kill", "raise")]


def qemus(th: TestHost) -> list[str]:
    out = th.exec(["pgrep", "-f", "^/usr/bin/qemu-system"], check=False).stdout
    return out.split()


def wait_until(what: str, check, timeout: float = 60):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)
    return found


def arm(th: TestHost, name: str, point: str, action: str) -> None:
    """The hook file for the supervisor of guest NAME (kill: it waits there)."""
    th.exec(["mkdir", "-p", f"/run/kvmagent/{name}"])
    th.exec(["rm", "-f", f"/run/kvmagent/{name}/test-hook.reached"])
    th.write_file(f"/run/kvmagent/{name}/test-hook",
                  f"{point} {'wait' if action == 'kill' else 'raise'}\n")


def strike(th: TestHost, name: str, unit: str, action: str) -> None:
    """kill -9 of the supervisor waiting at its hook; or nothing: it raised."""
    if action != "kill":
        return
    reached = f"/run/kvmagent/{name}/test-hook.reached"
    wait_until(f"{reached}", lambda: th.exec(["cat", reached], check=False).stdout, 120)
    point, pid = th.exec(["cat", reached]).stdout.split()
    assert show(th, unit, "MainPID")["MainPID"] == pid
    th.exec(["kill", "-9", pid])


def nothing_left(th: TestHost, name: str, unit: str) -> None:
    assert show(th, unit, "ActiveState")["ActiveState"] in ("inactive", "failed")
    assert show(th, f"kvm-{name}.scope", "ActiveState")["ActiveState"] in ("inactive", "")
    assert qemus(th) == []
    assert th.exec(["ip", "-o", "link", "show", "master", "br-kvm"]).stdout == ""
    left = th.exec(["find", f"/run/kvmagent/{name}"], check=False)
    assert left.returncode != 0, left.stdout  # the runtime directory, its sockets with it


@pytest.mark.parametrize("point,action", WINDOWS)
def test_a_supervisor_that_dies_in_a_window_leaves_the_guest_as_asked(
        debian_testhost: TestHost, guest_image, point: str, action: str) -> None:  # type: ignore[no-untyped-def]
    th = debian_testhost
    install_on_release(th)
    name = f"w-{SHORT[point]}-{action[0]}"  # a guest of its own: its journal too
    unit = f"kvm@{name}.service"
    define_guest(th, name, guest_toml(copy_guest(th, guest_image), nics=1), unit_dropin=HOOKS)
    th.exec(["systemctl", "reset-failed", unit], check=False)
    assert qemus(th) == []
    starting = point in ("before-cont", "after-cont")
    if starting:
        arm(th, name, point, action)
        th.exec(["systemctl", "start", "--no-block", unit])
        strike(th, name, unit, action)
    else:
        th.exec(["systemctl", "start", unit], timeout=120)
    wait_until(f"{unit} active", lambda: show(th, unit, "ActiveState")["ActiveState"] == "active")
    wait_for(th, unit, BOOTED)
    qemu = qemu_pid(th, name)
    journal = lambda: th.exec(["journalctl", "-u", unit, "-o", "cat",  # noqa: E731
                               "--no-pager"]).stdout
    if starting:
        # nothing to take over: the half-started QEMU is gone, the guest started anew
        s = show(th, unit, "NRestarts", "MainPID")
        assert s["NRestarts"] == "1", s
        assert qemus(th) == [str(qemu)]
        assert "taken over" not in journal()
        assert len(th.exec(["ip", "-o", "link", "show", "master", "br-kvm"]
                           ).stdout.splitlines()) == 1
        wait_for(th, unit, f"guest {name} running, QEMU pid {qemu}")
    elif point == "running":
        arm(th, name, point, action)
        strike(th, name, unit, action)
        wait_until("taken over", lambda: "taken over: QEMU pid" in journal())
        s = show(th, unit, "NRestarts", "ActiveState")
        assert (s["NRestarts"], s["ActiveState"]) == ("1", "active"), s
        assert qemu_pid(th, name) == qemu and qemus(th) == [str(qemu)]
        assert journal().count(BOOTED.replace("\\", "")) == 1, "the guest booted again"
        th.run(["kvmagent", "console", name, "--timeout", "0.5"], input="echo AFTER-$((6*7))\n")
        wait_for(th, unit, r"AFTER-42", timeout=30)
        row = listed(th, name)
        assert (row["restarts"], row["qemu_pid"]) == (0, qemu), row
    # the stop; in the last window the supervisor dies while it powers the guest off
    if point == "stopping":
        arm(th, name, point, action)
        th.exec(["systemctl", "stop", "--no-block", unit])
        strike(th, name, unit, action)
        wait_until(f"{unit} stopped", lambda: show(th, unit, "ActiveState")["ActiveState"]
                   in ("inactive", "failed"), 120)
        assert show(th, unit, "NRestarts")["NRestarts"] == "0"
    else:
        th.exec(["systemctl", "stop", unit], timeout=150)
    if action == "raise":
        found = th.exec(["journalctl", "-u", unit, "-o", "json",
                         "--no-pager", "SYSLOG_IDENTIFIER=kvmagent"]).stdout
        messages = [json.loads(line) for line in found.splitlines()]
        if point in ("running", "stopping"):  # QEMU kept in the fd store: left running
            kept = [m for m in messages if m.get("MESSAGE_ID") == MSG_FAILED_QEMU_KEPT]
            assert kept and "InjectedFailure: test hook: an exception at" in kept[0]["MESSAGE"]
        else:
            assert not [m for m in messages if m.get("MESSAGE_ID") == MSG_FAILED_QEMU_KEPT]
            assert "InjectedFailure" in journal()
    nothing_left(th, name, unit)
    h = json.loads(th.run(["kvmagent", "history", "--json", name]).stdout)
    assert h["events"][-1]["event"] == "stopped" and h["events"][-1]["reason"] == "admin", h
    print(f"{th.release}: {action} at {point}: ok")


def test_kills_up_to_the_start_limit_and_one_past_it(debian_testhost: TestHost,
                                                    guest_image) -> None:  # type: ignore[no-untyped-def]
    """kvm@.service: StartLimitBurst=5 in 10 minutes; 4 restarts are taken
    over, with the console read throughout; the 5th death is one too many:
    the unit fails, and kvmagent-orphan@NAME.service stops its QEMU."""
    th = debian_testhost
    install_on_release(th)
    name = "limit"
    unit = f"kvm@{name}.service"
    define_guest(th, name, guest_toml(copy_guest(th, guest_image), nics=1,
                                      extra="[console]\nlog_burst = 100000\n"))
    th.exec(["systemctl", "reset-failed", unit], check=False)
    th.exec(["systemctl", "start", unit], timeout=120)
    wait_for(th, unit, BOOTED)
    qemu = qemu_pid(th, name)
    th.run(["kvmagent", "console", name, "--timeout", "0.5"],
           input="i=0; while [ $i -lt 300 ]; do echo COUNT-$i; i=$((i+1)); sleep 0.05; done; "
                 "echo COUNT-1000000\n")
    burst = int(th.exec(["systemctl", "show", unit, "--property=StartLimitBurst",
                         "--value"]).stdout)
    kills = burst - 1
    for n in range(kills):
        time.sleep(2.5)
        main = show(th, unit, "MainPID")["MainPID"]
        th.exec(["kill", "-9", main])
        s = wait_until("a new supervisor", lambda: (s := show(th, unit, "MainPID", "ActiveState",
                                                             "NRestarts"))["MainPID"]
                       not in ("0", main) and s["ActiveState"] == "active" and s)
        assert s["NRestarts"] == str(n + 1), s
        assert qemu_pid(th, name) == qemu and qemus(th) == [str(qemu)]
    wait_for(th, unit, r"(?m)-console\[\d+\]: COUNT-1000000$", timeout=120)
    missing = sorted(set(range(300)) - set(console_counts(th, name)))
    # a kill in the middle of a line loses that line's start (at most one per kill)
    assert len(missing) <= kills, f"console lines lost: {missing}"
    assert th.journal(unit).count(BOOTED.replace("\\", "")) == 1, "the guest booted again"
    # one past the start limit
    main = show(th, unit, "MainPID")["MainPID"]
    th.exec(["kill", "-9", main])
    wait_until(f"{unit} failed", lambda: show(th, unit, "ActiveState")["ActiveState"] == "failed")
    wait_until("QEMU stopped", lambda: qemus(th) == [], 60)
    s = show(th, unit, "Result", "NRestarts")
    # the last run's result stays the supervisor's death; the refused restart is counted
    assert s["Result"] in ("signal", "start-limit-hit") and s["NRestarts"] == str(burst), s
    nothing_left(th, name, unit)
    status = th.exec(["systemctl", "status", unit], check=False).stdout
    assert "start-limit-hit" in status or "Start request repeated too quickly" in status, status
    row = listed(th, name)
    assert row["state"] == "failed" and row["qemu_pid"] is None, row
    orphan = th.journal(f"kvmagent-orphan@{name}.service")
    assert re.search(rf"the supervisor of guest {name} failed too often", orphan), orphan
    h = json.loads(th.run(["kvmagent", "history", "--json", name]).stdout)
    assert [e["event"] for e in h["events"]][-1] == "stopped", h
    assert (h["events"][-1]["reason"], h["events"][-1]["source"]) == ("failed", "stop-orphan"), h
    th.exec(["systemctl", "reset-failed", unit], check=False)
    print(f"{th.release}: {kills} kills taken over, {len(missing)} console lines lost; "
          f"one past the start limit: {s}")
