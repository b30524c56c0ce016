"""Runs inside the test host (bench_lifecycle.py --trace): where one start
and one hard stop of each manager spend their milliseconds, from the
journal's timestamps and libvirt's own debug log.  Prints text.
argv: ROUNDS (starts traced per way; each timeline printed, the counts'
medians summed up)

kvmagent: every journal entry of the guest's units (systemd's, the
supervisor's, QEMU's scope, machined's) against the command's start; the
command alone on a guest already running (what the CLI costs: Python,
imports, configuration, D-Bus). A graceful stop once the guest is off, step by
step, with systemd's log level at debug for it (STOP_STEPS).  libvirt: libvirtd's log of its QEMU
monitor (QMP) for one `virsh start` and one `virsh destroy`: the commands
it sends and when, first to last."""

from __future__ import annotations

import collections
import json
import os
import re
import statistics
import subprocess
import sys
import time

GUEST = "bench"
LOG = "/var/log/libvirt/bench-trace.log"
Event = tuple[float, str]  # (ms since the command started, what)


def now_us() -> int:
    return time.clock_gettime_ns(time.CLOCK_REALTIME) // 1000


def run(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return (time.perf_counter() - t0) * 1000


def journal_since(t0_us: int) -> list[Event]:
    out = subprocess.run(["journalctl", "-o", "json", "--no-pager", "--since",
                          f"@{t0_us / 1e6:.6f}"], capture_output=True, text=True).stdout
    events = []
    for line in out.splitlines():
        e = json.loads(line)
        unit = e.get("_SYSTEMD_UNIT", "") + " " + e.get("UNIT", "") + e.get("USER_UNIT", "")
        text = e.get("MESSAGE", "")
        if isinstance(text, list):
            text = bytes(text).decode(errors="replace")
        if GUEST not in unit and GUEST not in text:
            continue
        ts = int(e.get("_SOURCE_REALTIME_TIMESTAMP") or e["__REALTIME_TIMESTAMP"])
        who = e.get("SYSLOG_IDENTIFIER") or e.get("_COMM", "?")
        events.append(((ts - t0_us) / 1000, f"{who}: {text[:110]}"))
    return sorted(events)


def wait_banner(since_us: int) -> None:
    while True:
        out = subprocess.run(["journalctl", "-u", f"kvm@{GUEST}", "--since",
                              f"@{since_us / 1e6:.6f}", "-o", "cat", "--no-pager"],
                             capture_output=True, text=True).stdout
        if "Enter 'help'" in out:
            time.sleep(0.5)
            return
        time.sleep(0.1)


def kvmagent_trace(argv: list[str], stop: list[str]) -> tuple[float, list[Event], float,
                                                                 list[Event]]:
    subprocess.run(["systemctl", "reset-failed", f"kvm@{GUEST}"], stderr=subprocess.DEVNULL)
    t0 = now_us()
    took = run(argv)
    time.sleep(0.3)
    start = journal_since(t0)
    wait_banner(t0)
    t1 = now_us()
    stop_took = run(stop)
    time.sleep(0.3)
    return took, start, stop_took, journal_since(t1)


# A graceful stop after the guest is off, step by step: each step's first
# journal entry (the supervisor's, and systemd's own at log level debug:
# the ExecStopPost= process's fork, its exec, its exit).
STOP_STEPS = [("the guest powered off", "powered off"),
              ("the supervisor's \"guest stopped\" (QEMU exited)", f"guest {GUEST} stopped"),
              ("the supervisor exited", "Main process exited"),
              ("systemd forked ExecStopPost=", "Forked /"),
              ("its exec", "Executing:"),
              ("it exited", "Control process exited"),
              ("the unit inactive", f"kvm@{GUEST}.service: Deactivated")]


def stop_steps(rounds: int) -> dict[str, list[float]]:
    """ROUNDS graceful stops (systemctl stop) with systemd's debug log on:
    the milliseconds from each step to the next."""
    level = subprocess.run(["systemd-analyze", "log-level"], capture_output=True,
                           text=True).stdout.strip() or "info"
    gaps: dict[str, list[float]] = collections.defaultdict(list)
    subprocess.run(["systemd-analyze", "log-level", "debug"], check=True)
    try:
        for _ in range(rounds):
            subprocess.run(["systemctl", "reset-failed", f"kvm@{GUEST}"],
                           stderr=subprocess.DEVNULL)
            t0 = now_us()
            run(["systemctl", "start", f"kvm@{GUEST}"])
            wait_banner(t0)
            t1 = now_us()
            run(["systemctl", "stop", f"kvm@{GUEST}"])
            time.sleep(0.3)
            events = journal_since(t1)
            at = [next((ms for ms, what in events if marker in what), None)
                  for _, marker in STOP_STEPS]
            for (step, _), before, after in zip(STOP_STEPS[1:], at, at[1:]):
                if before is not None and after is not None:
                    gaps[step].append(after - before)
    finally:
        subprocess.run(["systemd-analyze", "log-level", level], check=True)
    return gaps


def libvirt_log(on: bool) -> None:
    if on:
        open(LOG, "w").close()
        subprocess.run(["virt-admin", "daemon-log-filters", "1:qemu.qemu_monitor 3:*"],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["virt-admin", "daemon-log-outputs", f"1:file:{LOG}"], check=True,
                       stdout=subprocess.DEVNULL)
    else:
        subprocess.run(["virt-admin", "daemon-log-filters", ""], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["virt-admin", "daemon-log-outputs", "3:journald"], check=True,
                       stdout=subprocess.DEVNULL)


QMP_SENT = re.compile(r"^(\S+ \S+): .*QEMU_MONITOR_SEND_MSG: .*"
                      r"""\{"execute":"([^"]+)\"""")
STAMP = "%Y-%m-%d %H:%M:%S.%f%z"


def qmp_commands(t0_us: int) -> list[Event]:
    """The QMP commands libvirtd sent since t0 (its log's own timestamps)."""
    from datetime import datetime
    events = []
    with open(LOG) as f:
        for line in f:
            m = QMP_SENT.search(line)
            if m:
                ts = datetime.strptime(m[1], STAMP).timestamp() * 1e6
                events.append(((ts - t0_us) / 1000, m[2]))
    return events


def libvirt_trace() -> tuple[float, list[Event], float, list[Event]]:
    libvirt_log(True)
    try:
        t0 = now_us()
        took = run(["virsh", "start", GUEST])
        start = qmp_commands(t0)
        time.sleep(2)
        open(LOG, "w").close()
        t1 = now_us()
        stop_took = run(["virsh", "destroy", GUEST])
        stop = qmp_commands(t1)
    finally:
        libvirt_log(False)
    return took, start, stop_took, stop


def show(title: str, took: float, events: list[Event]) -> None:
    print(f"\n{title}: the command took {took:.0f} ms")
    for ms, what in events:
        print(f"  {ms:7.1f} ms  {what}")


def summary(events: list[Event]) -> str:
    counts = collections.Counter(what for _, what in events)
    if not events:
        return "no QMP commands"
    return (f"{len(events)} QMP commands from {events[0][0]:.0f} to {events[-1][0]:.0f} ms: "
            + ", ".join(f"{n}× {c}" for c, n in counts.most_common(8)))


def main() -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    idle: dict[str, list[float]] = collections.defaultdict(list)
    for n in range(rounds):
        for start_argv, stop_argv in (
                (["systemctl", "start", f"kvm@{GUEST}"], ["kvmagent", "stop", "--force", GUEST]),
                (["kvmagent", "start", GUEST], ["kvmagent", "stop", GUEST]),
                (["systemctl", "start", f"kvm@{GUEST}"], ["systemctl", "stop", f"kvm@{GUEST}"])):
            took, start, stop_took, stop = kvmagent_trace(start_argv, stop_argv)
            if n == rounds - 1:
                show(" ".join(start_argv), took, start)
                show(" ".join(stop_argv), stop_took, stop)
        # the commands alone: on a guest that runs already (start) or does not (stop)
        subprocess.run(["systemctl", "start", f"kvm@{GUEST}"], check=True)
        for argv in (["systemctl", "start", f"kvm@{GUEST}"], ["kvmagent", "start", GUEST],
                     # not a short way: through argparse
                     ["kvmagent", "--config-dir", "/etc/kvmagent", "start", GUEST]):
            idle[" ".join(argv) + " (running already)"].append(run(argv))
        subprocess.run(["systemctl", "stop", f"kvm@{GUEST}"], check=True)
        for argv in (["/usr/bin/python3", "-c", "pass"],
                     ["/usr/bin/python3", "-S", "-c", "pass"],
                     ["virsh", "domstate", GUEST], ["virsh", "version"]):
            idle[" ".join(argv)].append(run(argv))
        took, start, stop_took, stop = libvirt_trace()
        if n == rounds - 1:  # (its ~400 qom-get calls, one a line, are summed up)
            show("virsh start bench, libvirtd's QMP commands", took,
                 [e for e in start if e[1] != "qom-get"])
            print("  " + summary(start))
            show("virsh destroy bench, libvirtd's QMP commands", stop_took, stop)
            print("  " + summary(stop))
    gaps = stop_steps(rounds + 2)
    print(f"\n`systemctl stop kvm@{GUEST}` once the guest is off, step by step (systemd's "
          f"debug log; medians of {rounds + 2}, ms):")
    for step, times in gaps.items():
        print(f"  {statistics.median(times):6.1f}  -> {step}  ({min(times):.1f}-{max(times):.1f})")
    # where a `kvmagent start` of a running guest spends its time
    subprocess.run(["systemctl", "start", f"kvm@{GUEST}"], check=True)
    r = subprocess.run(["/usr/bin/python3", "-m", "cProfile", "-s", "cumtime",
                        "/usr/bin/kvmagent", "start", GUEST], capture_output=True, text=True)
    print("\n`kvmagent start` of a running guest, profiled:")
    print("\n".join(r.stdout.splitlines()[:30]))
    subprocess.run(["systemctl", "stop", f"kvm@{GUEST}"], check=True)
    # the supervisor's imports, in one start (Python's own -X importtime, to the journal)
    dropin = f"/run/systemd/system/kvm@{GUEST}.service.d"
    os.makedirs(dropin, exist_ok=True)
    with open(f"{dropin}/90-importtime.conf", "w") as f:
        f.write("[Service]\nEnvironment=PYTHONPROFILEIMPORTTIME=1\n")
    subprocess.run(["systemctl", "daemon-reload"], check=True)
    t0 = now_us()
    subprocess.run(["systemctl", "start", f"kvm@{GUEST}"], check=True)
    subprocess.run(["systemctl", "stop", f"kvm@{GUEST}"], check=True)
    os.remove(f"{dropin}/90-importtime.conf")
    subprocess.run(["systemctl", "daemon-reload"], check=True)
    lines = [what.split(": ", 1)[1] for _, what in journal_since(t0) if "import time:" in what]
    top = [ln for ln in lines if ln.count("|") == 2 and not ln.split("|")[2].startswith("  ")]
    top = [ln for ln in top if "cumulative" not in ln]
    print(f"\nthe supervisor's and its planner's imports in one start: {len(lines)} modules; "
          f"the top-level ones, by cumulative µs:")
    top.sort(key=lambda ln: -int(ln.split("|")[1]))
    print("\n".join(top[:20]))
    print("  sum of top-level:", sum(int(ln.split("|")[1]) for ln in top) // 1000, "ms")
    print("\nthe commands alone (medians):")
    for what, times in idle.items():
        print(f"  {statistics.median(times):6.0f} ms  {what}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("LANG", "C.UTF-8")
    sys.exit(main())
