#!/usr/bin/python3
"""Inside the systemd test host (bench_list.py runs it): `kvmagent list`
with SIZES defined guests, RUNNING of them started; median wall time of
RUNS runs and the D-Bus method calls one run makes; with libvirt (DEBS:
a directory of its .debs, "installed", or "-" for none), `virsh list --all` with as many domains defined, its runs
interleaved with kvmagent's.  Prints one JSON line."""

from __future__ import annotations

import json
import os
import pwd
import statistics
import subprocess
import sys
import time
from glob import glob

sys.path.insert(0, "/src/kvmagent")
from kvmagent.host import state  # noqa: E402
from kvmagent.paths import Paths  # noqa: E402

GUESTS = "/etc/kvmagent/guests"
UNITS = "/etc/systemd/system"  # where the test host has kvm@.service
WANTS = f"{UNITS}/machines.target.wants"
DOMAINS = "/etc/libvirt/qemu"  # libvirtd reads the domains defined here when it starts
DOMAIN = """<domain type="qemu"><name>{name}</name><memory unit="MiB">256</memory><vcpu>2</vcpu>
<os><type arch="x86_64" machine="pc">hvm</type><kernel>{kernel}</kernel><initrd>{initrd}</initrd>
</os><devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
<interface type="bridge"><source bridge="br-kvm"/><model type="virtio"/></interface>
</devices></domain>
"""
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


def timed(argvs: list[list[str]], runs: int) -> list[float]:
    """Median wall time of each command line, their runs interleaved (so
    that the machine's changing load falls on each alike)."""
    times: list[list[float]] = [[] for _ in argvs]
    for _ in range(runs):
        for argv, t in zip(argvs, times):
            t0 = time.perf_counter()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def install_libvirt(debs: str) -> None:
    if debs != "installed":
        subprocess.run(["dpkg", "-i", *sorted(glob(f"{debs}/*.deb"))], check=True,
                       stdout=subprocess.DEVNULL)
    # the user its QEMU driver runs QEMU as (libvirt-daemon-system's postinst makes it)
    try:
        pwd.getpwnam("libvirt-qemu")
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--home-dir", "/var/lib/libvirt", "--shell", "/usr/sbin/nologin",
                        "libvirt-qemu"], check=True)
    os.makedirs(DOMAINS, exist_ok=True)


def restart_libvirtd(domains: int) -> None:
    """libvirtd as a service, started again to read the domains now defined;
    /dev/kvm hidden from it: nested KVM hangs here, and libvirtd's probe of
    QEMU's capabilities with it, for minutes."""
    subprocess.run(["systemctl", "stop", "bench-libvirtd"], check=False,
                   stderr=subprocess.DEVNULL)
    subprocess.run(["systemd-run", "-q", "--collect", "--unit=bench-libvirtd",
                    "-p", "InaccessiblePaths=-/dev/kvm", "/usr/sbin/libvirtd"], check=True)
    deadline = time.monotonic() + 120
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
    virsh = sys.argv[6] != "-"
    if virsh:
        install_libvirt(sys.argv[6])
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
    conn = state.connect(Paths.from_env().state_dir)
    out = {}
    defined = running
    for size in sizes:
        while defined < size:  # config files only, each with a history of 10 runs
            name = f"g{defined:03d}"
            with open(f"{GUESTS}/{name}.toml", "w") as f:
                f.write("cpus = 2\n" + guest + "[[nic]]\n")
            # enabled at boot, as most guests of a host are (what `systemctl enable` makes)
            os.symlink(f"{UNITS}/kvm@.service", f"{WANTS}/kvm@{name}.service")
            if virsh:
                with open(f"{DOMAINS}/{name}.xml", "w") as f:
                    f.write(DOMAIN.format(name=name, kernel=kernel, initrd=initrd))
            for _ in range(10):
                for ev, why in (("starting", None), ("running", None),
                                ("stopped", state.ADMIN)):
                    state.insert(conn, name, ev, reason=why, source="bench")
            defined += 1
        if virsh:
            for i in range(running):  # as many domains as kvmagent has guests
                with open(f"{DOMAINS}/run{i}.xml", "w") as f:
                    f.write(DOMAIN.format(name=f"run{i}", kernel=kernel, initrd=initrd))
            restart_libvirtd(size)
        r = subprocess.run(["/usr/bin/python3", "-c", COUNTER], capture_output=True,
                           text=True, check=True)
        calls = int(r.stderr.split("DBUS")[-1].split()[0])
        rows = len(r.stdout.splitlines()) - 1
        argvs = [["/usr/bin/kvmagent", "list"]] + ([["virsh", "list", "--all"]] if virsh else [])
        medians = timed(argvs, runs)
        out[size] = {"list_s": medians[0], "dbus_calls": calls, "rows": rows,
                     "virsh_s": medians[1] if virsh else None}
    if virsh:
        subprocess.run(["systemctl", "stop", "bench-libvirtd"], check=False)
    for i in range(running):
        subprocess.run(["systemctl", "kill", "-s", "SIGCONT", f"kvm-run{i}.scope"], check=False)
        subprocess.run(["systemctl", "stop", f"kvm@run{i}"], check=False, timeout=300)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
