#!/usr/bin/python3
"""Inside the systemd test host (bench_list.py runs it): `kvmagent list`
with SIZES defined guests, RUNNING of them started; median wall time of
RUNS runs and the D-Bus method calls one run makes.  Prints one JSON line."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, "/src/kvmagent")
from kvmagent import state  # noqa: E402
from kvmagent.paths import Paths  # noqa: E402

GUESTS = "/etc/kvmagent/guests"
# One run of `kvmagent list` with every D-Bus method call of kvmagent.systemd
# counted (the connection's own Hello is sd-bus's and is not counted).
COUNTER = """
import sys, atexit
sys.path.insert(0, "/src/kvmagent")
from kvmagent import systemd
calls = []
real = systemd._Manager.call_raw
def counted(self, method, *a, **k):
    calls.append(method)
    return real(self, method, *a, **k)
systemd._Manager.call_raw = counted
atexit.register(lambda: print("DBUS", len(calls), file=sys.stderr))
from kvmagent.cli import main
sys.argv = ["kvmagent", "list"]
main()
"""


def timed(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    kernel, initrd, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sizes = [int(s) for s in sys.argv[4].split(",")]
    running = int(sys.argv[5])
    guest = (f'memory = "256M"\n[kernel]\nimage = "{kernel}"\ninitrd = "{initrd}"\n'
             'cmdline = "console=ttyS0 quiet panic=-1"\n')
    os.makedirs(GUESTS, exist_ok=True)
    for i in range(running):
        with open(f"{GUESTS}/run{i}.toml", "w") as f:
            f.write(guest)
        # paused (SIGSTOP), so that TCG does not take the CPU being measured;
        # without the watchdog, which a stopped QEMU would trip
        dropin = f"/etc/systemd/system/kvm@run{i}.service.d"
        os.makedirs(dropin, exist_ok=True)
        with open(f"{dropin}/50-bench.conf", "w") as f:
            f.write("[Service]\nWatchdogSec=0\n")
        subprocess.run(["systemctl", "daemon-reload"], check=True)
        subprocess.run(["systemctl", "start", f"kvm@run{i}"], check=True, timeout=300)
        subprocess.run(["systemctl", "kill", "-s", "SIGSTOP", f"kvm-run{i}.scope"], check=True)
    conn = state.connect(Paths.from_env().state_dir)
    out = {}
    defined = running
    virsh = shutil.which("virsh")
    for size in sizes:
        while defined < size:  # config files only, each with a history of 10 runs
            name = f"g{defined:03d}"
            with open(f"{GUESTS}/{name}.toml", "w") as f:
                f.write("cpus = 2\n" + guest + "[[nic]]\n")
            for _ in range(10):
                for ev, why in (("starting", None), ("running", None),
                                ("stopped", state.ADMIN)):
                    state.insert(conn, name, ev, reason=why, source="bench")
            defined += 1
        r = subprocess.run(["/usr/bin/python3", "-c", COUNTER], capture_output=True,
                           text=True, check=True)
        calls = int(r.stderr.split("DBUS")[-1].split()[0])
        rows = len(r.stdout.splitlines()) - 1
        out[size] = {"list_s": timed(["/usr/bin/kvmagent", "list"], runs), "dbus_calls": calls,
                     "rows": rows,
                     "virsh_s": timed([virsh, "list", "--all"], runs) if virsh else None}
    for i in range(running):
        subprocess.run(["systemctl", "kill", "-s", "SIGCONT", f"kvm-run{i}.scope"], check=False)
        subprocess.run(["systemctl", "stop", f"kvm@run{i}"], check=False, timeout=300)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
