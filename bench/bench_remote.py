#!/usr/bin/python3
"""`kvmagent list` here against `kvmagent list -H OTHER` over ssh, without and
with ssh's ControlMaster, between the two test hosts of tests/harness/hostpair.py
(a Debian 12 host and a Debian 13 host on a private veth link, the package
installed on both, 10 guests defined on each): median wall time of RUNS runs
of each, measured inside each host (the column is the host that runs the
command; -H asks the other one).

Run as root after `make setup`:  /usr/bin/python3 bench/bench_remote.py [RUNS]"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.guest.build import find_guest  # noqa: E402
from tests.harness.hostpair import HostPair  # noqa: E402
from tests.harness.install import build_deb, copy_guest, guest_toml  # noqa: E402

GUESTS = 10
# Run inside a host: median ms of RUNS runs of argv (after one run to warm caches).
TIMER = r"""
import json, statistics, subprocess, sys, time
runs, argv = int(sys.argv[1]), sys.argv[2:]
subprocess.run(argv, capture_output=True, check=True)
took = []
for _ in range(runs):
    t0 = time.perf_counter()
    subprocess.run(argv, capture_output=True, check=True)
    took.append((time.perf_counter() - t0) * 1000)
print(json.dumps(round(statistics.median(took), 1)))
"""
CONTROL_MASTER = ("Host *\n  ControlMaster auto\n  ControlPath /run/ssh-cm-%r@%h:%p\n"
                  "  ControlPersist 10m\n")
WAYS = ("local list", "list -H other", "list -H other, ControlMaster")


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    image = find_guest()
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp:
        work = Path(tmp)
        deb = build_deb(work, release="bookworm")
        with HostPair(("bookworm", "trixie"), deb=deb, shared=work / "shared") as pair:
            for th in pair:
                inside = copy_guest(th, image)
                for i in range(GUESTS):
                    th.write_file(f"/etc/kvmagent/guests/g{i}.toml", guest_toml(inside, nics=0))
            results: dict[str, list[float]] = {w: [] for w in WAYS}
            for i, th in enumerate(pair):
                other = f"host{1 - i}"

                def timed(*argv: str) -> float:
                    out = th.exec(["python3", "-c", TIMER, str(runs), *argv], timeout=600)
                    return float(json.loads(out.stdout))

                results[WAYS[0]].append(timed("kvmagent", "list"))
                results[WAYS[1]].append(timed("kvmagent", "list", "-H", other))
                th.write_file("/root/.ssh/config", CONTROL_MASTER, 0o600)
                results[WAYS[2]].append(timed("kvmagent", "list", "-H", other))
                th.exec(["ssh", "-O", "exit", other], check=False)
                th.exec(["rm", "/root/.ssh/config"])
            names = [f"on Debian {'12' if th.release == 'bookworm' else '13'} (-H: the other)"
                     for th in pair]
    print(f"kvmagent list, {GUESTS} guests per host, median of {runs} runs (ms)")
    print(f"| way | {' | '.join(names)} |")
    print(f"|---|{'---|' * len(names)}")
    for way, figures in results.items():
        print(f"| {way} | {' | '.join(f'{f:.0f}' for f in figures)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
