#!/usr/bin/python3
"""Tap setup cost: kvmagent's way vs the seed's way, same run, same fresh netns.

kvmagent: netdev.open_tap() (create non-persistent tap + MTU + MAC + enslave
+ up, one netlink socket, in-process) and closing its fd (the kernel deletes
the tap).  Seed: `ip tuntap add`, `ip link set mtu`, `ip link set master`,
`ip link set up`, `ip link del`, one subprocess each (the seed's ifup script
did `ip link set up` plus a bridge-utils call per tap).

Setup and delete are timed apart: deleting a net device costs the kernel
the same RCU grace periods whichever way it is asked for.

Run as root:  /usr/bin/python3 bench/bench_taps.py [ITERATIONS]
Everything happens in a throwaway network namespace, deleted at the end.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyroute2 import IPRoute  # noqa: E402
from pyroute2 import netns as pr_netns  # noqa: E402

from kvmagent.host import netdev  # noqa: E402
from kvmagent.host.bridge import ensure_bridge  # noqa: E402
from kvmagent.host.netlink import NETNS_DIR, in_netns  # noqa: E402

BRIDGE, TAP, MTU = "br-bench", "kvm-bench-0", 1400


SEED_SETUP = (["ip", "tuntap", "add", "dev", TAP, "mode", "tap"],
              ["ip", "link", "set", "dev", TAP, "mtu", str(MTU)],
              ["ip", "link", "set", "dev", TAP, "master", BRIDGE],
              ["ip", "link", "set", "dev", TAP, "up"])
SEED_DELETE = (["ip", "link", "del", "dev", TAP],)


def kvmagent_way() -> tuple[float, float]:
    start = time.perf_counter()
    fds = netdev.open_tap(TAP, BRIDGE)
    middle = time.perf_counter()
    for fd in fds:  # the kernel deletes the tap with its last fd
        os.close(fd)
    return middle - start, time.perf_counter() - middle


def seed_way() -> tuple[float, float]:
    start = time.perf_counter()
    for argv in SEED_SETUP:
        subprocess.run(argv, check=True)
    middle = time.perf_counter()
    for argv in SEED_DELETE:
        subprocess.run(argv, check=True)
    return middle - start, time.perf_counter() - middle


def main() -> int:
    iterations = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    if os.geteuid() != 0:
        print("bench_taps.py needs root (network namespace, taps)", file=sys.stderr)
        return 4
    name = f"kvmagent-bench-{os.getpid()}"
    pr_netns.create(name)
    try:
        inode = os.stat(f"{NETNS_DIR}/{name}").st_ino
        with in_netns(name), IPRoute() as ipr:
            # ip (a child process) runs in the thread's namespace: check it.
            assert os.stat("/proc/thread-self/ns/net").st_ino == inode
            ensure_bridge(BRIDGE)
            ipr.link("set", index=ipr.link_lookup(ifname=BRIDGE)[0], mtu=MTU)
            ways = {"kvmagent": kvmagent_way, "seed (ip)": seed_way}
            times: dict[str, list[tuple[float, float]]] = {label: [] for label in ways}
            for i in range(iterations + 5):  # interleaved; 5 warm-up rounds
                for label, way in ways.items():
                    setup, delete = way()
                    assert not ipr.link_lookup(ifname=TAP), f"{label} left {TAP}"
                    if i >= 5:
                        times[label].append((setup * 1000, delete * 1000))
    finally:
        pr_netns.remove(name)
    print(f"tap create + MTU + enslave + up, then delete: {iterations} iterations each, "
          f"interleaved, one fresh netns, {os.cpu_count()} CPUs; medians in ms")
    print(f"{'way':<11} {'setup':>7} {'delete':>7} {'total':>7} {'p90 total':>10}")
    rows = {}
    for label, pairs in times.items():
        totals = [a + b for a, b in pairs]
        rows[label] = (statistics.median(a for a, _ in pairs),
                       statistics.median(b for _, b in pairs), statistics.median(totals))
        print(f"{label:<11} {rows[label][0]:>7.2f} {rows[label][1]:>7.2f} "
              f"{rows[label][2]:>7.2f} {statistics.quantiles(totals, n=10)[-1]:>10.2f}")
    ours, seed = rows["kvmagent"], rows["seed (ip)"]
    print(f"{'ratio':<11} {seed[0] / ours[0]:>6.1f}x {seed[1] / ours[1]:>6.1f}x "
          f"{seed[2] / ours[2]:>6.1f}x   (seed / kvmagent)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
