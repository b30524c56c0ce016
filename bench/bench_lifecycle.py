#!/usr/bin/python3
"""Start, graceful stop and hard stop of the tiny guest (TCG): bare QEMU vs
kvmagent (systemctl start kvm@bench ...), same run, same test host; and the
memory of the long-lived supervisors with 10 guests running.

Run as root after `make setup`:  /usr/bin/python3 bench/bench_lifecycle.py [N]

bare QEMU: exec -> QMP "running"; ACPI system_powerdown (re-sent each second)
-> exit; kill -9 -> exit.  kvmagent: `systemctl start` (Type=notify: returns
when QMP says running); `systemctl stop` (ACPI); `kvmagent stop --force`,
and the same power cord with systemctl alone (SIGUSR1 to the supervisor).
libvirt 9.0's figures are quoted from the issue for reference (measured on
this kind of machine), not measured here: libvirt is not installed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.guest.build import find_guest  # noqa: E402
from tests.harness import TestHost  # noqa: E402
from tests.harness.install import REPO, define_guest, guest_toml, install_checkout  # noqa: E402

LIBVIRT = {"running": 606, "graceful stop": 523, "hard stop": 243}  # ms, quoted
GOALS = {"running": "<= 300 ms", "graceful stop": "<= 400 ms", "hard stop": "<= 50 ms"}


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    image = find_guest()
    with TestHost(root="host", src=REPO) as th:
        install_checkout(th)
        define_guest(th, "bench", guest_toml(image, nics=0))
        th.run(["kvmagent", "bridge", "ensure", "br-kvm"])
        define_guest(th, "benchnic", guest_toml(image, nics=1))
        for i in range(10):
            define_guest(th, f"mem{i}", guest_toml(image, nics=0))
        out = th.run(["/usr/bin/python3", "/src/kvmagent/bench/lifecycle_inner.py",
                      str(image.kernel), str(image.initrd), str(n)], timeout=1800).stdout
    r = json.loads(out.strip().splitlines()[-1])
    print(f"tiny guest, TCG, in the systemd test host; medians of {n} runs, ms")
    print(f"{'':<15} {'bare QEMU':>10} {'split-wx**':>10} {'kvmagent':>10} {'overhead':>10} "
          f"{'libvirt*':>9}  goal")
    for what in ("running", "graceful stop", "hard stop"):
        bare, splitwx, ours = (r[f"{who} {what}"] * 1000 for who in ("bare", "splitwx", "kvmagent"))
        print(f"{what:<15} {bare:>10.0f} {splitwx:>10.0f} {ours:>10.0f} {ours - bare:>+10.0f} "
              f"{LIBVIRT[what]:>9}  {GOALS[what]}")
    nic = r["kvmagent nic running"] * 1000
    print(f"{'running, 1 NIC':<15} {'':>10} {'':>10} {nic:>10.0f} {'':>10} {'':>9}  "
          "(a bridged NIC: a tap made and put on br-kvm)")
    kill = r["kvmagent kill stop"] * 1000
    print(f"{'hard, systemctl':<15} {'':>10} {'':>10} {kill:>10.0f} {'':>10} {'':>9}  "
          "(systemctl kill -s USR1 --kill-whom=main kvm@bench, until inactive)")
    print(f"supervisor PSS with {r['guests']} guests running: "
          f"{r['supervisor pss kib'] / 1024:.1f} MiB each (goal <= 10 MiB)")
    plain, sandboxed = r["exec plain"] * 1000, r["exec sandboxed"] * 1000
    print(f"systemd running /bin/true as a service: {plain:.0f} ms; with kvm@.service's sandbox "
          f"{sandboxed:.0f} ms (+{sandboxed - plain:.0f} ms in every start above)")
    print("* libvirt 9.0 virsh start/shutdown/destroy, quoted from the issue, not measured here")
    print("** bare QEMU with -accel tcg,split-wx=on, as kvmagent runs TCG (MemoryDenyWriteExecute=);"
          " KVM has no JIT")
    return 0


if __name__ == "__main__":
    sys.exit(main())
