"""Runs inside the test host (see bench_scale.py): many guests at once, for
kvmagent (guests s1..sN, kvm@sN.service) and Debian's libvirt (domains
v1..vN).  Each command prints one line of JSON last.

  start kvmagent|libvirt COUNT   start COUNT guests by one command (kvmagent:
                                 one `systemctl start`; libvirt: COUNT `virsh
                                 start` at once), until all run and all
                                 consoles say GUEST-READY; the memory then
                                 (PSS of the managers' processes and of QEMU);
                                 then all stopped at once (ACPI)
  watch COUNT FILE               at boot, as a service: when each libvirt
                                 domain runs and its console is ready
  storm kvmagent|libvirt COUNT   after a boot: when all guests ran and were
                                 ready, from systemd's start
  stopped kvmagent|libvirt COUNT SINCE
                                 after a poweroff at SINCE (the epoch, s), in
                                 the next boot: when each guest was down, and
                                 whether by its own ACPI power-off

Times are the wall clock (the journal's, libvirt's logs' and this script's),
the same clock inside and outside the test host.  The parsing is pure
(tests/unit/test_bench_scale.py)."""

from __future__ import annotations

import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import smaps  # noqa: E402

READY = "GUEST-READY"
POWEROFF = "GUEST-POWEROFF"
LIBVIRT_RUN = Path("/run/libvirt/qemu")
LIBVIRT_LOG = Path("/var/log/libvirt/qemu")
LIBVIRT_DAEMONS = ("libvirtd.service", "virtlogd.service", "virtlockd.service")
WAIT = 900.0  # seconds any phase may take with 50 TCG guests on 2 cores


def names(manager: str, count: int) -> list[str]:
    return [f"{'s' if manager == 'kvmagent' else 'v'}{i}" for i in range(1, count + 1)]


def serial_log(name: str) -> Path:
    """Where a libvirt domain's serial console goes (bench_scale.py defines it so)."""
    return LIBVIRT_LOG / f"{name}.console"


# -- pure: what the logs say --------------------------------------------------

def kvmagent_events(entries: Iterable[Mapping[str, str]], guests: Iterable[str],
                    since_us: int = 0) -> dict[str, dict[str, int]]:
    """The first time (µs, the journal's) of each guest's events after
    SINCE_US: "running" (the supervisor's "guest NAME running": QMP said
    running), "ready" (GUEST-READY on its console), "poweroff" (the guest's
    own GUEST-POWEROFF), "stopped" ("guest NAME stopped"), "forced" (it did
    not power off in time: `quit` or SIGKILL, or stop --force)."""
    wanted = set(guests)
    out: dict[str, dict[str, int]] = {g: {} for g in wanted}
    for e in entries:
        guest, ts = e.get("GUEST", ""), int(e.get("__REALTIME_TIMESTAMP", 0))
        if guest not in wanted or ts < since_us:
            continue
        msg = e.get("MESSAGE", "")
        if not isinstance(msg, str):  # the journal gives non-UTF-8 as a list of bytes
            continue
        if e.get("SYSLOG_IDENTIFIER") == f"{guest}-console":
            kind = "ready" if READY in msg else "poweroff" if POWEROFF in msg else None
        elif msg.startswith(f"guest {guest} running, QEMU pid"):
            kind = "running"
        elif msg == f"guest {guest} stopped":
            kind = "stopped"
        elif "did not power off within" in msg or "without ACPI" in msg:
            kind = "forced"
        else:
            kind = None
        if kind is not None:
            out[guest].setdefault(kind, ts)
    return out


_SHUTTING_DOWN = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)([+-]\d{4}): "
                            r"shutting down, reason=(\w+)", re.M)


def libvirt_stop(qemu_log: str) -> tuple[str, float] | None:
    """libvirt's log of a domain's QEMU (/var/log/libvirt/qemu/NAME.log): the
    last stop, as (reason, the epoch in s); reason "shutdown" is the guest's
    own power-off, "destroyed" a kill.  None: no stop logged."""
    found = _SHUTTING_DOWN.findall(qemu_log)
    if not found:
        return None
    stamp, zone, reason = found[-1]
    when = datetime.datetime.strptime(stamp + zone, "%Y-%m-%d %H:%M:%S.%f%z")
    return reason, when.timestamp()


def spread(seconds: Iterable[float | None], count: int) -> dict[str, float | int | None]:
    """First, median and last of the guests' times (s), and how many have none."""
    got = sorted(s for s in seconds if s is not None)
    return {"first": got[0] if got else None, "median": statistics.median(got) if got else None,
            "all": got[-1] if len(got) == count else None, "missing": count - len(got)}


def since_start(times: Mapping[str, Mapping[str, float]], guests: list[str], t0: float
                ) -> dict[str, dict[str, float | int | None]]:
    """"running" and "ready": the spread of the guests' times after T0."""
    return {k: spread((times[g][k] - t0 if k in times.get(g, {}) else None for g in guests),
                      len(guests)) for k in ("running", "ready")}


# -- the test host ------------------------------------------------------------

def sh(*argv: str, timeout: float = 120, check: bool = True) -> str:
    return subprocess.run(argv, check=check, capture_output=True, text=True,
                          timeout=timeout).stdout


def journal(guests: list[str], since: float) -> list[dict[str, str]]:
    """The guests' entries since SINCE (the epoch, s), of any boot."""
    out = sh("journalctl", "--merge", f"--since=@{since:.6f}", "-o", "json", "--no-pager",
             "--output-fields=MESSAGE,SYSLOG_IDENTIFIER,GUEST",
             *[f"GUEST={g}" for g in guests], timeout=300)
    return [json.loads(line) for line in out.splitlines()]


def main_pid(unit: str) -> int:
    return int(sh("systemctl", "show", "-p", "MainPID", "--value", unit).strip() or 0)


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def rollup(pid: int) -> dict[str, int]:
    try:
        return smaps.rollup(Path(f"/proc/{pid}/smaps_rollup").read_text())
    except OSError:
        return {}


def libvirt_qemu_pid(name: str) -> int:
    try:
        return int((LIBVIRT_RUN / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return 0


def libvirt_running(name: str) -> bool:
    """libvirt writes the domain's status once its CPUs run (after `cont`)."""
    try:
        return "state='running'" in (LIBVIRT_RUN / f"{name}.xml").read_text()
    except OSError:
        return False


def console_ready(name: str) -> bool:
    try:
        return READY.encode() in serial_log(name).read_bytes()
    except OSError:
        return False


def wait_kvmagent(guests: list[str], since: float, kinds: tuple[str, ...]
                  ) -> dict[str, dict[str, float]]:
    """Each guest's events (the epoch, s) once all have KINDS, or past WAIT."""
    deadline = time.monotonic() + WAIT
    while True:
        found = kvmagent_events(journal(guests, since), guests, int(since * 1e6))
        ev = {g: {k: v / 1e6 for k, v in e.items()} for g, e in found.items()}
        if all(k in ev[g] for g in guests for k in kinds) or time.monotonic() > deadline:
            return ev
        time.sleep(1.0)


def watch_libvirt(guests: list[str], deadline: float) -> dict[str, dict[str, float]]:
    """Poll (every 0.1 s) until every domain runs and its console is ready."""
    seen: dict[str, dict[str, float]] = {g: {} for g in guests}
    while time.monotonic() < deadline:
        now = time.time()
        for g in guests:
            if "running" not in seen[g] and libvirt_running(g):
                seen[g]["running"] = now
            if "ready" not in seen[g] and console_ready(g):
                seen[g]["ready"] = now
        if all(len(s) == 2 for s in seen.values()):
            break
        time.sleep(0.1)
    return seen


def start_libvirt(procs: Mapping[str, subprocess.Popen[bytes]], deadline: float
                  ) -> dict[str, dict[str, float]]:
    """`virsh start` returns once the domain's CPUs run: "running"; then its
    console says GUEST-READY: "ready" (polled every 0.1 s)."""
    seen: dict[str, dict[str, float]] = {g: {} for g in procs}
    while not all(len(t) == 2 for t in seen.values()):
        if time.monotonic() > deadline:
            raise SystemExit(f"libvirt's guests not ready: {seen}")
        now = time.time()
        for g, p in procs.items():
            if "running" not in seen[g] and p.poll() is not None:
                if p.returncode:
                    raise SystemExit(f"virsh start {g} failed")
                seen[g]["running"] = now
            if "ready" not in seen[g] and console_ready(g):
                seen[g]["ready"] = now
        time.sleep(0.1)
    return seen


def memory(manager: str, guests: list[str], breakdown: bool) -> dict[str, object]:
    """PSS and USS (KiB) of the manager's processes and of the guests'
    QEMUs, read one after another within a moment."""
    if manager == "kvmagent":
        ours = [main_pid(f"kvm@{g}.service") for g in guests]
        qemus = [c for p in ours for c in children(p)]
    else:
        ours = [p for p in (main_pid(u) for u in LIBVIRT_DAEMONS) if p]
        qemus = [libvirt_qemu_pid(g) for g in guests]
    rolls = [rollup(p) for p in ours]
    result: dict[str, object] = {"manager": smaps.add(rolls),
                                 "qemu": smaps.add(rollup(p) for p in qemus if p)}
    if manager == "libvirt":
        result["daemons"] = {u: rollup(p).get("Pss", 0) for u, p in
                             ((u, main_pid(u)) for u in LIBVIRT_DAEMONS) if p}
    if breakdown and ours and manager == "kvmagent":  # one supervisor, by mapping
        result["supervisor"] = smaps.by_category(
            smaps.mappings(Path(f"/proc/{ours[0]}/smaps").read_text()))
    return result


def start(manager: str, count: int) -> dict[str, object]:
    guests = names(manager, count)
    t0 = time.time()
    if manager == "kvmagent":
        sh("systemctl", "start", *[f"kvm@{g}.service" for g in guests], timeout=WAIT)
        command = time.time() - t0
        times = wait_kvmagent(guests, t0, ("running", "ready"))
    else:
        for g in guests:  # an earlier run's console said GUEST-READY already
            serial_log(g).unlink(missing_ok=True)
        procs = {g: subprocess.Popen(["virsh", "start", g], stdout=subprocess.DEVNULL)
                 for g in guests}
        times = start_libvirt(procs, time.monotonic() + WAIT)
        command = max(t["running"] for t in times.values()) - t0
    time.sleep(3)  # settled: no start-up helper left
    mem = memory(manager, guests, breakdown=True)
    stop = stop_all(manager, guests)
    return {"command": command, "stop all": stop, "memory": mem,
            **since_start(times, guests, t0)}


def stop_all(manager: str, guests: list[str]) -> float:
    """All guests stopped at once by ACPI, until every QEMU is gone (s)."""
    t0 = time.monotonic()
    if manager == "kvmagent":
        sh("systemctl", "stop", *[f"kvm@{g}.service" for g in guests], timeout=WAIT)
    else:
        pids = [libvirt_qemu_pid(g) for g in guests]
        procs = [subprocess.Popen(["virsh", "shutdown", g], stdout=subprocess.DEVNULL)
                 for g in guests]
        for p in procs:
            p.wait(timeout=WAIT)
        while any(p and Path(f"/proc/{p}").exists() for p in pids):
            if time.monotonic() - t0 > WAIT:
                raise SystemExit("libvirt's guests did not shut down")
            time.sleep(0.05)
    return time.monotonic() - t0


def systemd_start() -> float:
    """When this boot's systemd started (the epoch, s)."""
    out = sh("busctl", "get-property", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
             "org.freedesktop.systemd1.Manager", "UserspaceTimestamp")
    return int(out.split()[1]) / 1e6


def storm(manager: str, count: int, watch_file: str) -> dict[str, object]:
    guests = names(manager, count)
    t0 = systemd_start()
    if manager == "kvmagent":
        times = wait_kvmagent(guests, t0, ("running", "ready"))
    else:
        deadline = time.monotonic() + WAIT
        while not Path(watch_file).exists() and time.monotonic() < deadline:
            time.sleep(1)
        times = json.loads(Path(watch_file).read_text())
    booted = sh("systemctl", "show", "-p", "FinishTimestampMonotonic", "--value").strip()
    user = sh("systemctl", "show", "-p", "UserspaceTimestampMonotonic", "--value").strip()
    return {"boot finished": (int(booted or 0) - int(user or 0)) / 1e6,
            **since_start(times, guests, t0)}


def stopped(manager: str, count: int, since: float) -> dict[str, object]:
    """After the previous boot's poweroff at SINCE: each guest's stop."""
    guests = names(manager, count)
    down: dict[str, float | None] = {}
    graceful: dict[str, bool] = {}
    if manager == "kvmagent":
        ev = kvmagent_events(journal(guests, since), guests, int(since * 1e6))
        for g in guests:
            e = ev[g]
            down[g] = e["stopped"] / 1e6 - since if "stopped" in e else None
            graceful[g] = "poweroff" in e and "forced" not in e
    else:
        for g in guests:
            try:
                stop = libvirt_stop((LIBVIRT_LOG / f"{g}.log").read_text(errors="replace"))
                said = serial_log(g).read_bytes()
            except OSError:
                stop, said = None, b""
            down[g] = stop[1] - since if stop is not None and stop[1] >= since else None
            graceful[g] = (stop is not None and stop[0] == "shutdown"
                           and POWEROFF.encode() in said)
    return {"down": spread(down.values(), count),
            "graceful": sum(graceful.values()), "count": count,
            "not graceful": sorted(g for g, ok in graceful.items() if not ok)}


def main() -> None:
    cmd, manager = sys.argv[1], sys.argv[2]
    if cmd == "watch":  # argv: watch COUNT FILE
        count, out = int(sys.argv[2]), Path(sys.argv[3])
        seen = watch_libvirt(names("libvirt", count), time.monotonic() + WAIT)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(seen))
        os.replace(tmp, out)
        return
    count = int(sys.argv[3])
    if cmd == "start":
        result = start(manager, count)
    elif cmd == "storm":
        result = storm(manager, count, sys.argv[4] if len(sys.argv) > 4 else "")
    elif cmd == "stopped":
        result = stopped(manager, count, float(sys.argv[4]))
    else:
        raise SystemExit(f"unknown command {cmd}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
