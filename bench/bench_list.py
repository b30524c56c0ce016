#!/usr/bin/python3
"""`kvmagent list` next to `virsh list --all` with 10, 100, 200 and 1000
guests defined, in the same test host (a release's own root), their runs
interleaved (#22).  kvmagent: config files, each guest with a history of
10 runs in the state database and enabled at boot, 3 of them running the
tiny guest under TCG, paused with SIGSTOP; libvirt (Debian's, bench/libvirt.py):
as many domains defined, as many running, paused (virsh suspend).  Median
and spread of the whole command's wall time, and the D-Bus method calls
one `kvmagent list` makes.

Run as root after `make setup`, with the network the first time (libvirt's
packages are downloaded once):
    /usr/bin/python3 bench/bench_list.py [--release bookworm|trixie]... [RUNS]

Goal (the issue's): at 1000 guests within 1.5x of `virsh list --all`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import inhost, libvirt  # noqa: E402
from bench.report import Goal, median_ms, ratio, spread_ms, table  # noqa: E402
from tests.guest.build import find_guest  # noqa: E402
from tests.harness import TestHost, rootfs  # noqa: E402
from tests.harness.install import REPO, copy_guest, install_on_release  # noqa: E402

SIZES = (10, 100, 200, 1000)
RUNNING = 3
GOAL = (1000, Goal(1.5, "within 1.5× of virsh list --all at 1000"))


def measure(release: str, runs: int) -> tuple[dict[str, dict[str, object]], dict[str, str]]:
    image = find_guest()
    with TestHost(root=release, src=REPO,
                  bind_ro=[(rootfs.cached_debs(release), "/mnt/debs"),
                           libvirt.bind(release)]) as th:
        install_on_release(th)
        inhost.compile_checkout(th)
        inside = copy_guest(th, image)
        libvirt.install(th)
        kernel, initrd = libvirt.copy_guest(th, image.kernel, image.initrd)
        v = libvirt.versions(th)
        out = th.run(["/usr/bin/python3", "/src/kvmagent/bench/list_inner.py",
                      str(inside.kernel), str(inside.initrd), str(runs),
                      ",".join(map(str, SIZES)), str(RUNNING), kernel, initrd],
                     env=inhost.ENV, timeout=3600).stdout
    facts = {"debian": th.release, "libvirt": v.get("libvirt-daemon", "?"),
             "load": " ".join(Path("/proc/loadavg").read_text().split()[:3])}
    return json.loads(out.strip().splitlines()[-1]), facts


def report(r: dict[str, dict[str, object]], facts: dict[str, str], runs: int) -> str:
    rows = []
    for size, v in sorted(((int(k), v) for k, v in r.items())):
        ours: list[float] = v["kvmagent"]  # type: ignore[assignment]
        theirs: list[float] = v["virsh"]  # type: ignore[assignment]
        m, lv = median_ms(ours), median_ms(theirs)
        goal = GOAL[1].verdict(m, lv) if size == GOAL[0] else ""
        rows.append([str(size), str(v["rows"]), f"{m:.0f}", spread_ms(ours), f"{lv:.0f}",
                     spread_ms(theirs), ratio(m, lv), str(v["dbus_calls"]), goal])
    return (f"Debian {rootfs.RELEASES[facts['debian']]} ({facts['debian']}), libvirt "
            f"{facts['libvirt']}: `kvmagent list` vs `virsh list --all`, {RUNNING} guests "
            f"running (paused); medians of {runs} interleaved runs, ms; load average after: "
            f"{facts['load']}\n"
            + table(["guests", "rows", "kvmagent", "min–max", "virsh", "min–max",
                     "kvmagent/virsh", "D-Bus calls", "goal"], rows))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="?", type=int, default=15)
    p.add_argument("--release", action="append", choices=list(rootfs.RELEASES),
                   help="a test host of this release's root (default: each)")
    p.add_argument("--json", metavar="FILE", help="also write every sample there")
    args = p.parse_args()
    results = {}
    for release in args.release or list(rootfs.RELEASES):
        r, facts = measure(release, args.runs)
        results[release] = {"result": r, "facts": facts}
        print(report(r, facts, args.runs) + "\n", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
