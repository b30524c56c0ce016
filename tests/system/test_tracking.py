"""Uptime and restart tracking on a real systemd host with the real tiny
guest: QEMU killed three times -> `kvmagent list` shows 3 restarts; the
supervisor itself killed with SIGKILL -> the guest runs on, taken over by the next
supervisor, no restart counted; a reboot
of the (persistent) test host -> the count and history remain, the stop is
recorded as a host shutdown, uptime starts again and the cumulative uptime
keeps growing."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.guest.build import GuestBuildError, find_guest
from tests.harness import TestHost
from tests.harness.install import REPO, define_guest, guest_toml, install_checkout
from tests.system.test_kvm_service import qemu_pid, show, wait_for, wait_state

pytestmark = pytest.mark.system
NAME = "trk"
UNIT = f"kvm@{NAME}.service"


def listing(th: TestHost) -> dict[str, Any]:
    rows = json.loads(th.run(["kvmagent", "list", "--json"]).stdout)
    return {r["name"]: r for r in rows}[NAME]


def history(th: TestHost) -> dict[str, Any]:
    return json.loads(th.run(["kvmagent", "history", NAME, "--json"]).stdout)


def boot_id(th: TestHost) -> str:
    """This boot's ID from /run/kvmagent/boot-id, checked against systemd's."""
    written = th.exec(["cat", "/run/kvmagent/boot-id"]).stdout.strip()
    kernel = th.exec(["cat", "/proc/sys/kernel/random/boot_id"]).stdout.strip()
    assert written == kernel.replace("-", ""), (written, kernel)
    return written


def wait_restarts(th: TestHost, n: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while show(th, UNIT, "NRestarts")["NRestarts"] != str(n):
        assert time.monotonic() < deadline, th.journal(UNIT)[-3000:]
        time.sleep(0.3)
    wait_state(th, UNIT, ("active",), timeout=timeout)


def test_restarts_and_uptime_are_kept_across_crashes_kills_and_reboots(
        system_ok: None, tmp_path: Path) -> None:
    try:
        image = find_guest()
    except GuestBuildError as e:
        pytest.fail(str(e), pytrace=False)
    with TestHost(root="host", src=REPO, persistent=True, persist_dir=tmp_path / "persist",
                  journal_dir=tmp_path, stop_timeout=120) as th:
        install_checkout(th)
        th.exec(["systemctl", "enable", "machines.target"])
        define_guest(th, NAME, guest_toml(image, nics=0))
        th.exec(["systemctl", "enable", "--now", UNIT], timeout=120)
        wait_for(th, UNIT, r"GUEST-READY")

        # QEMU crashes three times: systemd restarts it, kvmagent counts
        for n in (1, 2, 3):
            pid = qemu_pid(th, NAME)
            th.exec(["kill", "-9", str(pid)])
            wait_restarts(th, n)
            deadline = time.monotonic() + 60
            while listing(th)["qemu_pid"] in (None, pid):
                assert time.monotonic() < deadline, "no new QEMU recorded"
                time.sleep(0.3)
        row = listing(th)
        assert row["restarts"] == 3 and row["state"] == "running" and row["enabled"] is True
        assert row["qemu_pid"] == qemu_pid(th, NAME) and row["uptime_seconds"] >= 0
        text = th.run(["kvmagent", "list"]).stdout
        assert re.search(rf"^{NAME} +running +\S+( \S+)? +3 +1 +256M +{row['qemu_pid']} +yes ",
                         text, re.M), text
        h = history(th)
        crashes = [e for e in h["events"] if e["reason"] == "crashed"]
        assert len(crashes) == 3 and all(e["source"] == "supervisor" for e in crashes)
        assert "QEMU was killed by signal 9" in crashes[0]["detail"]
        mode = th.exec(["stat", "-c", "%a", "/var/lib/kvmagent/state.db"]).stdout.strip()
        assert mode == "600"
        # the boot as systemd names it (systemd-tmpfiles wrote it), whichever
        # process wrote the event: the sandboxed supervisor and the CLI agree
        assert {e["boot_id"] for e in h["events"]} == {boot_id(th)}

        # the supervisor itself killed: the guest runs on (its QEMU outlives
        # it; the next supervisor takes it over), so nothing stopped and
        # nothing restarted; ExecStopPost= says so in the journal only
        th.exec(["systemctl", "reset-failed", UNIT])  # StartLimitBurst=5 in 10 min
        qemu = qemu_pid(th, NAME)
        th.exec(["systemctl", "kill", "-s", "KILL", "--kill-who=main", UNIT])
        wait_restarts(th, 1)  # reset-failed set systemd's NRestarts back to 0
        wait_for(th, UNIT, rf"guest {NAME} taken over: QEMU pid")
        assert qemu_pid(th, NAME) == qemu
        h = history(th)
        assert not [e for e in h["events"] if e["source"] == "stop-post"]
        assert h["restarts"] == 3  # a supervisor's restart is not the guest's
        assert listing(th)["qemu_pid"] == qemu
        assert "runs on for the next supervisor to take over" in th.journal(UNIT)
        time.sleep(2)  # some uptime before the reboot
        before = history(th)
        status = th.run(["kvmagent", "status", NAME]).stdout
        assert "  Restarts: 3 after failures" in status

        th.reboot()
        wait_state(th, UNIT, ("active",), timeout=120)
        deadline = time.monotonic() + 60
        while listing(th)["uptime_seconds"] is None:
            assert time.monotonic() < deadline, th.journal(UNIT)[-3000:]
            time.sleep(0.5)
        row = listing(th)
        after = history(th)
        assert row["restarts"] == 3 and after["restarts"] == 3
        assert [e["id"] for e in after["events"]][:len(before["events"])] == \
            [e["id"] for e in before["events"]]
        assert row["uptime_seconds"] < 120  # a new run since the reboot
        assert after["cumulative_uptime_seconds"] >= before["cumulative_uptime_seconds"]
        assert after["runs"] == before["runs"] + 1
        stops = [e for e in after["events"] if e["event"] == "stopped"]
        assert stops[-1]["reason"] == "shutdown", stops[-1]
        boots = {e["boot_id"] for e in after["events"]}
        assert len(boots) == 2 and after["events"][-1]["boot_id"] == boot_id(th)
        time.sleep(3)
        assert history(th)["cumulative_uptime_seconds"] > after["cumulative_uptime_seconds"]

        assert th.run(["kvmagent", "reset-counters", NAME]).returncode == 0
        assert listing(th)["restarts"] == 0
        th.exec(["systemctl", "stop", UNIT], timeout=120)
        last = history(th)["events"][-1]
        assert (last["event"], last["reason"]) == ("stopped", "admin")


def test_ten_guests_started_and_stopped_at_once_lose_no_event(
        system_ok: None, tmp_path: Path) -> None:
    """Ten supervisors (and their ExecStopPost= steps) write to the state
    database at the same moments: every guest's run is there, whole and in
    order, and the database is intact."""
    try:
        image = find_guest()
    except GuestBuildError as e:
        pytest.fail(str(e), pytrace=False)
    names = [f"many{i}" for i in range(10)]
    units = [f"kvm@{n}.service" for n in names]
    with TestHost(root="host", src=REPO, journal_dir=tmp_path, stop_timeout=120) as th:
        install_checkout(th)
        for name in names:
            define_guest(th, name, guest_toml(image, nics=0))
        th.exec(["systemctl", "start", *units], timeout=300)  # one job each, all at once
        for unit in units:
            wait_for(th, unit, r"GUEST-READY", timeout=300)
        th.exec(["systemctl", "stop", *units], timeout=300)
        for unit in units:
            assert wait_state(th, unit, ("inactive",))["Result"] == "success"
        rows = {r["name"]: r for r in json.loads(th.run(["kvmagent", "list", "--json"]).stdout)}
        for name in names:
            events = history_of(th, name)["events"]
            assert [(e["event"], e["reason"], e["source"]) for e in events] == [
                ("starting", None, "supervisor"), ("running", None, "supervisor"),
                ("stopping", "admin", "supervisor"), ("stopped", "admin", "supervisor")], events
            assert len({e["invocation_id"] for e in events}) == 1
            assert rows[name]["state"] == "stopped" and rows[name]["restarts"] == 0
        check = th.exec(["/usr/bin/python3", "-c",
                         "import sqlite3; c = sqlite3.connect('/var/lib/kvmagent/state.db'); "
                         "print(c.execute('PRAGMA integrity_check').fetchone()[0], "
                         "c.execute('SELECT COUNT(*) FROM events').fetchone()[0])"]).stdout.split()
        assert check == ["ok", str(4 * len(names))]


def history_of(th: TestHost, name: str) -> dict[str, Any]:
    return json.loads(th.run(["kvmagent", "history", name, "--json"]).stdout)


def test_boot_column_agrees_with_systemctl_is_enabled(system_ok: None, tmp_path: Path) -> None:
    """`kvmagent list` reads the unit directories itself (no D-Bus call per
    guest): what it says of starting at boot must be what systemd says."""
    try:
        image = find_guest()
    except GuestBuildError as e:
        pytest.fail(str(e), pytrace=False)
    names = ["on", "runtime", "off", "masked"]
    with TestHost(root="host", src=REPO, journal_dir=tmp_path) as th:
        install_checkout(th)
        for name in names:
            define_guest(th, name, guest_toml(image, nics=0))
        th.exec(["systemctl", "enable", "kvm@on", "kvm@masked"])
        th.exec(["systemctl", "enable", "--runtime", "kvm@runtime"])
        th.exec(["systemctl", "mask", "kvm@masked"])

        def compare() -> dict[str, str]:
            rows = {r["name"]: r for r in json.loads(th.run(["kvmagent", "list", "--json"]).stdout)}
            said = {}
            for name in names:
                said[name] = th.exec(["systemctl", "is-enabled", f"kvm@{name}"],
                                     check=False).stdout.strip()
                starts = said[name] in ("enabled", "enabled-runtime")
                assert rows[name]["enabled"] is starts, (name, said[name], rows[name])
            return said

        assert compare() == {"on": "enabled", "runtime": "enabled-runtime", "off": "disabled",
                             "masked": "masked"}
        # a run left open in the record (both writes of its end lost): systemd
        # says the guest does not run, so neither list nor status shows uptime
        th.exec(["/usr/bin/python3", "-c",
                 "import sys; sys.path.insert(0, '/src/kvmagent'); from kvmagent.host import state; "
                 "c = state.connect('/var/lib/kvmagent'); state.insert(c, 'off', 'starting'); "
                 "state.insert(c, 'off', 'running', pid=1)"])
        doc = json.loads(th.run(["kvmagent", "status", "off", "--json"]).stdout)
        assert doc["state"] == "stopped" and doc["uptime_seconds"] is None, doc
        assert doc["qemu_pid"] is None and doc["runs"] == 1
        rows = {r["name"]: r for r in json.loads(th.run(["kvmagent", "list", "--json"]).stdout)}
        assert rows["off"]["uptime_seconds"] is None and rows["off"]["qemu_pid"] is None

        # the template masked for this boot: /etc/systemd/system has kvm@.service
        # here (install_checkout), which comes first, so systemd does not mask it
        th.exec(["systemctl", "mask", "--runtime", "kvm@.service"])
        compare()
        # without it, /run's mask is the first kvm@.service: every guest is masked
        th.exec(["mv", "/etc/systemd/system/kvm@.service", "/usr/lib/systemd/system/"])
        th.exec(["systemctl", "daemon-reload"])
        assert set(compare().values()) <= {"masked", "masked-runtime"}
