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
# One run of `kvmagent list` with every D-Bus method call counted (the
# connection's own Hello is not a call of ours and is not counted).
COUNTER = """
import sys, atexit
sys.path.insert(0, "/src/kvmagent")
from pystemd.dbuslib import DBus
calls = []
real = DBus.call_method
def counted(self, *a, **k):
    calls.append(a[3])
    return real(self, *a, **k)
DBus.call_method = counted
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
        subprocess.run(["systemctl", "start", f"kvm@run{i}"], check=True, timeout=300)
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
        subprocess.run(["systemctl", "stop", f"kvm@run{i}"], check=False, timeout=300)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
