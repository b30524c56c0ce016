#!/usr/bin/python3
"""kvmagent at the scale of a full host, against Debian's libvirt in the same
test host (#22): the memory the manager adds with 1, 10 and 50 guests; 50
guests started by one command; the boot storm (50 guests enabled at boot,
the test host rebooted); the host's shutdown with 50 guests running.

Run as root after `make setup`, with the network the first time (libvirt's
packages are downloaded once, bench/libvirt.py); heavy (50 TCG guests), so
under the machine's lock:
    flock /tmp/kvmagent-heavy.lock /usr/bin/python3 bench/bench_scale.py \\
        [--counts 1,10,50] [--release bookworm]

One persistent test host of the release's root (its changes kept across
boots), kvmagent's checkout and libvirt installed side by side, the tiny
guest (TCG, 256 MiB, one vCPU, no NIC, `no_timer_check`: its clock check
fails under this load) as guests s1..sN and domains v1..vN:

- memory and start at once, for each count: kvmagent's guests by one
  `systemctl start kvm@s1 ... kvm@sN`, then libvirt's by N `virsh start`
  at once; until all run (QMP running: the supervisor's "running" message;
  libvirt's status file says running after its `cont`) and all consoles
  said GUEST-READY (kvmagent: the journal; libvirt: the serial log file);
  then the PSS of the managers' processes (every supervisor; libvirtd,
  virtlogd and virtlockd) and of the QEMUs, read within a moment; then all
  stopped at once (ACPI: `systemctl stop`, N `virsh shutdown`).
- boot storm: N kvm@sN enabled (libvirt's units disabled), the host
  rebooted: from systemd's start until all run and all are ready.  Then
  libvirt's N domains with autostart (kvmagent's guests disabled), libvirtd
  and libvirt-guests enabled, rebooted: the same, seen by a service that
  polls libvirt's status files and serial logs every 0.1 s from early boot.
- host shutdown: right after each boot storm, the N guests running,
  `systemctl poweroff`: until each guest is down (kvmagent: "guest sN
  stopped" in the journal; libvirt: "shutting down" in its QEMU log), read
  in the next boot, and whether each powered itself off on the ACPI button
  (its console said GUEST-POWEROFF; kvmagent: no `quit`/SIGKILL; libvirt:
  reason=shutdown).  libvirt-guests with ON_SHUTDOWN=shutdown and
  PARALLEL_SHUTDOWN=N (Debian's default shuts guests down one at a time),
  SHUTDOWN_TIMEOUT=90 (kvmagent's default stop timeout); ON_BOOT=ignore.

The goals (the issue's): at most 8 MiB PSS added per guest at 50 guests;
boot storm and shutdown no slower than libvirt's, every guest stopped
gracefully."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import inhost, libvirt, supervisor_memory  # noqa: E402
from bench.bench_lifecycle import machine_facts  # noqa: E402
from bench.report import table  # noqa: E402
from tests.guest.build import find_guest  # noqa: E402
from tests.harness import TestHost, rootfs  # noqa: E402
from tests.harness.install import (REPO, copy_guest, define_guest, guest_toml,  # noqa: E402
                                   install_on_release)

INNER = "/src/kvmagent/bench/scale_inner.py"
CMDLINE = "no_timer_check"  # the guest kernel's clock check fails under this load
BASE_CMDLINE = f"console=ttyS0 quiet panic=-1 {CMDLINE}"  # as guest_toml writes it
WAIT = 1800  # s: any one step with 50 TCG guests on 2 cores
WATCH = "/var/tmp/bench-watch.json"
WATCH_UNIT = "/etc/systemd/system/bench-watch.service"
LIBVIRT_UNITS = ("libvirtd.service", "libvirtd.socket", "libvirtd-ro.socket",
                 "libvirtd-admin.socket", "virtlogd.socket", "libvirt-guests.service")
GUESTS_DEFAULTS = "/etc/default/libvirt-guests"
# Persistent settings for every boot: the bytecode of the checkout (as the
# package's own is compiled at install), and the journal kept on disk (the
# shutdown is read from it in the next boot).
MANAGER_DROPIN = ("/etc/systemd/system.conf.d/50-bench.conf",
                  f"[Manager]\nDefaultEnvironment=PYTHONPYCACHEPREFIX={inhost.PYCACHE}\n")


def inner(th: TestHost, *argv: str) -> dict[str, object]:
    out = th.run(["/usr/bin/python3", INNER, *argv], env=inhost.ENV, timeout=WAIT).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def watch_unit(count: int) -> str:
    return ("[Unit]\nDescription=kvmagent benchmark: when libvirt's domains run and are ready\n"
            "DefaultDependencies=no\nAfter=local-fs.target\n\n[Service]\n"
            f"Environment=PYTHONPYCACHEPREFIX={inhost.PYCACHE}\n"
            f"ExecStart=/usr/bin/python3 {INNER} watch {count} {WATCH}\n\n"
            "[Install]\nWantedBy=multi-user.target\n")


def setup(th: TestHost, count: int) -> None:
    install_on_release(th)
    th.write_file(*MANAGER_DROPIN)
    inhost.compile_checkout(th)
    # the journal of each boot in the same place (a fixed machine ID)
    th.write_file("/etc/machine-id", uuid.uuid4().hex + "\n", 0o444)
    th.exec(["mkdir", "-p", "/var/log/journal"])
    th.exec(["systemd-tmpfiles", "--create", "--prefix", "/var/log/journal"])
    th.exec(["journalctl", "--flush"])
    outside = find_guest()
    image = copy_guest(th, outside)
    for i in range(1, count + 1):
        define_guest(th, f"s{i}", guest_toml(image, nics=0, cmdline=CMDLINE))
    th.exec(["systemctl", "daemon-reload"])
    libvirt.install(th)
    kernel, initrd = libvirt.copy_guest(th, outside.kernel, outside.initrd)
    th.write_file(GUESTS_DEFAULTS, "# kvmagent's benchmark: every guest at once, by ACPI\n"
                  f"ON_BOOT=ignore\nON_SHUTDOWN=shutdown\nPARALLEL_SHUTDOWN={count}\n"
                  "SHUTDOWN_TIMEOUT=90\n")
    for i in range(1, count + 1):
        name = f"v{i}"
        th.write_file(f"/var/tmp/{name}.xml", libvirt.domain_xml(
            name, kernel, initrd, BASE_CMDLINE,
            serial_log=f"/var/log/libvirt/qemu/{name}.console"))
        th.exec(["virsh", "define", f"/var/tmp/{name}.xml"])


def kvm_units(count: int) -> list[str]:
    return [f"kvm@s{i}.service" for i in range(1, count + 1)]


def measure(release: str, counts: list[int], journal: Path | None = None) -> dict[str, object]:
    n = max(counts)
    r: dict[str, object] = {"counts": counts, "n": n}
    binds = [(rootfs.cached_debs(release), "/mnt/debs"), libvirt.bind(release)]
    persist = Path(tempfile.mkdtemp(prefix="kvmagent-bench-scale-", dir="/var/tmp"))
    host = dict(root=release, src=REPO, bind_ro=binds, persistent=True, persist_dir=persist,
                boot_timeout=WAIT, stop_timeout=WAIT, journal_dir=journal)
    try:
        with TestHost(**host) as th:  # type: ignore[arg-type]
            setup(th, n)
            r["facts"] = machine_facts(th)
            r["modules"] = json.loads(th.run(
                ["/usr/bin/python3", "/src/kvmagent/bench/supervisor_memory.py", "--json"],
                env=inhost.ENV).stdout)
            for count in counts:
                for manager in ("kvmagent", "libvirt"):
                    r[f"start {manager} {count}"] = inner(th, "start", manager, str(count))
                    print(f"  {manager} x{count}: {r[f'start {manager} {count}']}", flush=True)
            # the boot storm: kvmagent's guests enabled, libvirt's units off
            th.exec(["systemctl", "disable", *LIBVIRT_UNITS])
            th.exec(["systemctl", "enable", "machines.target", *kvm_units(n)])
            th.reboot()
            r["storm kvmagent"] = inner(th, "storm", "kvmagent", str(n))
            print(f"  storm kvmagent: {r['storm kvmagent']}", flush=True)
            th.exec(["systemctl", "disable", *kvm_units(n)])  # still stopped at the poweroff
            since = time.time()
            r["poweroff kvmagent"] = th.poweroff(WAIT)
            r["since kvmagent"] = since
        with TestHost(**host) as th:  # type: ignore[arg-type]
            r["stopped kvmagent"] = inner(th, "stopped", "kvmagent", str(n), f"{since:.6f}")
            print(f"  shutdown kvmagent: {r['stopped kvmagent']}", flush=True)
            libvirt.start(th)
            for i in range(1, n + 1):
                th.exec(["virsh", "autostart", f"v{i}"], check=True)
            # the consoles of the starts before said GUEST-READY already
            th.exec(["find", "/var/log/libvirt/qemu", "-name", "*.console", "-delete"])
            th.write_file(WATCH_UNIT, watch_unit(n))
            th.exec(["systemctl", "daemon-reload"])
            th.exec(["systemctl", "enable", *LIBVIRT_UNITS, "bench-watch.service"])
            th.reboot()
            r["storm libvirt"] = inner(th, "storm", "libvirt", str(n), WATCH)
            print(f"  storm libvirt: {r['storm libvirt']}", flush=True)
            for i in range(1, n + 1):
                th.exec(["virsh", "autostart", "--disable", f"v{i}"])
            th.exec(["systemctl", "disable", "libvirtd.service", "bench-watch.service"])
            # libvirt-guests stopped the guests it saw running at the poweroff
            state = th.exec(["systemctl", "is-active", "libvirt-guests.service"],
                            check=False).stdout.strip()
            r["libvirt-guests"] = state
            since = time.time()
            r["poweroff libvirt"] = th.poweroff(WAIT)
        with TestHost(**host) as th:  # type: ignore[arg-type]
            r["stopped libvirt"] = inner(th, "stopped", "libvirt", str(n), f"{since:.6f}")
            print(f"  shutdown libvirt: {r['stopped libvirt']}", flush=True)
    finally:
        shutil.rmtree(persist, ignore_errors=True)
    return r


# -- the tables -----------------------------------------------------------------

def mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def secs(v: object) -> str:
    return "-" if v is None else f"{float(v):.1f}"  # type: ignore[arg-type]


def memory_table(r: dict[str, object]) -> str:
    rows = []
    for count in r["counts"]:  # type: ignore[attr-defined]
        k, lv = r[f"start kvmagent {count}"]["memory"], r[f"start libvirt {count}"]["memory"]  # type: ignore[index]
        rows.append([str(count), mib(k["manager"]["pss"]), mib(k["manager"]["pss"] / count),
                     mib(lv["manager"]["pss"]), mib(lv["manager"]["pss"] / count),
                     mib(k["qemu"]["pss"] / count), mib(lv["qemu"]["pss"] / count)])
    return table(["guests", "kvmagent supervisors", "per guest", "libvirt daemons",
                  "per guest", "QEMU per guest (kvmagent)", "QEMU per guest (libvirt)"], rows)


def goal_memory(r: dict[str, object]) -> str:
    n = r["n"]
    per = r[f"start kvmagent {n}"]["memory"]["manager"]["pss"] / n / 1024  # type: ignore[index]
    verdict = "met" if per <= 8 else f"missed by {per - 8:.1f} MiB"
    return f"goal: ≤ 8 MiB PSS added per guest at {n} guests: {per:.1f} MiB, {verdict}"


def timing_table(r: dict[str, object]) -> str:
    n = r["n"]
    rows = []
    for what, key in ((f"{n} started by one command", f"start {{}} {n}"),
                      (f"boot storm, {n} at boot (from systemd's start)", "storm {}")):
        k, lv = r[key.format("kvmagent")], r[key.format("libvirt")]  # type: ignore[index]
        for stage in ("running", "ready"):
            ks, ls = k[stage], lv[stage]  # type: ignore[index]
            ratio = (f"{ks['all'] / ls['all']:.2f}×" if ks["all"] and ls["all"] else "-")
            rows.append([what if stage == "running" else "", f"all {stage}",
                         secs(ks["median"]), secs(ks["all"]), secs(ls["median"]),
                         secs(ls["all"]), ratio])
    k, lv = r["stopped kvmagent"], r["stopped libvirt"]  # type: ignore[index]
    ratio = (f"{k['down']['all'] / lv['down']['all']:.2f}×"
             if k["down"]["all"] and lv["down"]["all"] else "-")
    rows.append([f"host shutdown, {n} running", "all down", secs(k["down"]["median"]),
                 secs(k["down"]["all"]), secs(lv["down"]["median"]), secs(lv["down"]["all"]),
                 ratio])
    rows.append(["", "host off (poweroff → nspawn gone)", "", secs(r["poweroff kvmagent"]), "",
                 secs(r["poweroff libvirt"]),
                 f"{float(r['poweroff kvmagent']) / float(r['poweroff libvirt']):.2f}×"])  # type: ignore[arg-type]
    rows.append(["", "stopped by their own ACPI power-off", "",
                 f"{k['graceful']} of {n}", "", f"{lv['graceful']} of {n}", ""])
    return table(["", "", "kvmagent median", "kvmagent all", "libvirt median", "libvirt all",
                  "kvmagent/libvirt"], rows)


def stop_table(r: dict[str, object]) -> str:
    rows = []
    for count in r["counts"]:  # type: ignore[attr-defined]
        k, lv = r[f"start kvmagent {count}"], r[f"start libvirt {count}"]  # type: ignore[index]
        rows.append([str(count), secs(k["command"]), secs(lv["command"]),
                     secs(k["stop all"]), secs(lv["stop all"])])
    return table(["guests", "start command (kvmagent)", "start commands (libvirt)",
                  "all stopped by ACPI (kvmagent)", "(libvirt)"], rows)


def report(r: dict[str, object]) -> str:
    f = r["facts"]
    assert isinstance(f, dict)
    n = r["n"]
    sup = r[f"start kvmagent {n}"]["memory"]["supervisor"]  # type: ignore[index]
    daemons = r[f"start libvirt {n}"]["memory"]["daemons"]  # type: ignore[index]
    lines = [f"Debian {rootfs.RELEASES[f['debian']]} ({f['debian']}): QEMU {f['qemu']}, libvirt "
             f"{f['libvirt']}, TCG; {f['cores']} cores, {f['memory']}, kernel {f['kernel']}; "
             f"load average before: {f['load']}; one run", "",
             "memory (PSS, MiB) with N guests running:", memory_table(r), goal_memory(r),
             "one supervisor at %d guests, by mapping (PSS/USS KiB): " % n
             + "; ".join(f"{c}: {v['pss']}/{v['uss']}" for c, v in sup.items() if v["pss"]),
             supervisor_memory.report(r["modules"]),  # type: ignore[arg-type]
             "libvirt's daemons at %d guests (PSS KiB): " % n
             + ", ".join(f"{u} {p}" for u, p in daemons.items()), "",
             "times (s):", timing_table(r), "",
             "start and stop at once (s):", stop_table(r)]
    for m in ("kvmagent", "libvirt"):
        bad = r[f"stopped {m}"]["not graceful"]  # type: ignore[index]
        if bad:
            lines.append(f"{m}: not stopped by their own power-off: {', '.join(bad)}")
    lines.append(f"libvirt-guests at the poweroff: {r.get('libvirt-guests')}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", default="1,10,50",
                   help="guest counts for memory and start (the largest: boot and shutdown)")
    p.add_argument("--release", default="bookworm", choices=list(rootfs.RELEASES))
    p.add_argument("--json", metavar="FILE", help="also write every figure there")
    p.add_argument("--journal", metavar="DIR", type=Path,
                   help="keep the test host's journals there (every boot's, to trace a row)")
    args = p.parse_args()
    counts = sorted({int(c) for c in args.counts.split(",")})
    r = measure(args.release, counts, args.journal)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    print(report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
