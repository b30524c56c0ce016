"""The scale benchmark's pure parts (#22): smaps read and summed
(bench/smaps.py), the guests' events read from the journal and libvirt's
logs (bench/scale_inner.py), the modules' costs grouped
(bench/supervisor_memory.py), and the printed tables of a whole result
(bench/bench_scale.py), so that a run of an hour does not end in a
traceback."""

from __future__ import annotations

import datetime

import pytest

from bench import bench_scale, scale_inner, smaps, supervisor_memory

ROLLUP = """55d1c0a00000-7ffd4b5fe000 ---p 00000000 00:00 0                          [rollup]
Rss:                9876 kB
Pss:                6543 kB
Pss_Anon:           5000 kB
Shared_Clean:       3000 kB
Private_Clean:       120 kB
Private_Dirty:      5100 kB
Swap:                  0 kB
"""

SMAPS = """5586f6a00000-5586f6b00000 r-xp 00001000 08:01 1234                       /usr/bin/python3.11
Size:               1024 kB
Rss:                 900 kB
Pss:                  30 kB
Private_Clean:         0 kB
Private_Dirty:         0 kB
VmFlags: rd ex mr mw me
5586f7000000-5586f7800000 rw-p 00000000 00:00 0                          [heap]
Size:               8192 kB
Pss:                3000 kB
Private_Clean:         0 kB
Private_Dirty:      3000 kB
7f0000000000-7f0000100000 rw-p 00000000 00:00 0 
Pss:                 800 kB
Private_Dirty:       800 kB
7f0000200000-7f0000210000 r-xp 00000000 08:01 99                         /usr/lib/python3.11/lib-dynload/_json.cpython-311-x86_64-linux-gnu.so
Pss:                  10 kB
Private_Clean:         4 kB
7f0000300000-7f0000400000 r-xp 00000000 08:01 98                         /usr/lib/x86_64-linux-gnu/libc.so.6
Pss:                 100 kB
7ffd4b5dd000-7ffd4b5fe000 rw-p 00000000 00:00 0                          [stack]
Pss:                 132 kB
Private_Dirty:       132 kB
7ffd4b5fe000-7ffd4b600000 r-xp 00000000 00:00 0                          [vdso]
Pss:                   0 kB
"""


def test_smaps_rollup_and_uss() -> None:
    r = smaps.rollup(ROLLUP)
    assert r["Pss"] == 6543 and r["Rss"] == 9876
    assert smaps.uss(r) == 5220
    assert smaps.add([r, r, {}]) == {"pss": 13086, "uss": 10440, "count": 3}


def test_smaps_by_mapping() -> None:
    maps = smaps.mappings(SMAPS)
    assert [name for name, _ in maps] == [
        "/usr/bin/python3.11", "[heap]", "",
        "/usr/lib/python3.11/lib-dynload/_json.cpython-311-x86_64-linux-gnu.so",
        "/usr/lib/x86_64-linux-gnu/libc.so.6", "[stack]", "[vdso]"]
    assert maps[0][1]["Rss"] == 900  # "VmFlags" is no field in kB
    cats = smaps.by_category(maps)
    assert cats[smaps.INTERPRETER] == {"pss": 30, "uss": 0}
    assert cats[smaps.HEAP] == {"pss": 3800, "uss": 3800}
    assert cats[smaps.LIBRARIES] == {"pss": 110, "uss": 4}
    assert cats[smaps.STACK]["pss"] == 132 and cats[smaps.OTHER]["pss"] == 0


@pytest.mark.parametrize("name, category", [
    ("/usr/lib/x86_64-linux-gnu/libpython3.13.so.1.0", smaps.INTERPRETER),
    ("/usr/bin/python3", smaps.INTERPRETER),
    ("/usr/bin/qemu-system-x86_64", smaps.OTHER),
    ("[anon:glibc]", smaps.HEAP),
    ("/var/lib/kvmagent/state.db", smaps.OTHER)])
def test_smaps_categories(name: str, category: str) -> None:
    assert smaps.category(name) == category


def entry(ts: int, message: str, guest: str, ident: str = "kvmagent") -> dict[str, str]:
    return {"__REALTIME_TIMESTAMP": str(ts), "MESSAGE": message, "GUEST": guest,
            "SYSLOG_IDENTIFIER": ident}


def test_kvmagent_events_from_the_journal() -> None:
    entries = [
        entry(50, "guest s1 running, QEMU pid 7", "s1"),  # before SINCE: an earlier start
        entry(100, "starting guest s1 (1 vCPU, 256 MiB; kvmagent 1.0)", "s1"),
        entry(200, "guest s1 running, QEMU pid 9", "s1"),
        entry(300, "GUEST-INIT kernel=6.1 smp=1", "s1", "s1-console"),
        entry(400, "GUEST-READY ip=none disks=none", "s1", "s1-console"),
        entry(410, "GUEST-READY ip=none disks=none", "s1", "s1-console"),  # the first counts
        entry(500, "guest s10 running, QEMU pid 11", "s10"),  # not "guest s1 ..."
        entry(600, "GUEST-POWEROFF", "s1", "s1-console"),
        entry(700, "guest s1 stopped", "s1"),
        entry(650, "guest s10 did not power off within 90 s; stopping QEMU", "s10"),
        entry(660, "guest s2 stopped", "s2"),
        {"__REALTIME_TIMESTAMP": "670", "MESSAGE": [1, 2], "GUEST": "s2"},  # not UTF-8
        entry(680, "guest s3 running, QEMU pid 12", "s3"),  # not asked for
    ]
    ev = scale_inner.kvmagent_events(entries, ["s1", "s10", "s2"], since_us=100)
    assert ev["s1"] == {"running": 200, "ready": 400, "poweroff": 600, "stopped": 700}
    assert ev["s10"] == {"running": 500, "forced": 650}
    assert ev["s2"] == {"stopped": 660}
    assert "s3" not in ev


def test_libvirt_stop_from_its_qemu_log() -> None:
    log = ("2026-12-05 08:00:00.100+0000: starting up libvirt version: 9.0.0\n"
           "LC_ALL=C /usr/bin/qemu-system-x86_64 -name guest=v1\n"
           "2026-12-05 08:01:00.000+0000: shutting down, reason=destroyed\n"
           "2026-12-05 08:02:00.000+0000: starting up libvirt version: 9.0.0\n"
           "2026-12-05 08:03:04.250+0000: shutting down, reason=shutdown\n")
    reason, when = scale_inner.libvirt_stop(log)  # type: ignore[misc]
    assert reason == "shutdown"
    assert when == datetime.datetime(2026, 12, 5, 8, 3, 4, 250000,
                                     tzinfo=datetime.timezone.utc).timestamp()
    assert scale_inner.libvirt_stop("2026-12-05 08:00:00.100+0000: starting up\n") is None


def test_spread_and_times_since_the_start() -> None:
    assert scale_inner.spread([3.0, None, 1.0, 2.0], 4) == {
        "first": 1.0, "median": 2.0, "all": None, "missing": 1}
    assert scale_inner.spread([2.0, 1.0], 2)["all"] == 2.0
    assert scale_inner.spread([], 2) == {"first": None, "median": None, "all": None,
                                         "missing": 2}
    times = {"s1": {"running": 110.0, "ready": 150.0}, "s2": {"running": 120.0}}
    got = scale_inner.since_start(times, ["s1", "s2"], 100.0)
    assert got["running"]["all"] == 20.0
    assert got["ready"] == {"first": 50.0, "median": 50.0, "all": None, "missing": 1}
    assert scale_inner.names("libvirt", 2) == ["v1", "v2"]


def test_module_costs_grouped() -> None:
    cost = {"re._parser": 100, "re": 50, "kvmagent.paths": 70, "kvmagent": 10, "json": 5}
    assert supervisor_memory.group(cost) == [("re", 150), ("kvmagent.paths", 70),
                                             ("kvmagent", 10), ("json", 5)]


def memory(per_manager: int, count: int) -> dict[str, object]:
    cats = {c: {"pss": 100, "uss": 90} for c in smaps.CATEGORIES}
    return {"manager": {"pss": per_manager, "uss": per_manager, "count": count},
            "qemu": {"pss": 200000 * count, "uss": 190000 * count, "count": count},
            "supervisor": cats, "daemons": {"libvirtd.service": 25000,
                                            "virtlogd.service": 5000}}


def spread(all_: float | None) -> dict[str, object]:
    return {"first": 1.0, "median": 2.0, "all": all_, "missing": 0 if all_ else 1}


def whole_result() -> dict[str, object]:
    r: dict[str, object] = {"counts": [1, 5], "n": 5, "facts": {
        "cores": "2", "memory": "23.5 GiB", "kernel": "6.1", "debian": "bookworm",
        "qemu": "1:7.2", "libvirt": "9.0.0", "load": "1 1 1"},
        "modules": {"bare": {"pss": 4000, "uss": 3000}, "imported": {"pss": 7000, "uss": 6000},
                    "no pyc": {"pss": 8000, "uss": 7000}, "modules": 120,
                    "python": "3.11.2", "categories": {},
                    "groups": [("typing", 600000), ("re", 300000)]},
        "poweroff kvmagent": 8.0, "poweroff libvirt": 20.0, "libvirt-guests": "active"}
    for count in (1, 5):
        for m in ("kvmagent", "libvirt"):
            r[f"start {m} {count}"] = {"command": 3.0, "stop all": 4.0,
                                       "memory": memory(6000 * count, count),
                                       "running": spread(3.0), "ready": spread(9.0)}
    for m in ("kvmagent", "libvirt"):
        r[f"storm {m}"] = {"boot finished": 5.0, "running": spread(10.0),
                           "ready": spread(None if m == "libvirt" else 30.0)}
    r["stopped kvmagent"] = {"down": spread(6.0), "graceful": 5, "count": 5,
                             "not graceful": []}
    r["stopped libvirt"] = {"down": spread(18.0), "graceful": 4, "count": 5,
                            "not graceful": ["v3"]}
    return r


def test_the_report_of_a_whole_run() -> None:
    out = bench_scale.report(whole_result())
    assert "goal: ≤ 8 MiB PSS added per guest at 5 guests: 5.9 MiB, met" in out
    assert "| 5      | 29.3" in out  # 5 supervisors together
    assert "0.33×" in out  # shutdown, kvmagent/libvirt
    assert "5 of 5" in out and "4 of 5" in out
    assert "libvirt: not stopped by their own power-off: v3" in out
    assert "typing" in out
