#!/usr/bin/python3
"""Start, graceful stop and hard stop of the tiny guest (TCG, 256 MiB, one
vCPU, no NIC): bare QEMU, kvmagent and Debian's libvirt in the same run,
the same test host (a release's own root), their rounds interleaved (#22).

Run as root after `make setup`, with the network the first time (libvirt's
packages are downloaded once, bench/libvirt.py):
    /usr/bin/python3 bench/bench_lifecycle.py [--release bookworm|trixie]... [ROUNDS]

bare QEMU: exec -> QMP "running"; ACPI system_powerdown -> exit; kill -9 ->
exit ("split-wx": the same with -accel tcg,split-wx=on, as kvmagent runs
TCG under MemoryDenyWriteExecute=).  kvmagent: `systemctl start kvm@g`
(Type=notify: returns when QMP says running), `systemctl stop`, and the
power cord with systemctl alone (SIGUSR1 to the supervisor, until
inactive); and its own commands, `kvmagent start/stop/stop --force g`.
libvirt: `virsh start` (returns once the guest's CPUs run), `virsh
shutdown` until `virsh domstate` says shut off, `virsh destroy`.  The
goals (the issue's): start >= 2x faster than virsh start, hard stop >= 3x
faster than virsh destroy, graceful stop within 1.1x of bare QEMU's own
ACPI power-off."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import inhost, libvirt  # noqa: E402
from bench.report import Goal, median_ms, ratio, spread_ms, table  # noqa: E402
from tests.guest.build import find_guest  # noqa: E402
from tests.harness import TestHost, rootfs  # noqa: E402
from tests.harness.install import (REPO, copy_guest, define_guest, guest_toml,  # noqa: E402
                                   install_on_release)

# (way, what its row says) per measure; the keys of lifecycle_inner.py's samples
WAYS = {
    "running": [("bare", "bare QEMU"), ("splitwx", "bare QEMU, split-wx"),
                ("systemctl", "`systemctl start kvm@g`"), ("kvmagent", "`kvmagent start g`"),
                ("libvirt", "`virsh start g`")],
    "graceful": [("bare", "bare QEMU (system_powerdown → exit)"),
                 ("splitwx", "bare QEMU, split-wx"),
                 ("systemctl", "`systemctl stop kvm@g`"), ("kvmagent", "`kvmagent stop g`"),
                 ("libvirt", "`virsh shutdown g` → shut off")],
    "hard": [("bare", "bare QEMU (kill -9 → exit)"), ("splitwx", "bare QEMU, split-wx"),
             ("systemctl", "`systemctl kill -s USR1 --kill-whom=main kvm@g` → inactive"),
             ("kvmagent", "`kvmagent stop --force g`"), ("libvirt", "`virsh destroy g`")],
}
TITLES = {"running": "start → QMP running", "graceful": "graceful ACPI stop → stopped",
          "hard": "hard stop → stopped"}
# measure -> (reference way, goal): kvmagent's own rows are held to it
GOALS = {"running": ("libvirt", Goal(0.5, "≥ 2× faster than virsh start")),
         "graceful": ("bare", Goal(1.1, "within 1.1× of bare QEMU")),
         "hard": ("libvirt", Goal(1 / 3, "≥ 3× faster than virsh destroy"))}


def measure(release: str, rounds: int,
            trace: bool = False) -> tuple[dict[str, object], dict[str, str]]:
    """The samples of ROUNDS rounds (lifecycle_inner.py); with TRACE, where
    the milliseconds of ROUNDS starts and stops go instead (trace_inner.py,
    printed as it comes)."""
    image = find_guest()
    with TestHost(root=release, src=REPO,
                  bind_ro=[(rootfs.cached_debs(release), "/mnt/debs"),
                           libvirt.bind(release)]) as th:
        install_on_release(th)
        inhost.compile_checkout(th)
        inside = copy_guest(th, image)
        define_guest(th, "bench", guest_toml(inside, nics=0))
        th.exec(["systemctl", "daemon-reload"])
        libvirt.install(th)
        kernel, initrd = libvirt.copy_guest(th, image.kernel, image.initrd)
        th.write_file("/var/tmp/bench.xml", libvirt.domain_xml(
            "bench", kernel, initrd, "console=ttyS0 quiet panic=-1",
            serial_log="/var/log/libvirt/qemu/bench.console"))
        th.run(["virsh", "define", "/var/tmp/bench.xml"])
        facts = machine_facts(th)
        if trace:
            print(th.run(["/usr/bin/python3", "/src/kvmagent/bench/trace_inner.py",
                          str(rounds)], env=inhost.ENV, timeout=3600).stdout)
            return {}, facts
        out = th.run(["/usr/bin/python3", "/src/kvmagent/bench/lifecycle_inner.py",
                      str(inside.kernel), str(inside.initrd), str(rounds)],
                     env=inhost.ENV, timeout=3600).stdout
    return json.loads(out.strip().splitlines()[-1]), facts


def machine_facts(th: TestHost) -> dict[str, str]:
    """What the figures hold for: this machine and the test host's versions."""
    v = libvirt.versions(th)
    mem = Path("/proc/meminfo").read_text().split()[1]
    return {"cores": str(os.cpu_count()), "memory": f"{int(mem) / 1048576:.1f} GiB",
            "kernel": os.uname().release, "debian": th.release,
            "qemu": v.get("qemu-system-x86", "?"), "libvirt": v.get("libvirt-daemon", "?"),
            "load": " ".join(Path("/proc/loadavg").read_text().split()[:3])}


def report(r: dict[str, object], facts: dict[str, str], rounds: int) -> str:
    samples: dict[str, dict[str, list[float]]] = r["samples"]  # type: ignore[assignment]
    lines = [f"Debian {rootfs.RELEASES[facts['debian']]} ({facts['debian']}): QEMU "
             f"{facts['qemu']}, libvirt {facts['libvirt']}, TCG; {facts['cores']} cores, "
             f"{facts['memory']}, kernel {facts['kernel']}; load average before: "
             f"{facts['load']}; medians of {rounds} interleaved rounds, ms"]
    for measure, ways in WAYS.items():
        ref_way, goal = GOALS[measure]
        ref = median_ms(samples[ref_way][measure])
        bare = median_ms(samples["bare"][measure])
        lib = median_ms(samples["libvirt"][measure])
        rows = []
        for way, label in ways:
            m = median_ms(samples[way][measure])
            ours = way in ("systemctl", "kvmagent")
            rows.append([label, f"{m:.0f}", spread_ms(samples[way][measure]),
                         ratio(m, bare) if ours else "", ratio(m, lib) if ours else "",
                         goal.verdict(m, ref) if ours else ""])
        if measure == "graceful":
            gone = samples["libvirt"]["qemu gone"]
            rows.append(["(libvirt: QEMU gone)", f"{median_ms(gone):.0f}", spread_ms(gone),
                         "", "", ""])
        lines += ["", f"{TITLES[measure]}:",
                  table(["", "median", "min–max", "/bare", "/libvirt", "goal"], rows)]
    plain, sandboxed = (float(r[k]) * 1000  # type: ignore[arg-type]
                        for k in ("exec plain", "exec sandboxed"))
    lines.append(f"\nsystemd running /bin/true as a service: {plain:.0f} ms; with "
                 f"kvm@.service's sandbox {sandboxed:.0f} ms (+{sandboxed - plain:.0f} ms "
                 "in every start above)")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rounds", nargs="?", type=int, default=5)
    p.add_argument("--release", action="append", choices=list(rootfs.RELEASES),
                   help="a test host of this release's root (default: each)")
    p.add_argument("--json", metavar="FILE", help="also write every sample there")
    p.add_argument("--trace", action="store_true",
                   help="where the milliseconds of ROUNDS starts and stops go, instead")
    args = p.parse_args()
    results = {}
    for release in args.release or list(rootfs.RELEASES):
        r, facts = measure(release, args.rounds, args.trace)
        if args.trace:
            continue
        results[release] = {"result": r, "facts": facts}
        print(report(r, facts, args.rounds) + "\n", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
