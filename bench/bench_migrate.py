#!/usr/bin/python3
"""`kvmagent migrate` over ssh between the two Debian 12 test hosts of
tests/harness/hostpair.py: the tiny guest (256M, TCG; its kernel, initrd and
a raw disk on the shared storage) moved back and forth MOVES times while it
pings its bridge's address every 0.1 s.  Both hosts' br-kvm have that
address and the same MAC, as one network's would.  Printed for each move:
QEMU's downtime, QEMU's total time, the command's total time; and the pings
lost in all, counted from the sequence numbers the guest printed on its
console (in the journal of the host it ran on at the time).

When libvirt's packages are cached (bench_lifecycle.py downloads them),
the same guest as a libvirt domain is moved with `virsh migrate --live`
too, after each of kvmagent's moves (bench/virsh_migrate.py).

Run as root after `make setup`:  /usr/bin/python3 bench/bench_migrate.py [MOVES]"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import libvirt, virsh_migrate  # noqa: E402
from tests.guest.build import find_guest  # noqa: E402
from tests.harness.hostpair import HostPair, shared_path  # noqa: E402
from tests.harness.install import (APT_ENV, OFFLINE_APT, REPO, guest_toml,  # noqa: E402
                                   offline_apt)

DEPENDS = ["python3-pystemd", "python3-pydbus", "python3-pyroute2", "qemu-system-x86",
           "systemd-container"]
NAME, UNIT = "bench", "kvm@bench.service"
BRIDGE_MAC = "02:00:00:00:77:01"


def console(th) -> str:  # type: ignore[no-untyped-def]
    return str(th.exec(["journalctl", f"SYSLOG_IDENTIFIER={NAME}-console", "-o", "cat",
                        "--no-pager"], check=False).stdout)


def main() -> int:
    moves = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    image = find_guest()
    against = (libvirt.DEBS_DIR / "bookworm" / libvirt.key("bookworm") / "Packages").is_file()
    with tempfile.TemporaryDirectory(prefix="bench-migrate-") as tmp:
        shared = Path(tmp) / "shared"
        shared.mkdir(mode=0o755)
        shutil.copyfile(image.kernel, shared / "vmlinuz")
        shutil.copyfile(image.initrd, shared / "initrd.gz")
        with open(shared / f"{NAME}.img", "wb") as f:
            f.truncate(16 << 20)
        inside = dataclasses.replace(image, kernel=Path(shared_path("vmlinuz")),
                                     initrd=Path(shared_path("initrd.gz")))
        with HostPair(("bookworm", "bookworm"), shared=shared, src=REPO,
                      bind_ro=[libvirt.bind("bookworm")] if against else []) as pair:
            for th in pair:
                offline_apt(th)
                th.run(["apt-get", *OFFLINE_APT, "install", "-y", "-q",
                        "--no-install-recommends", *DEPENDS], env=APT_ENV, timeout=600)
                th.run(["kvmagent", "bridge", "ensure", "br-kvm", "--address", "10.77.0.1/24"])
                th.exec(["ip", "link", "set", "br-kvm", "address", BRIDGE_MAC])
                th.write_file(f"/etc/kvmagent/guests/{NAME}.toml", guest_toml(
                    inside, cmdline="guest.ip=10.77.0.2/24",
                    extra=f'[[disk]]\npath = "{shared_path(NAME + ".img")}"\n'))
                th.exec(["systemctl", "daemon-reload"])
            lv = (virsh_migrate.Libvirt(pair, shared, image.kernel, image.initrd,
                                        shared_path("bench-lv.img")) if against else None)
            pair[0].exec(["systemctl", "start", UNIT], timeout=180)
            deadline = time.monotonic() + 120
            while "GUEST-READY" not in console(pair[0]):
                if time.monotonic() > deadline:
                    raise SystemExit("the guest did not boot")
                time.sleep(0.5)
            pair[0].exec(["kvmagent", "console", NAME, "--timeout", "2"],
                         input="ping -i 0.1 10.77.0.1 &\n", check=False)
            time.sleep(3)
            rows = []
            for i in range(moves):
                src, to = pair[i % 2], f"host{1 - i % 2}"
                r = virsh_migrate.timed(src, ["kvmagent", "migrate", NAME, to, "--json"])
                if r.returncode != 0:
                    raise SystemExit(f"move {i + 1} failed: {r.stderr}")
                done = json.loads(r.stdout.splitlines()[-1])
                rows.append((f"host{i % 2} -> {to}", done["downtime_ms"], done["qemu_total_ms"],
                             done["total_seconds"]))
                time.sleep(2)
                if lv is not None:
                    lv.kvmagent(r)
                    lv.round(i, NAME)
            last = pair[moves % 2]
            last.exec(["kvmagent", "console", NAME, "--timeout", "2"],
                      input="kill %1\n", check=False)
            seqs = sorted({int(s) for th in pair
                           for s in re.findall(r"seq=(\d+) ", console(th))})
            last.exec(["systemctl", "stop", UNIT], timeout=180)
            if lv is not None:
                lv.stop()
    print(f"kvmagent migrate over ssh, tiny guest (256M, TCG, disk on shared storage), "
          f"{moves} moves between two Debian 12 test hosts")
    print(f"{'move':<18}{'downtime ms':>12}{'QEMU total ms':>15}{'command s':>11}")
    for move, downtime, qemu_total, total in rows:
        print(f"{move:<18}{downtime:>12}{qemu_total:>15}{total:>11.2f}")
    sent = seqs[-1] - seqs[0] + 1 if seqs else 0
    print(f"pings every 0.1 s from the guest to its bridge: {sent} sent, "
          f"{sent - len(seqs)} lost over the {moves} moves")
    if lv is not None:
        print("\n" + lv.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
