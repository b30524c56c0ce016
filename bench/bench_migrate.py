#!/usr/bin/python3
"""`kvmagent migrate` over ssh between the two Debian 12 test hosts of
tests/harness/hostpair.py: the tiny guest (256M, TCG; its kernel, initrd and
a raw disk on the shared storage) moved back and forth MOVES times while it
pings its bridge's address every 0.1 s.  Both hosts' br-kvm have that
address and the same MAC, as one network's would.  Printed for each move:
QEMU's downtime, how long the guest did not run (paused_ms: until it ran on
the destination), QEMU's total time, the command's total time; and the pings
lost in all, counted from the sequence numbers the guest printed on its
console (in the journal of the host it ran on at the time).

--transport ssh,tcp (the default: ssh alone): the same moves over each
transport in turn (tcp: plain TCP to the address ssh reached), and their
medians side by side.

When libvirt's packages are cached (bench_lifecycle.py downloads them),
the same guest as a libvirt domain is moved with `virsh migrate --live`
too (tcp, and tunnelled), after each of kvmagent's moves
(bench/virsh_migrate.py).

--copy-storage: the disk (16 MiB of random bytes) is on host 0's own
storage instead, and each move copies it (onto the copy the last move left).

Run as root after `make setup`:
    /usr/bin/python3 bench/bench_migrate.py [MOVES] [--transport ssh,tcp] [--copy-storage]"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import libvirt, virsh_migrate  # noqa: E402
from tests.guest.build import find_guest  # noqa: E402
from tests.harness.hostpair import HostPair, shared_path  # noqa: E402
from tests.harness.install import (APT_ENV, OFFLINE_APT, REPO, RUNTIME_DEPENDS,  # noqa: E402
                                   guest_toml, offline_apt)

NAME, UNIT = "bench", "kvm@bench.service"
BRIDGE_MAC = "02:00:00:00:77:01"


def console(th) -> str:  # type: ignore[no-untyped-def]
    return str(th.exec(["journalctl", f"SYSLOG_IDENTIFIER={NAME}-console", "-o", "cat",
                        "--no-pager"], check=False).stdout)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("moves", type=int, nargs="?", default=6)
    parser.add_argument("--transport", default="ssh", help="ssh, tcp or ssh,tcp")
    parser.add_argument("--copy-storage", action="store_true",
                        help="the disk on host 0's own storage, copied at each move")
    opts = parser.parse_args()
    moves, transports = opts.moves, opts.transport.split(",")
    disk = "/srv/local/bench.img" if opts.copy_storage else shared_path(NAME + ".img")
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
                        "--no-install-recommends", *RUNTIME_DEPENDS], env=APT_ENV, timeout=600)
                th.run(["kvmagent", "bridge", "ensure", "br-kvm", "--address", "10.77.0.1/24"])
                th.exec(["ip", "link", "set", "br-kvm", "address", BRIDGE_MAC])
                th.write_file(f"/etc/kvmagent/guests/{NAME}.toml", guest_toml(
                    inside, cmdline="guest.ip=10.77.0.2/24",
                    extra=f'[[disk]]\npath = "{disk}"\n'))
                th.exec(["mkdir", "-p", "/srv/local"])
                th.exec(["systemctl", "daemon-reload"])
            lv = (virsh_migrate.Libvirt(pair, shared, image.kernel, image.initrd,
                                        shared_path("bench-lv.img")) if against else None)
            if opts.copy_storage:
                pair[0].exec(["dd", "if=/dev/urandom", f"of={disk}", "bs=1M", "count=16",
                              "status=none"])
            pair[0].exec(["systemctl", "start", UNIT], timeout=180)
            deadline = time.monotonic() + 120
            while "GUEST-READY" not in console(pair[0]):
                if time.monotonic() > deadline:
                    raise SystemExit("the guest did not boot")
                time.sleep(0.5)
            pair[0].exec(["kvmagent", "console", NAME, "--timeout", "2"],
                         input="ping -i 0.1 10.77.0.1 &\n", check=False)
            time.sleep(3)
            rows: dict[str, list[tuple[str, int, int, float, int]]] = {t: [] for t in transports}
            for n in range(moves * len(transports)):
                i, transport = n % moves, transports[n // moves]
                src, to = pair[n % 2], f"host{1 - n % 2}"
                r = virsh_migrate.timed(src, ["kvmagent", "migrate", NAME, to, "--json",
                                              "--transport", transport]
                                        + (["--copy-storage"] if opts.copy_storage else []))
                if r.returncode != 0:
                    raise SystemExit(f"move {i + 1} over {transport} failed: {r.stderr}")
                done = json.loads(r.stdout.splitlines()[-1])
                rows[transport].append((f"host{n % 2} -> {to}", done["downtime_ms"],
                                        done["qemu_total_ms"], done["total_seconds"],
                                        done["paused_ms"]))
                time.sleep(2)
                if lv is not None:
                    lv.kvmagent(r, transport)
                    lv.round(n, NAME)
            last = pair[(moves * len(transports)) % 2]
            last.exec(["kvmagent", "console", NAME, "--timeout", "2"],
                      input="kill %1\n", check=False)
            seqs = sorted({int(s) for th in pair
                           for s in re.findall(r"seq=(\d+) ", console(th))})
            last.exec(["systemctl", "stop", UNIT], timeout=180)
            if lv is not None:
                lv.stop()
    for transport in transports:
        where = ("16 MiB disk copied (--copy-storage)" if opts.copy_storage
                 else "disk on shared storage")
        print(f"kvmagent migrate over {transport}, tiny guest (256M, TCG, {where}), "
              f"{moves} moves between two Debian 12 test hosts")
        print(f"{'move':<18}{'downtime ms':>12}{'paused ms':>10}{'QEMU total ms':>15}"
              f"{'command s':>11}")
        for move, downtime, qemu_total, total, paused in rows[transport]:
            print(f"{move:<18}{downtime:>12}{paused:>10}{qemu_total:>15}{total:>11.2f}")
    if len(transports) > 1:  # side by side
        print(f"{'median of the moves':<24}" + "".join(f"{t:>10}" for t in transports))
        for label, col in (("downtime ms", 1), ("paused ms", 4), ("QEMU total ms", 2),
                           ("command s", 3)):
            medians = [statistics.median(r[col] for r in rows[t]) for t in transports]
            print(f"{label:<24}" + "".join(f"{m:>10.{2 if col == 3 else 0}f}" for m in medians))
    sent = seqs[-1] - seqs[0] + 1 if seqs else 0
    print(f"pings every 0.1 s from the guest to its bridge: {sent} sent, "
          f"{sent - len(seqs)} lost over the {moves * len(transports)} moves")
    if lv is not None:
        print("\n" + lv.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
