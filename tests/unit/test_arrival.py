"""The record that follows a migrated guest (kvmagent.cli.arrival) on real
state databases in tmp_path: the boot the source sends, the downtime the
destination adds to its arrival, and how history shows them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from kvmagent.cli import arrival, tracking
from kvmagent.errors import KvmagentError
from kvmagent.host import state
from kvmagent.paths import Paths


def paths(tmp_path: Path) -> Paths:
    return Paths(tmp_path / "etc", tmp_path / "state", tmp_path / "run")


def test_the_source_sends_the_boot_it_has(tmp_path: Path) -> None:
    p = paths(tmp_path)
    assert arrival.guest_booted(p, "g") is None  # no record at all
    conn = state.connect(p.state_dir)
    here = state.now()
    state.insert(conn, "g", "starting", at=here)
    assert arrival.guest_booted(p, "g") is None  # not running (yet)
    state.insert(conn, "g", "running", pid=1, at=here)
    assert arrival.guest_booted(p, "g") == here.realtime  # booted here
    state.insert(conn, "g", "stopped", reason="migrated", at=here)
    state.insert(conn, "g", "starting", reason="migrated", at=here)
    state.insert(conn, "g", "running", detail="migrated here from b", at=here, booted=1234.5)
    assert arrival.guest_booted(p, "g") == 1234.5  # it came here the same way: passed on


def test_the_destination_adds_the_downtime_to_its_arrival(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arrival, "ROW_WAIT", 0.2)
    p = paths(tmp_path)
    conn = state.connect(p.state_dir)
    state.insert(conn, "g", "starting", reason="migrated")
    state.insert(conn, "g", "running", detail="migrated here from host0", pid=7,
                 booted=1_700_000_000.0)
    assert not arrival.record_downtime(p, "g", "host9", 12)  # not from there
    assert arrival.record_downtime(p, "g", "host0", 12)
    assert not arrival.record_downtime(p, "g", "host0", 13)  # once
    last = state.events(conn, ["g"])[-1]
    assert last.detail == "migrated here from host0, downtime 12 ms"
    text = tracking.event_text(last)
    assert text.startswith("QEMU pid 7; migrated here from host0, downtime 12 ms; booted ")
    assert tracking.stamp(1_700_000_000.0) in text
    assert tracking._event_json(last)["booted"] == 1_700_000_000.0
    start = state.events(conn, ["g"])[0]
    assert tracking.event_text(start) == "live migration"  # the arrival's starting
    args = argparse.Namespace(name="g", source="host0", downtime=None)
    with pytest.raises(KvmagentError, match="--from and --downtime"):
        arrival.cmd_arrived(args, p)
    args.downtime = 5
    with pytest.raises(KvmagentError, match="no arrival from host0"):
        arrival.cmd_arrived(args, p)


def test_history_json_has_booted_for_every_event(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    p = paths(tmp_path)
    p.guests_dir.mkdir(parents=True, exist_ok=True)
    p.guest_config("g").write_text("")
    conn = state.connect(p.state_dir)
    now = state.now()
    state.insert(conn, "g", "starting", reason="migrated", at=now)
    state.insert(conn, "g", "running", detail="migrated here from a", pid=1, at=now,
                 booted=now.realtime - 3600)
    tracking.cmd_history(argparse.Namespace(name="g", since=None, json=True), p)
    doc = json.loads(capsys.readouterr().out)
    assert [e["booted"] for e in doc["events"]] == [None, now.realtime - 3600]
    assert doc["restarts"] == 0 and 3600 <= doc["uptime_seconds"] < 3700
    assert doc["cumulative_uptime_seconds"] < 100  # its time on this host only
