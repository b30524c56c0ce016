"""A guest outlives its supervisor: kill -9 of kvm@NAME.service's main
process, and the supervisor that systemd starts next takes the running
QEMU over — same QEMU pid, no second boot, the console back in the journal,
QMP answering (the graceful stop at the end goes through it), taps where
they were, no restart counted.  A reload (kvmagent reload, systemctl
reload) does the same in the supervisor's own process.  On each release's own root (systemd 252
and 257)."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from kvmagent.host.statefile import MSG_DAMAGED
from tests.harness import TestHost
from tests.harness.install import copy_guest, define_guest, guest_toml, install_on_release
from tests.system.test_kvm_service import qemu_pid, show, wait_for

pytestmark = pytest.mark.system

STATE_DB = "/var/lib/kvmagent/state.db"


def listed(th: TestHost, name: str) -> dict[str, Any]:
    rows = json.loads(th.run(["kvmagent", "list", "--json"]).stdout)
    (row,) = [r for r in rows if r["name"] == name]
    return dict(row)


def console_counts(th: TestHost, name: str) -> list[int]:
    lines = th.exec(["journalctl", f"GUEST={name}", f"SYSLOG_IDENTIFIER={name}-console",
                     "-o", "cat", "--no-pager"]).stdout.splitlines()
    return [int(m.group(1)) for line in lines if (m := re.fullmatch(r"COUNT-(\d+)", line))]


def test_a_killed_supervisor_is_replaced_and_the_guest_runs_on(debian_testhost: TestHost,
                                                                guest_image) -> None:  # type: ignore[no-untyped-def]
    th = debian_testhost
    install_on_release(th)
    name, unit = "adopt", "kvm@adopt.service"
    define_guest(th, name, guest_toml(copy_guest(th, guest_image), nics=1,
                                      extra="[console]\nlog_burst = 100000\n"))
    th.exec(["systemctl", "start", unit], timeout=120)
    started = time.monotonic()
    wait_for(th, unit, r"Enter 'help'")
    qemu = qemu_pid(th, name)
    taps = th.exec(["ip", "-o", "link", "show", "master", "br-kvm"]).stdout
    boots = th.journal(unit).count("Enter 'help'")
    th.run(["kvmagent", "console", name, "--timeout", "0.5"],
           input="i=0; while [ $i -lt 200 ]; do echo COUNT-$i; i=$((i+1)); sleep 0.05; done; "
                 "echo COUNT-1000000\n")
    kills = 2
    took = []
    for n in range(kills):
        time.sleep(2)
        main = show(th, unit, "MainPID")["MainPID"]
        t0 = time.monotonic()
        th.exec(["kill", "-9", main])
        deadline = time.monotonic() + 30
        while True:
            s = show(th, unit, "MainPID", "ActiveState", "SubState", "NRestarts")
            if s["MainPID"] not in ("0", main) and s["ActiveState"] == "active":
                break
            assert time.monotonic() < deadline, s
            time.sleep(0.05)
        took.append(time.monotonic() - t0)
        assert s["NRestarts"] == str(n + 1)
        assert qemu_pid(th, name) == qemu, "the guest's QEMU changed"
    wait_for(th, unit, r"(?m)-console\[\d+\]: COUNT-1000000$", timeout=120)
    journal = th.journal(unit)
    assert journal.count("taken over: QEMU pid") == kills, journal[-3000:]
    assert journal.count("Enter 'help'") == boots, "the guest booted again"
    counts = console_counts(th, name)
    missing = sorted(set(range(200)) - set(counts))
    # a kill in the middle of a line loses that line's start (at most one per kill)
    assert len(missing) <= kills, f"console lines lost: {missing}"
    assert th.exec(["ip", "-o", "link", "show", "master", "br-kvm"]).stdout == taps
    # new code without an outage: `kvmagent reload` and `systemctl reload`
    # re-execute the supervisor in its process, which takes the guest over
    main = show(th, unit, "MainPID")["MainPID"]
    t0 = time.monotonic()
    out = th.run(["kvmagent", "reload", name]).stdout
    reload_took = time.monotonic() - t0
    assert f"QEMU pid {qemu} untouched" in out, out
    th.exec(["systemctl", "reload", unit], timeout=60)
    s = show(th, unit, "MainPID", "ActiveState", "NRestarts")
    assert (s["MainPID"], s["ActiveState"], s["NRestarts"]) == (main, "active", str(kills)), s
    assert qemu_pid(th, name) == qemu
    assert th.journal(unit).count("supervisor reloaded, kvmagent") == 2
    status = th.run(["kvmagent", "status", name]).stdout
    assert re.search(r"Supervisor: kvmagent \S+ since .*; 4 takeovers since\)", status), status
    doc = json.loads(th.run(["kvmagent", "status", "--json", name]).stdout)
    assert doc["supervisor"]["takeovers"] == 4 and doc["qemu_pid"] == qemu, doc
    # one supervisor per guest, also after the reloads: one run by hand is refused
    second = th.exec(["kvmagent", "run", name], check=False, timeout=60)
    assert second.returncode == 1, second
    assert re.search(rf"guest {name} already has a supervisor \(pid {main}\)",
                     th.exec(["journalctl", f"GUEST={name}", "-o", "cat"]).stdout)
    assert show(th, unit, "MainPID")["MainPID"] == main and qemu_pid(th, name) == qemu
    # the console and QMP of the adopted guest: typed in, seen in the journal
    th.run(["kvmagent", "console", name, "--timeout", "0.5"], input="echo AFTER-$((6*7))\n")
    wait_for(th, unit, r"AFTER-42", timeout=30)
    guest = listed(th, name)
    # the guest did not restart: no restart counted, its uptime goes on
    assert guest["restarts"] == 0 and guest["qemu_pid"] == qemu, guest
    assert guest["uptime_seconds"] >= int(time.monotonic() - started) - 2, guest
    # the record: each takeover and reload an event of the run, none a restart
    h = json.loads(th.run(["kvmagent", "history", "--json", name]).stdout)
    kinds = [e["event"] for e in h["events"]]
    assert kinds == ["starting", "running"] + ["taken-over"] * kills + ["reloaded"] * 2, kinds
    assert {e["qemu_pid"] for e in h["events"][1:]} == {qemu}, h["events"]
    assert all(e["source"] == "supervisor" for e in h["events"]), h["events"]
    assert re.fullmatch(r"supervisor pid \d+ ended; pid \d+ took over \(kvmagent \S+\)",
                        h["events"][2]["detail"]), h["events"][2]
    assert re.fullmatch(rf"kvmagent \S+ -> \S+, supervisor pid {main}",
                        h["events"][-1]["detail"]), h["events"][-1]
    assert (h["runs"], h["restarts"]) == (1, 0), h
    assert h["uptime_seconds"] >= int(time.monotonic() - started) - 2, h
    text = th.run(["kvmagent", "history", name]).stdout
    assert text.count(" taken-over  QEMU pid") == kills and text.count(" reloaded ") == 2, text
    print(f"{th.release}: supervisor replaced in {', '.join(f'{t * 1000:.0f}' for t in took)} "
          f"ms; {len(missing)} console lines lost; kvmagent reload {reload_took * 1000:.0f} ms; "
          f"listed: {guest}")
    # the record damaged under the running guest: list and status show what
    # systemd knows; the next event moves the file aside and starts anew
    th.exec(["dd", "if=/dev/urandom", f"of={STATE_DB}", "bs=4096", "count=8", "status=none"])
    garbage = th.exec(["sha256sum", STATE_DB]).stdout.split()[0]
    r = th.run(["kvmagent", "list", "--json"])
    assert "file is not a database" in r.stderr, r.stderr
    (guest,) = [g for g in json.loads(r.stdout) if g["name"] == name]
    assert (guest["state"], guest["qemu_pid"]) == ("running", qemu), guest
    assert guest["uptime_seconds"] >= int(time.monotonic() - started) - 2, guest
    assert re.search(rf"(?m)^{name} +running +\S+( \S+)? +- +1 +256M +{qemu} ",
                     th.run(["kvmagent", "list"]).stdout)
    doc = json.loads(th.run(["kvmagent", "status", "--json", name]).stdout)
    assert doc["qemu_pid"] == qemu and doc["uptime_seconds"] is not None, doc
    t0 = time.monotonic()
    th.exec(["systemctl", "stop", unit], timeout=150)
    journal = th.journal(unit)
    assert "ACPI power button pressed for guest adopt" in journal
    assert show(th, f"kvm-{name}.scope", "ActiveState")["ActiveState"] in ("inactive", "")
    assert th.exec(["ip", "-o", "link", "show", "master", "br-kvm"]).stdout == ""
    print(f"{th.release}: graceful stop of the adopted guest in {time.monotonic() - t0:.1f} s")
    found = th.exec(["journalctl", f"MESSAGE_ID={MSG_DAMAGED}", "-o", "json",
                     "--no-pager"]).stdout
    (moved,) = [json.loads(line) for line in found.splitlines()]
    assert moved["_SYSTEMD_UNIT"] == unit and moved["GUEST"] == name, moved
    assert moved["STATE_DB"] == STATE_DB and "file is not a database" in moved["MESSAGE"]
    assert re.fullmatch(rf"{STATE_DB}\.damaged-\d{{8}}T\d{{6}}", moved["DAMAGED_DB"]), moved
    assert th.exec(["sha256sum", moved["DAMAGED_DB"]]).stdout.split()[0] == garbage
    h = json.loads(th.run(["kvmagent", "history", "--json", name]).stdout)
    assert [(e["event"], e["reason"]) for e in h["events"]] == [("stopping", "admin"),
                                                                ("stopped", "admin")], h
    # started again: the fresh record has the new run, list its QEMU
    th.exec(["systemctl", "start", unit], timeout=120)
    deadline = time.monotonic() + 30
    while (guest := listed(th, name))["qemu_pid"] is None:  # the writer is a forked child
        assert time.monotonic() < deadline, guest
        time.sleep(0.2)
    assert guest["qemu_pid"] == qemu_pid(th, name) != qemu and guest["restarts"] == 0, guest
    h = json.loads(th.run(["kvmagent", "history", "--json", name]).stdout)
    assert [e["event"] for e in h["events"]][2:] == ["starting", "running"], h
    assert h["events"][-1]["qemu_pid"] == guest["qemu_pid"] and h["runs"] == 1, h  # anew
    th.exec(["systemctl", "stop", unit], timeout=150)
