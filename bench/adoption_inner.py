"""Runs inside the test host (see bench_adoption.py): kill -9 of the
supervisor, a reload, and systemctl restart of the tiny guest, timed from
the journal's own timestamps; prints JSON.  argv: N"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

GUEST = "bench"
UNIT = f"kvm@{GUEST}.service"
TICKER = "i=0; while true; do echo TICK-$i; i=$((i+1)); sleep 0.02; done\n"


def sh(*argv: str, input: str | None = None, timeout: float = 60) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, input=input,
                          timeout=timeout).stdout


def main_pid() -> str:
    return sh("systemctl", "show", UNIT, "--property=MainPID", "--value").strip()


def now_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_REALTIME) // 1000


def entries(after_usec: int) -> list[dict[str, str]]:
    out = sh("journalctl", f"GUEST={GUEST}", "--since", f"@{after_usec / 1e6:.6f}",
             "-o", "json", "--no-pager")
    return [json.loads(line) for line in out.splitlines()]


def first(after_usec: int, test, timeout: float = 60) -> int:  # type: ignore[no-untyped-def]
    """The journal timestamp (µs) of the first entry after AFTER_USEC that passes TEST."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in entries(after_usec):
            if int(e["__REALTIME_TIMESTAMP"]) >= after_usec and test(e):
                return int(e["__REALTIME_TIMESTAMP"])
        time.sleep(0.05)
    raise SystemExit(f"nothing within {timeout} s")


def console(e: dict[str, str]) -> bool:
    return e.get("SYSLOG_IDENTIFIER") == f"{GUEST}-console"


def start_ticker() -> None:
    sh("systemctl", "start", UNIT, timeout=120)
    first(0, lambda e: console(e) and "Enter 'help'" in e.get("MESSAGE", ""), 120)
    sh("kvmagent", "console", GUEST, "--timeout", "0.5", input=TICKER)
    first(now_usec() - 2_000_000, lambda e: console(e) and "TICK-" in e.get("MESSAGE", ""))


def main() -> None:
    n = int(sys.argv[1])
    r: dict[str, list[float]] = {k: [] for k in (
        "kill console", "kill qmp", "reload console", "reload command", "restart console",
        "restart command")}
    start_ticker()
    for _ in range(n):
        time.sleep(1)
        old = main_pid()
        t0 = now_usec()
        sh("kill", "-9", old)
        # "taken over" is said once the new supervisor's query-status was
        # answered over the kept QMP connection
        qmp = first(t0, lambda e: "taken over: QEMU pid" in e.get("MESSAGE", ""))
        back = first(t0, lambda e: console(e) and e.get("_PID") not in (None, old))
        r["kill qmp"].append((qmp - t0) / 1000)
        r["kill console"].append((back - t0) / 1000)
    for _ in range(n):
        time.sleep(1)
        t0 = now_usec()
        m0 = time.monotonic()
        sh("kvmagent", "reload", GUEST, timeout=60)
        r["reload command"].append((time.monotonic() - m0) * 1000)
        done = first(t0, lambda e: "supervisor reloaded" in e.get("MESSAGE", ""))
        back = first(done, console)
        r["reload console"].append((back - t0) / 1000)
    for _ in range(max(1, n // 2)):
        t0 = now_usec()
        m0 = time.monotonic()
        sh("systemctl", "restart", UNIT, timeout=120)
        r["restart command"].append((time.monotonic() - m0) * 1000)
        # the guest boots again: its console is back with its first line
        qemu = sh("systemctl", "show", UNIT, "--property=MainPID", "--value").strip()
        back = first(t0, lambda e: console(e) and e.get("_PID") == qemu)
        r["restart console"].append((back - t0) / 1000)
        start_ticker()
    sh("systemctl", "stop", UNIT, timeout=120)
    print(json.dumps({k: statistics.median(v) for k, v in r.items()}))


if __name__ == "__main__":
    main()
