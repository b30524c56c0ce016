"""`virsh migrate --live` beside `kvmagent migrate` in bench/bench_migrate.py
(#22): Debian's libvirt on both hosts of the pair (bench/libvirt.py), the
same tiny guest as a domain (the same kernel, initrd, memory, vCPU, a
virtio NIC on br-kvm pinging the bridge, and a raw disk on the shared
storage, cache=none as kvmagent's), moved back and forth in the same run,
its moves interleaved with kvmagent's, in two ways:

- tcp: `virsh migrate --live --unsafe DOMAIN qemu+ssh://HOST/system --migrateuri
  tcp://ADDRESS`: virsh drives both libvirtds, QEMU's stream goes straight
  over TCP on the private link (kvmagent's goes through ssh);
- tunnelled: `virsh migrate --live --unsafe --p2p --tunnelled DOMAIN
  qemu+ssh://HOST/system`: the source's libvirtd talks to the other over
  ssh itself and carries QEMU's stream in that connection, as kvmagent does.

The domain is defined on both hosts (one UUID), as kvmagent's guest is
configured on both: the destination's definition takes the running guest,
the source's stays, inactive.

Each move is timed inside the source host (TIMED: the command's own wall
time, and when each of its output lines came).  The downtime and migration
time are not the same measure on both sides.  kvmagent's are QEMU's on the
source, from the "migrated" event of --json (downtime_ms, qemu_total_ms:
query-migrate's downtime, the guest paused until the source sent the last
of it, and total-time).  libvirt's are libvirt's own, from `virsh domjobinfo
--completed` on the source ("Total downtime": the source's CPUs stopped
until the destination's libvirtd resumed them, which the destination
reports back; "Time elapsed": the job's start, before the destination's
QEMU is started, until then).  Where kvmagent's command time goes is
measured too: ssh's session alone (`ssh HOST true`), the preflight's facts
(`ssh HOST kvmagent migrate-incoming NAME --facts`), and the times its own
--json events came.

The pure parts (the domain, domjobinfo's text, the summary) are tested in
tests/unit/test_bench_virsh_migrate.py."""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import libvirt
from bench.report import ratio, table

TYPE_CHECKING = False
if TYPE_CHECKING:
    from tests.harness import TestHost
    from tests.harness.hostpair import HostPair

DOMAIN = "bench-lv"
UUID = "8d5c1a64-2f0e-4a57-9c1d-22b0f5a77e03"
MAC = "52:54:00:77:00:03"
ADDRESS = "10.77.0.3/24"  # kvmagent's guest is 10.77.0.2
BRIDGE = "br-kvm"
CONSOLE_LOG = f"/var/log/libvirt/qemu/{DOMAIN}.console"
# (way, what its row says)
WAYS = (("kvmagent ssh", "`kvmagent migrate` (stream over ssh)"),
        ("kvmagent tcp", "`kvmagent migrate --transport tcp`"),
        ("tcp", "`virsh migrate --live` (tcp)"),
        ("tunnelled", "`virsh migrate --live --p2p --tunnelled`"))
# libvirt's way -> kvmagent's rows it is set against, nearest first: plain TCP
# streams against kvmagent's tcp, a stream through an ssh session against ssh
AGAINST = {"tcp": ("kvmagent tcp", "kvmagent ssh"), "tunnelled": ("kvmagent ssh",)}
PING = "ping -i 0.1 10.77.0.1 &\n"  # as kvmagent's guest does

# Run in a host with python3 -c TIMED ARGV...: ARGV's wall time and when each
# of its stdout lines came (seconds since it was started), as one JSON line.
TIMED = """\
import json, subprocess, sys, time
t0 = time.monotonic()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
lines = [[round(time.monotonic() - t0, 4), line.rstrip("\\n")] for line in p.stdout]
err = p.stderr.read()
rc = p.wait()
print(json.dumps({"wall": time.monotonic() - t0, "rc": rc, "lines": lines, "stderr": err}))
"""


@dataclass(frozen=True)
class Sample:
    """One move: the downtime and total time (ms) as each manager reports
    them, the command's wall time (s), and how long the guest did not run
    (ms: kvmagent's paused_ms, from the source's pause until the guest ran
    on the destination; libvirt's downtime is that already)."""
    downtime_ms: int
    qemu_ms: int
    wall_s: float
    paused_ms: int | None = None

    @property
    def paused(self) -> int:
        """The like-for-like figure: the pause, or the downtime without one."""
        return self.downtime_ms if self.paused_ms is None else self.paused_ms


@dataclass(frozen=True)
class Timed:
    wall: float
    returncode: int
    lines: list[tuple[float, str]]
    stderr: str

    @property
    def stdout(self) -> str:
        return "".join(line + "\n" for _, line in self.lines)


def timed(th: TestHost, argv: Sequence[str], timeout: float = 300) -> Timed:
    """ARGV run in host TH, timed there (TIMED)."""
    r = th.exec(["python3", "-c", TIMED, *argv], check=False, timeout=timeout)
    try:
        d = json.loads(r.stdout.splitlines()[-1])
    except (ValueError, IndexError):
        raise SystemExit(f"{' '.join(argv)}: no timing ({r.stderr.strip()})") from None
    return Timed(float(d["wall"]), int(d["rc"]), [(float(t), s) for t, s in d["lines"]],
                 str(d["stderr"]))


# -- pure ------------------------------------------------------------------------

def domain_xml(kernel: str, initrd: str, disk: str, cmdline: str) -> str:
    """bench/libvirt.py's domain for the pair: its fixed UUID (one domain,
    defined on both hosts), the disk on the shared storage (raw, virtio,
    cache=none and aio native as kvmagent runs it on a file system that
    has O_DIRECT), a virtio NIC on br-kvm, and the serial console on a pty
    (to type the pings into) logged to CONSOLE_LOG."""
    xml = libvirt.domain_xml(DOMAIN, kernel, initrd, cmdline)
    pty = "<serial type='pty'><target port='0'/></serial>"
    logged = (f"<serial type='pty'><log file='{CONSOLE_LOG}' append='on'/>"
              "<target port='0'/></serial>")
    devices = (
        "    <disk type='file' device='disk'>\n"
        "      <driver name='qemu' type='raw' cache='none' io='native'/>\n"
        f"      <source file='{disk}'/>\n"
        "      <target dev='vda' bus='virtio'/>\n"
        "    </disk>\n"
        "    <interface type='bridge'>\n"
        f"      <mac address='{MAC}'/>\n"
        f"      <source bridge='{BRIDGE}'/>\n"
        "      <model type='virtio'/>\n"
        "    </interface>\n")
    for old, new in ((f"  <name>{DOMAIN}</name>\n",
                      f"  <name>{DOMAIN}</name>\n  <uuid>{UUID}</uuid>\n"),
                     (pty, logged), ("  </devices>", devices + "  </devices>")):
        if xml.count(old) != 1:
            raise ValueError(f"bench/libvirt.py's domain changed: {old.strip()!r} not once in it")
        xml = xml.replace(old, new)
    return xml


def migrate_argv(way: str, host: str, address: str) -> list[str]:
    """virsh's command that moves the domain to HOST (ADDRESS on the private
    link).  --unsafe: libvirt refuses a disk that is not on storage it knows
    to be shared ("Migration without shared storage is unsafe"), and the
    pair's shared storage is one local directory bound into both hosts,
    which no check can tell from a local one; on NFS, GFS2 or Ceph libvirt
    would find it shared and not ask."""
    uri = f"qemu+ssh://{host}/system"
    if way == "tcp":
        return ["virsh", "migrate", "--live", "--unsafe", DOMAIN, uri,
                "--migrateuri", f"tcp://{address}"]
    if way == "tunnelled":
        return ["virsh", "migrate", "--live", "--unsafe", "--p2p", "--tunnelled", DOMAIN, uri]
    raise ValueError(f"no such way: {way}")


def parse_domjobinfo(text: str) -> tuple[int, int]:
    """(downtime, elapsed) in ms from `virsh domjobinfo --completed`'s
    "Total downtime:" and "Time elapsed:" lines; ValueError if either is
    missing, or both are 0 (no completed migration: a reading to refuse,
    not to average)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        m = re.fullmatch(r"\s*(Total downtime|Time elapsed):\s+(\d+)\s+ms\s*", line)
        if m:
            values[m[1]] = int(m[2])
    missing = {"Total downtime", "Time elapsed"} - values.keys()
    if missing:
        raise ValueError(f"domjobinfo has no {' or '.join(sorted(missing))}: {text.strip()!r}")
    downtime, elapsed = values["Total downtime"], values["Time elapsed"]
    if downtime == 0 and elapsed == 0:
        raise ValueError(f"domjobinfo reads 0 ms downtime in 0 ms: {text.strip()!r}")
    return downtime, elapsed


def kvmagent_sample(run: Timed) -> tuple[Sample, dict[str, float]]:
    """kvmagent migrate --json's sample, and when its events came (s):
    "started" (the destination listens: preflight, ssh, its unit started),
    "completed" (the first progress saying QEMU completed), "migrated"."""
    events: dict[str, float] = {}
    done: dict[str, object] = {}
    for t, line in run.lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        kind = str(event.get("event"))
        if kind == "progress" and event.get("status") == "completed":
            kind = "completed"
        events.setdefault(kind, t)
        if kind == "migrated":
            done = event
    if not done:
        raise ValueError(f"no migrated event: {run.stdout!r} {run.stderr!r}")
    paused = done.get("paused_ms")
    return Sample(int(done["downtime_ms"]), int(done["qemu_total_ms"]),  # type: ignore[call-overload]
                  run.wall, paused if isinstance(paused, int) else None), events


def _mid(values: Sequence[float]) -> float:
    return statistics.median(values)


def _range(values: Sequence[float], fmt: str) -> str:
    return f"{format(min(values), fmt)}–{format(max(values), fmt)}"


def summary(samples: Mapping[str, Sequence[Sample]]) -> str:
    """The table: per way, the medians and min–max of downtime, the
    migration's time and the command's time, and the ratio of kvmagent's
    nearest way (AGAINST) to each of libvirt's."""
    rows = []
    for way, label in WAYS:
        s = samples.get(way, [])
        if not s:
            continue
        down = [x.downtime_ms for x in s]
        paused = [x.paused for x in s]
        qemu = [x.qemu_ms for x in s]
        wall = [x.wall_s for x in s]
        ours = next((samples[k] for k in AGAINST.get(way, ()) if samples.get(k)), [])
        if not ours:
            vs = "", ""
        else:
            vs = (ratio(_mid([x.paused for x in ours]), _mid(paused)),
                  ratio(_mid([x.wall_s for x in ours]), _mid(wall)))
        rows.append([label, str(len(s)), f"{_mid(down):.0f} ({_range(down, '.0f')})",
                     f"{_mid(paused):.0f} ({_range(paused, '.0f')})",
                     f"{_mid(qemu):.0f} ({_range(qemu, '.0f')})",
                     f"{_mid(wall):.2f} ({_range(wall, '.2f')})", *vs])
    return table(["move", "n", "downtime ms", "guest paused ms", "migration ms", "command s",
                  "kvmagent/it paused", "kvmagent/it command"], rows) + (
        "\n(kvmagent/it: kvmagent's tcp against virsh's tcp, its ssh against tunnelled; "
        "guest paused: from the source's pause until the guest ran on the destination — "
        "kvmagent's paused_ms, libvirt's own downtime)")


def breakdown(events: Sequence[Mapping[str, float]], samples: Sequence[Sample],
              probes: Mapping[str, Sequence[float]]) -> str:
    """Where kvmagent migrate's time goes (medians, ms)."""
    def med(key: str) -> float:
        """NaN when no move had KEY: a destination that says "running"
        before the source's next look leaves no progress saying completed."""
        values = [e[key] for e in events if key in e]
        return _mid(values) * 1000 if values else math.nan
    rows = [["`ssh HOST true` (one ssh session)", f"{_mid(probes['ssh']) * 1000:.0f}"],
            ["`ssh HOST kvmagent migrate-incoming NAME --facts` (the preflight's facts)",
             f"{_mid(probes['facts']) * 1000:.0f}"],
            ["command start → \"started\" (preflight; ssh; the destination's unit "
             "started, listening)", f"{med('started'):.0f}"],
            ["QEMU's total time (migrate → completed)",
             f"{_mid([s.qemu_ms for s in samples]):.0f}"],
            ["\"started\" → first progress saying completed", f"{med('completed') - med('started'):.0f}"],
            ["completed → \"migrated\" (running there; the source's unit ended)",
             f"{med('migrated') - med('completed'):.0f}"],
            ["command's wall time", f"{_mid([s.wall_s for s in samples]) * 1000:.0f}"]]
    for row in rows:
        row[1] = row[1].replace("nan", "–")
    return table(["kvmagent migrate (ssh), where the time goes", "median ms"], rows)


# -- the pair --------------------------------------------------------------------

class Libvirt:
    """The domain on the pair: set up, its moves, kvmagent's probes."""

    def __init__(self, pair: HostPair, shared: Path, kernel: Path, initrd: Path,
                 disk: str) -> None:
        self.pair, self.at = pair, 0
        self.samples: dict[str, list[Sample]] = {way: [] for way, _ in WAYS}
        self.events: list[dict[str, float]] = []
        self.probes: dict[str, list[float]] = {"ssh": [], "facts": []}
        self.whence: set[str] = set()
        self.lost = (0, 0)
        with open(shared / Path(disk).name, "wb") as f:
            f.truncate(16 << 20)
        for th in pair:
            libvirt.install(th)
            k, i = libvirt.copy_guest(th, kernel, initrd)
            th.write_file(f"/var/tmp/{DOMAIN}.xml", domain_xml(
                k, i, disk, f"console=ttyS0 quiet panic=-1 guest.ip={ADDRESS}"))
            th.run(["virsh", "define", f"/var/tmp/{DOMAIN}.xml"])
        first = pair[0]
        first.run(["virsh", "start", DOMAIN])
        deadline = time.monotonic() + 120
        while "GUEST-READY" not in first.exec(["cat", CONSOLE_LOG], check=False).stdout:
            if time.monotonic() > deadline:
                raise SystemExit(f"libvirt's {DOMAIN} did not boot")
            time.sleep(0.5)
        # QEMU reads a pty only once it saw its other end opened (it looks
        # every second): held open a while around the line typed.
        pty = first.exec(["virsh", "ttyconsole", DOMAIN]).stdout.strip()
        first.exec(["sh", "-c", 'exec 3>"$1"; sleep 1.5; printf %s "$2" >&3; sleep 1.5',
                    "sh", pty, PING])
        deadline = time.monotonic() + 20
        while self.pings()[0] == 0:
            if time.monotonic() > deadline:
                raise SystemExit(f"libvirt's {DOMAIN} does not ping (see {CONSOLE_LOG})")
            time.sleep(0.5)
        self.versions = libvirt.versions(first)

    def kvmagent(self, run: Timed, transport: str) -> None:
        """A kvmagent move over TRANSPORT, timed (TIMED)."""
        sample, events = kvmagent_sample(run)
        self.samples[f"kvmagent {transport}"].append(sample)
        if transport == "ssh":
            self.events.append(events)

    def round(self, i: int, name: str) -> None:
        """After kvmagent's move I: the domain moved both ways (their order
        swapped each round); kvmagent's probes from the host guest NAME is
        on now."""
        for way in (("tcp", "tunnelled") if i % 2 == 0 else ("tunnelled", "tcp")):
            self.move(way)
            time.sleep(2)
        here = self.pair[(i + 1) % 2]
        other = f"host{i % 2}"
        for key, argv in (("ssh", ["ssh", "-o", "BatchMode=yes", other, "true"]),
                          ("facts", ["ssh", "-o", "BatchMode=yes", other, "kvmagent",
                                     "migrate-incoming", name, "--facts"])):
            run = timed(here, argv, timeout=60)
            if run.returncode != 0:
                raise SystemExit(f"{' '.join(argv)}: {run.stderr}")
            self.probes[key].append(run.wall)

    def move(self, way: str) -> None:
        src, to = self.pair[self.at], 1 - self.at
        run = timed(src, migrate_argv(way, f"host{to}", self.pair.address(to)))
        if run.returncode != 0:
            raise SystemExit(f"virsh migrate ({way}) host{self.at} -> host{to} failed: "
                             f"{run.stderr.strip()}")
        info = src.exec(["virsh", "domjobinfo", "--completed", DOMAIN], check=False)
        self.whence.add("the source's")
        try:
            downtime, elapsed = parse_domjobinfo(info.stdout)
        except ValueError:  # the source kept no statistics: the destination's
            info = self.pair[to].exec(["virsh", "domjobinfo", "--completed", DOMAIN])
            downtime, elapsed = parse_domjobinfo(info.stdout)
            self.whence.add("the destination's")
        self.samples[way].append(Sample(downtime, elapsed, run.wall, downtime))
        self.at = to

    def pings(self) -> tuple[int, int]:
        """(sent, lost) of the domain's pings, from both hosts' console logs."""
        seqs = sorted({int(s) for th in self.pair for s in re.findall(
            r"seq=(\d+) ", th.exec(["cat", CONSOLE_LOG], check=False).stdout)})
        sent = seqs[-1] - seqs[0] + 1 if seqs else 0
        return sent, sent - len(seqs)

    def report(self) -> str:
        return "\n\n".join([
            f"live migration, kvmagent vs libvirt {self.versions.get('libvirt-daemon', '?')} "
            f"in the same run (QEMU {self.versions.get('qemu-system-x86', '?')}).  kvmagent's "
            "downtime and migration time: QEMU's on the source (--json); libvirt's: its own, "
            f"from {' or '.join(sorted(self.whence))} `virsh domjobinfo --completed` (the "
            "source's CPUs stopped until the destination's resumed; the job's start until then)",
            summary(self.samples),
            breakdown(self.events, self.samples["kvmagent ssh"], self.probes)
            if self.events else "",
            "libvirt's domain's pings every 0.1 s to its bridge: {} sent, {} lost".format(
                *self.lost)])

    def stop(self) -> None:
        """The pings counted, the domain destroyed (before the pair goes)."""
        self.lost = self.pings()
        self.pair[self.at].exec(["virsh", "destroy", DOMAIN], check=False)
