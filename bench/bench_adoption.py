#!/usr/bin/python3
"""A guest outliving its supervisor (#18), on a test host of each release
(Debian 12, 13): the time from kill -9 of kvm@g.service's supervisor to the
guest's console back in the journal and QMP answering again (the new
supervisor's "taken over", said once query-status was answered); the time
of a reload (`kvmagent reload g`: the command, and until the console is in
the journal again); and `systemctl restart kvm@g` as the reference (the
guest boots again: until its first console line).  Times are the journal's
own timestamps against the moment of the kill or command; medians.

Run as root after `make setup`:  /usr/bin/python3 bench/bench_adoption.py [N]"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.guest.build import find_guest  # noqa: E402
from tests.harness import TestHost, rootfs  # noqa: E402
from tests.harness.install import REPO, copy_guest, define_guest, guest_toml  # noqa: E402
from tests.harness.install import install_on_release  # noqa: E402

ROWS = [("kill -9 -> console in the journal", "kill console"),
        ("kill -9 -> QMP answering (taken over)", "kill qmp"),
        ("reload -> console in the journal", "reload console"),
        ("reload: the command", "reload command"),
        ("systemctl restart: the command", "restart command"),
        ("systemctl restart -> console (guest boots)", "restart console")]


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    image = find_guest()
    results = {}
    for release in rootfs.RELEASES:
        debs = rootfs.cached_debs(release)
        with TestHost(root=release, src=REPO, bind_ro=[(debs, "/mnt/debs")]) as th:
            install_on_release(th)
            define_guest(th, "bench", guest_toml(copy_guest(th, image), nics=1,
                                                 extra="[console]\nlog_burst = 100000\n"))
            out = th.run(["/usr/bin/python3", "/src/kvmagent/bench/adoption_inner.py", str(n)],
                         timeout=1800).stdout
        results[release] = json.loads(out.strip().splitlines()[-1])
    print(f"the tiny guest (TCG, one bridged NIC, its console ticking every 20 ms); "
          f"medians of {n} runs, ms")
    print(f"{'':<44}" + "".join(f"{r:>10}" for r in results))
    for label, key in ROWS:
        print(f"{label:<44}" + "".join(f"{results[r][key]:>10.0f}" for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
