#!/usr/bin/python3
"""Inside the systemd test host (bench_list.py runs it, libvirt installed
and started by bench/libvirt.py): `kvmagent list` with SIZES defined
guests, RUNNING of them started; median wall time of RUNS runs and the
D-Bus method calls one run makes; `virsh list --all` with as many domains
defined, as many of them running, its runs interleaved with kvmagent's.
argv: KERNEL INITRD RUNS SIZES RUNNING LIBVIRT_KERNEL LIBVIRT_INITRD.
Prints one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, "/src/kvmagent")
from bench.libvirt import DOMAINS, domain_xml  # noqa: E402
from kvmagent.host import state  # noqa: E402
from kvmagent.paths import Paths  # noqa: E402

GUESTS = "/etc/kvmagent/guests"
UNITS = "/etc/systemd/system"  # where the test host has kvm@.service
WANTS = f"{UNITS}/machines.target.wants"
# One run of `kvmagent list` with every D-Bus method call of kvmagent.host.systemd
# counted (the connection's own Hello is sd-bus's and is not counted).
COUNTER = """
import sys, atexit
sys.path.insert(0, "/src/kvmagent")
from kvmagent.host import systemd
calls = []
real = systemd._Manager.call_raw
def counted(self, method, *a, **k):
    calls.append(method)
    return real(self, method, *a, **k)
systemd._Manager.call_raw = counted
atexit.register(lambda: print("DBUS", len(calls), file=sys.stderr))
from kvmagent.cli.main import main
sys.argv = ["kvmagent", "list"]
main()
"""


def timed(argvs: list[list[str]], runs: int) -> list[list[float]]:
    """Wall times of each command line, their runs interleaved (so that the
    machine's changing load falls on each alike)."""
    times: list[list[float]] = [[] for _ in argvs]
    for _ in range(runs):
        for argv, t in zip(argvs, times):
            t0 = time.perf_counter()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            t.append(time.perf_counter() - t0)
    return times


def define_domain(name: str, kernel: str, initrd: str, cpus: int) -> None:
    with open(f"{DOMAINS}/{name}.xml", "w") as f:
        f.write(domain_xml(name, kernel, initrd, "console=ttyS0 quiet panic=-1", cpus=cpus))


def restart_libvirtd(domains: int) -> None:
    """libvirtd started again, to read the domains now defined (as
    bench/libvirt.py set it up: /dev/kvm hidden, no idle timeout)."""
    # many restarts in a few seconds would trip its start limit
    subprocess.run(["systemctl", "reset-failed", "libvirtd.service", "libvirtd.socket"],
                   check=False, stderr=subprocess.DEVNULL)
    subprocess.run(["systemctl", "restart", "libvirtd.service"], check=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        r = subprocess.run(["virsh", "list", "--all", "--name"], capture_output=True, text=True)
        if r.returncode == 0 and len(r.stdout.split()) == domains:
            return
        time.sleep(0.2)
    raise SystemExit(f"libvirtd did not list {domains} domains: {r.stderr.strip()}")


def main() -> int:
    kernel, initrd, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sizes = [int(s) for s in sys.argv[4].split(",")]
    running = int(sys.argv[5])
    lv_kernel, lv_initrd = sys.argv[6], sys.argv[7]  # where libvirt's QEMU may read them
    guest = (f'memory = "256M"\n[kernel]\nimage = "{kernel}"\ninitrd = "{initrd}"\n'
             'cmdline = "console=ttyS0 quiet panic=-1"\n')
    os.makedirs(GUESTS, exist_ok=True)
    os.makedirs(WANTS, exist_ok=True)
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
        # as many libvirt domains running, paused (virsh suspend)
        define_domain(f"run{i}", lv_kernel, lv_initrd, 1)
    restart_libvirtd(running)
    for i in range(running):
        subprocess.run(["virsh", "start", f"run{i}"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["virsh", "suspend", f"run{i}"], check=True, stdout=subprocess.DEVNULL)
    conn = state.connect(Paths.from_env().state_dir)
    out = {}
    defined = running
    for size in sizes:
        while defined < size:  # config files only, each with a history of 10 runs
            name = f"g{defined:04d}"
            with open(f"{GUESTS}/{name}.toml", "w") as f:
                f.write("cpus = 2\n" + guest + "[[nic]]\n")
            # enabled at boot, as most guests of a host are (what `systemctl enable` makes)
            os.symlink(f"{UNITS}/kvm@.service", f"{WANTS}/kvm@{name}.service")
            define_domain(name, lv_kernel, lv_initrd, 2)
            for _ in range(10):
                for ev, why in (("starting", None), ("running", None),
                                ("stopped", state.ADMIN)):
                    state.insert(conn, name, ev, reason=why, source="bench")
            defined += 1
        restart_libvirtd(size)
        r = subprocess.run(["/usr/bin/python3", "-c", COUNTER], capture_output=True,
                           text=True, check=True)
        calls = int(r.stderr.split("DBUS")[-1].split()[0])
        rows = len(r.stdout.splitlines()) - 1
        virsh_rows = len(subprocess.run(["virsh", "list", "--all", "--name"], check=True,
                                        capture_output=True, text=True).stdout.split())
        kvmagent_s, virsh_s = timed([["/usr/bin/kvmagent", "list"], ["virsh", "list", "--all"]],
                                    runs)
        out[size] = {"kvmagent": kvmagent_s, "virsh": virsh_s, "dbus_calls": calls,
                     "rows": rows, "virsh_rows": virsh_rows}
        print(f"{size} guests done", file=sys.stderr, flush=True)
    for i in range(running):
        subprocess.run(["virsh", "destroy", f"run{i}"], check=False, stdout=subprocess.DEVNULL)
        subprocess.run(["systemctl", "kill", "-s", "SIGCONT", f"kvm-run{i}.scope"], check=False)
        subprocess.run(["systemctl", "stop", f"kvm@run{i}"], check=False, timeout=300)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
