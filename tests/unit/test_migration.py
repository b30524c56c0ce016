"""Live migration's decisions (kvmagent.render.migration), pure: the
pre-flight from facts of both hosts, what the command and the destination's
supervisor do next, the progress line; and the incoming request's record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmagent.errors import ExitStatus
from kvmagent.render.migration import (CONFIRM_TIMEOUT, MAX_PASSES, STALL_LIMIT, STREAM_WAIT,
                                       Arrival, SideFacts, Step, differences, flatten,
                                       incoming_step, not_converging, preflight, progress_line,
                                       source_step, stalled)
from kvmagent.render.migration import DEFAULT_BANDWIDTH, DEFAULT_DOWNTIME_MS, parameters
from kvmagent.render.migration import ARRIVAL_FAILED, SETTLE_LIMIT, Settle, Where, settle_step
from kvmagent.render.migration import event_time, paused_ms
from kvmagent.render.plan import Incoming

CONFIG = {"cpus": 1, "memory": "256M", "machine": "pc",
          "kernel": {"image": "/srv/shared/vmlinuz"},
          "nic": [{"mode": "bridge", "bridge": "br-kvm", "mac": "52:54:00:00:00:01"}],
          "disk": []}
HERE = SideFacts(CONFIG, "", True, [], ["pc", "pc-i440fx-7.2"], "7.2.22")
THERE = SideFacts(CONFIG, "", False, [], ["pc", "pc-i440fx-7.2"], "7.2.22")


def check(here: SideFacts = HERE, there: SideFacts = THERE, machine: str = "pc-i440fx-7.2",
          cpu: str = "Westmere", force: bool = False) -> list[tuple[str, ExitStatus]]:
    return [(r.message, r.status) for r in preflight("g", "host2", here, there,
                                                     machine=machine, cpu=cpu, force=force)]


def test_a_guest_that_may_move() -> None:
    assert check() == []


def test_refusals_name_what_and_say_how() -> None:
    assert check(here=HERE._replace(running=False)) == [
        ("guest g is not running here", ExitStatus.NOT_RUNNING)]
    assert check(there=THERE._replace(running=True)) == [
        ("guest g is running on host2 already", ExitStatus.FAILURE)]
    assert check(there=THERE._replace(config=None, error="unknown guest 'g'")) == [
        ("host2: guest g: unknown guest 'g'", ExitStatus.CONFIG)]
    other = dict(CONFIG, memory="512M", nic=[dict(CONFIG["nic"][0], mac="52:54:00:00:00:02")])
    assert check(there=THERE._replace(config=other)) == [
        ("guest g's configuration on host2 differs in: memory, nic[0].mac", ExitStatus.CONFIG)]
    problem = "guests/g.toml: nic[0].bridge = \"br-kvm\": no such bridge"
    (refusal,) = preflight("g", "host2", HERE, THERE._replace(problems=[problem]),
                           machine="pc-i440fx-7.2", cpu="Westmere")
    assert refusal.message == f"host2: {problem}" and refusal.status is ExitStatus.HOST_NOT_READY
    disk = "guests/g.toml: disk[0].path = \"/var/lib/g.img\": disk does not exist"
    (refusal,) = preflight("g", "host2", HERE, THERE._replace(problems=[disk]),
                           machine="pc-i440fx-7.2", cpu="Westmere")
    assert "or be copied there: --copy-storage" in str(refusal.hint)
    assert check(there=THERE._replace(machines=["pc", "pc-i440fx-9.2"])) == [
        ("host2: QEMU 7.2.22 has no machine type pc-i440fx-7.2 (guest g's QEMU here runs it)",
         ExitStatus.HOST_NOT_READY)]


def test_cpu_host_only_with_force_and_odd_values_never() -> None:
    assert check(cpu="host") == [
        ("guest g runs with -cpu host: its CPU is this host's, which host2's may not be",
         ExitStatus.FAILURE)]
    assert check(cpu="host", force=True) == []
    assert check(cpu="max,+avx") == [  # cpu = "host" under TCG
        ("guest g runs with -cpu max: its CPU is all that this host's QEMU and accelerator "
         "offer, which host2's may not be", ExitStatus.FAILURE)]
    assert check(cpu="max", force=True) == []
    assert check(cpu="Westmere,-sandbox") == []  # features are -cpu's own; still one argv word
    assert [s for _, s in check(machine="pc,accel=kvm")] == [ExitStatus.FAILURE]
    assert [s for _, s in check(cpu="-incoming")] == [ExitStatus.FAILURE]


def test_every_refusal_at_once() -> None:
    assert len(check(here=HERE._replace(running=False), there=THERE._replace(
        running=True, problems=["a", "b"]), cpu="host")) == 5


def test_flatten_and_differences() -> None:
    assert flatten({"a": {"b": 1}, "n": [{"m": 2}], "l": ["x"]}) == {
        "a.b": 1, "n[0].m": 2, "n.count": 1, "l": ["x"]}
    assert differences(CONFIG, dict(CONFIG, nic=[])) == [
        "nic", "nic.count", "nic[0].bridge", "nic[0].mac", "nic[0].mode"]


def test_side_facts_from_json_are_checked() -> None:
    assert SideFacts.from_json(HERE._asdict()) == HERE
    with pytest.raises(ValueError, match="running"):
        SideFacts.from_json(dict(HERE._asdict(), running="yes"))
    with pytest.raises(ValueError):
        SideFacts.from_json([])


@pytest.mark.parametrize("phase, dest, interrupted, completed_for, gone, step", [
    ("active", "listening", False, None, False, Step.WAIT),
    ("completed", "listening", False, 1.0, False, Step.WAIT),
    ("completed", "running", False, 1.0, False, Step.END),
    ("completed", "running", True, 1.0, True, Step.END),  # it runs there: too late to cancel
    ("active", "listening", True, None, False, Step.CANCEL),
    ("active", "failed: QEMU exited", False, None, False, Step.CANCEL),
    ("active", "listening", False, None, True, Step.CANCEL),
    ("failed", "listening", False, None, False, Step.CANCEL),
    # the whole guest went there: never cancelled (resumed) here, asked
    ("completed", "listening", False, CONFIRM_TIMEOUT + 1, False, Step.ASK),
    ("completed", "listening", True, 1.0, False, Step.ASK),
    ("completed", "listening", False, 1.0, True, Step.ASK),
    ("completed", "failed: the supervisor ended", False, 1.0, False, Step.ASK),
])
def test_source_step(phase: str, dest: str, interrupted: bool, completed_for: float | None,
                     gone: bool, step: Step) -> None:
    assert source_step(phase, dest, interrupted=interrupted, completed_for=completed_for,
                       dest_gone=gone).step is step


def busy(passes: int, expected: int, status: str = "active") -> dict[str, object]:
    return {"status": status, "expected-downtime": expected,
            "ram": {"dirty-sync-count": passes, "remaining": 16 << 20}}


def test_a_move_that_cannot_converge_is_cancelled() -> None:
    def step(info: dict[str, object], limit: int = 300) -> Step:
        return source_step(str(info.get("status")), "incoming", interrupted=False,
                           completed_for=None, dest_gone=False, info=info,
                           limit_ms=limit).step
    assert step(busy(2, 5000)) is Step.WAIT  # early passes: it may yet
    assert step(busy(MAX_PASSES - 1, 5000)) is Step.WAIT
    assert step(busy(MAX_PASSES, 5000)) is Step.CANCEL
    assert step(busy(MAX_PASSES, 5000), limit=5000) is Step.WAIT  # it fits: it pauses now
    assert step(busy(MAX_PASSES + 50, 200)) is Step.WAIT
    assert step(busy(MAX_PASSES, 5000, "device")) is Step.WAIT  # the last of it, paused
    assert step({"status": "active"}) is Step.WAIT  # QEMU said nothing of passes
    why = not_converging(busy(MAX_PASSES, 5000), 1)
    assert why is not None and f"after {MAX_PASSES} passes" in why
    assert "5000 ms of downtime (limit 1 ms)" in why and "--max-downtime" in why
    manual = (Path(__file__).resolve().parents[2] / "docs" / "kvmagent.1.md").read_text()
    assert f"after {MAX_PASSES} passes over its memory" in manual


def test_incoming_step() -> None:
    assert incoming_step(None, 1.0) == (Arrival.WAIT, "")
    assert incoming_step(None, STREAM_WAIT + 1)[0] is Arrival.FAIL
    assert incoming_step("active", STREAM_WAIT + 100) == (Arrival.WAIT, "")
    assert incoming_step("completed", 5.0) == (Arrival.DONE, "")
    assert incoming_step("failed", 5.0) == (Arrival.FAIL, "the incoming migration failed")


def test_progress_line() -> None:
    info = {"status": "active", "expected-downtime": 300, "total-time": 2500,
            "ram": {"transferred": 3 << 20, "remaining": 200 << 20, "mbps": 8.4,
                    "dirty-pages-rate": 120}}
    assert progress_line(info) == ("active, RAM 3.0 MiB sent, 200.0 MiB left, 8.4 Mbit/s, "
                                   "120 dirty pages/s, expected downtime 300 ms, 2.5 s")
    assert progress_line({"status": "setup"}) == "setup"


def test_incoming_request_round_trip() -> None:
    req = Incoming("pc-i440fx-7.2", "max", "host1")
    assert Incoming.from_json(req.to_json()) == req
    booted = Incoming("pc-i440fx-7.2", "max", "host1", 1_700_000_000.25)
    assert Incoming.from_json(booted.to_json()) == booted
    # an older kvmagent's request: no boot known, the uptime counts from here
    assert Incoming.from_json('{"machine": "pc", "cpu": "max", "source": "x"}').booted is None
    with pytest.raises(ValueError, match="booted"):
        Incoming.from_json('{"machine": "pc", "cpu": "max", "source": "x", "booted": "x"}')
    with pytest.raises(ValueError, match="cpu"):
        Incoming.from_json('{"machine": "pc", "cpu": 1, "source": "x"}')


def test_a_stream_that_stalls_is_given_up() -> None:
    assert stalled("active", STALL_LIMIT - 1) is None
    assert "link to the source is gone" in str(stalled("active", STALL_LIMIT + 1))
    assert stalled("completed", 1000.0) is None  # done: nothing more comes, rightly
    assert stalled("running", 1000.0) is None


def test_every_migration_sets_both_parameters() -> None:
    """QEMU keeps what migrate-set-parameters set: a cancelled migration's
    --bandwidth 1M would slow the next one, so each sets both, its
    defaults QEMU's own (query-migrate-parameters of a fresh QEMU 7.2)."""
    assert parameters(None, None) == {"downtime-limit": 300, "max-bandwidth": 134217728}
    assert (DEFAULT_DOWNTIME_MS, DEFAULT_BANDWIDTH) == (300, 128 << 20)
    assert parameters(50, 1 << 20) == {"downtime-limit": 50, "max-bandwidth": 1 << 20}
    assert parameters(True, "1M") == parameters(0, -1) == parameters(None, None)


FAILED_ARRIVAL = ["stopped", "migrated", f"{ARRIVAL_FAILED}: no data came for 15 s"]


@pytest.mark.parametrize("there, waited, settle", [
    # it runs there: ended here
    (Where("active", "running", False, ["running", None, "arrived from a"]), 1.0, Settle.END),
    (Where("active", "running", False, None), SETTLE_LIMIT + 5, Settle.END),
    # its arrival failed there and nothing runs: resumed here
    (Where("inactive", None, False, FAILED_ARRIVAL), 1.0, Settle.RESUME),
    (Where("failed", None, False, FAILED_ARRIVAL), 1.0, Settle.RESUME),
    # still arriving, or stopping after a failure: asked again
    (Where("activating", "inmigrate", True, None), 1.0, Settle.WAIT),
    (Where("deactivating", None, False, FAILED_ARRIVAL), 1.0, Settle.WAIT),
    (None, 1.0, Settle.WAIT),
    # inactive, but the record does not say that its arrival failed (it
    # may have run, and stopped): never resumed here on a guess
    (Where("inactive", None, False, ["stopped", "poweroff", None]), 1.0, Settle.WAIT),
    (Where("inactive", None, False, None), 1.0, Settle.WAIT),
    (Where("inactive", None, False, ["stopped", "poweroff", None]), SETTLE_LIMIT + 1,
     Settle.HOLD),
    (None, SETTLE_LIMIT + 1, Settle.HOLD),
    (Where("activating", "inmigrate", True, None), SETTLE_LIMIT + 1, Settle.HOLD),
])
def test_settle_step(there: Where | None, waited: float, settle: Settle) -> None:
    step, why = settle_step(there, waited)
    assert step is settle
    assert bool(why) is (settle is not Settle.WAIT)


def test_where_from_json() -> None:
    there = Where("inactive", None, False, FAILED_ARRIVAL)
    assert Where.from_json(json.loads(json.dumps(there._asdict()))) == there
    with pytest.raises(ValueError, match="runstate: 5 is not"):
        Where.from_json({"unit": "active", "runstate": 5, "arriving": False, "last": None})
    with pytest.raises(ValueError, match=r"last\[2\]: 3 is not"):
        Where.from_json({"unit": "active", "runstate": None, "arriving": False,
                         "last": ["failed", None, 3]})
    for bad in ([], {"unit": None}, {}):
        with pytest.raises(ValueError):
            Where.from_json(bad)


def test_paused_ms_from_the_source_pause_to_the_destination_resume() -> None:
    stop = {"event": "STOP", "data": {}, "timestamp": {"seconds": 1764900000,
                                                       "microseconds": 250000}}
    assert event_time(stop) == 1764900000.25
    assert event_time({"event": "STOP"}) is None
    assert event_time({"timestamp": {"seconds": "1", "microseconds": 0}}) is None
    assert paused_ms(1764900000.25, 1764900000.371) == 121
    assert paused_ms(None, 1764900000.371) is None  # an older destination said nothing
    assert paused_ms(1764900000.25, True) is None
    assert paused_ms(1764900000.25, 1764899999.0) is None  # clocks that disagree
    assert paused_ms(1764900000.25, 1764900000.25 + 7200) is None


def test_a_tcg_guest_on_a_qemu_before_9_is_warned_of() -> None:
    from kvmagent.render.migration import tcg_warning
    said = tcg_warning("g", False, [7, 2, 19])
    assert said is not None and "guest g runs without KVM (TCG) on QEMU 7.2.19" in said
    assert "before 9.0" in said
    for kvm, qemu in ((True, [7, 2, 19]), (False, [9, 0, 0]), (False, [10, 0, 3]),
                      (None, [7, 2, 0]), (False, None), (False, [7, 2]), (False, ["7", 2, 0])):
        assert tcg_warning("g", kvm, qemu) is None, (kvm, qemu)


def test_the_destinations_lines_are_typed() -> None:
    """migrate-incoming's lines to the source: the event and the fields it
    has, read back as written; another kvmagent's line of another shape
    counts by its event (an older destination said QEMU's state as
    "status"); anything else is no event."""
    from kvmagent.render.migration import Said
    for said in (Said("listening"), Said("failed", error="no bridge", status=5),
                 Said("tcp", address="192.0.2.1", port=49152),
                 Said("tcp-connected", peer="192.0.2.2", dropped=["192.0.2.9"]),
                 Said("incoming", state="active"), Said("running", resumed_at=1.7e9)):
        assert Said.from_line(said.line()) == said
    assert json.loads(Said("failed", error="x").line()) == {"event": "failed", "error": "x"}
    assert Said.from_line(b'{"event": "incoming", "status": "active"}') == Said("incoming")
    assert Said.from_line('{"event": "failed", "error": "gone", "status": "5"}') == Said(
        "failed", error="gone")
    assert Said.from_line(b'{"event": "running", "resumed_at": 1700000000}') == Said(
        "running", resumed_at=1.7e9)
    for line in (b"Warning: Permanently added host", b"[]", b'{"error": "x"}', b""):
        assert Said.from_line(line) is None
