"""Debian's libvirt beside kvmagent in a test host, for the side-by-side
benchmarks (#22): the same guests, the same machine, the same run.

- debs(RELEASE): Debian's libvirt packages (the daemon, its QEMU driver,
  virsh, and what they need beyond the release's cached test root),
  downloaded once on this machine into an offline repository,
  /var/cache/kvmagent-bench/libvirt-debs/RELEASE/KEY, keyed by the release,
  the package list and the test root's own key; BIND is where a test host
  has it (TestHost(bind_ro=[bind(RELEASE)])).
- install(th): installed offline with apt into a test host of that release's
  root (after tests.harness.install.install_on_release), configured as the
  test host needs (DROPIN, QEMU_CONF) and its daemons started by hand: the test host's
  policy-rc.d lets a package install start nothing.
- domain_xml(...): a domain equivalent to the kvmagent guest of
  tests.harness.install.guest_toml (nics=0): the same kernel, initrd and
  command line, memory, vCPUs, machine and CPU model, TCG.

What the test host needs of libvirt: no cgroup controllers (the
kernel's v1 controllers are read-only in the container: the first start
fails on them otherwise), so libvirt's per-guest cgroup setup is not in its
timings; libvirtd without `--timeout 120` (idle, it would exit, and the next
virsh call would pay its cold start); and /dev/kvm hidden from libvirtd and
its QEMUs.  This machine's nested /dev/kvm is broken and slow: with it
visible, libvirtd's capability probe and every domain it defines use it
(defining 1000 domains took about two hours instead of 2.3 s, and starts
took twice as long), which would flatter kvmagent.  Both sides run TCG.

Importable inside a test host as well (the inner scripts use domain_xml):
the harness is imported by the functions that need it."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

TYPE_CHECKING = False
if TYPE_CHECKING:
    from tests.harness import TestHost

# libvirt-daemon-system: libvirtd, virtlogd and their units, the libvirt-qemu
# user; libvirt-daemon-driver-qemu named too (a Depends of libvirt-daemon on
# Debian 12, only a Recommends on 13); libvirt-clients: virsh.
PACKAGES = ("libvirt-daemon-system", "libvirt-daemon-driver-qemu", "libvirt-clients")
DEBS_DIR = Path("/var/cache/kvmagent-bench/libvirt-debs")  # DEBS_DIR/RELEASE/KEY
MOUNT = "/mnt/libvirt-debs"  # where a test host has the repository
BOOT = "/var/lib/libvirt/boot"  # kernels libvirt's DAC driver lets QEMU read
DOMAINS = "/etc/libvirt/qemu"  # libvirtd reads the domains defined there when it starts
# The daemons, started by hand (Debian 13 has no virtlockd.socket: started if there).
UNITS = ("virtlogd.socket", "libvirtd.socket", "libvirtd-ro.socket", "libvirtd-admin.socket",
         "libvirtd.service")
OPTIONAL_UNITS = ("virtlockd.socket",)
DROPIN = ("/etc/systemd/system/libvirtd.service.d/50-bench.conf",
          "# kvmagent's benchmarks: this machine's nested /dev/kvm is broken and slow;\n"
          "# both managers run TCG.  No idle timeout while measuring.\n"
          "[Service]\nInaccessiblePaths=-/dev/kvm\nExecStart=\nExecStart=/usr/sbin/libvirtd\n")
QEMU_CONF = ("\n# kvmagent's benchmarks: the test host's v1 cgroup controllers are read-only\n"
             "cgroup_controllers = [ ]\n")
APT_LIST = f"deb [trusted=yes] file:/mnt/debs ./\ndeb [trusted=yes] file:{MOUNT} ./\n"


def key(release: str) -> str:
    from tests.harness import rootfs
    release = rootfs.resolve(release)
    h = hashlib.sha256()
    h.update(json.dumps([release, PACKAGES,
                         rootfs.cache_key(release, rootfs.apt_sources(release))]).encode())
    return h.hexdigest()[:16]


def debs(release: str) -> Path:
    """The release's offline repository of libvirt, downloaded on first use
    (as root, with the network): apt in a throwaway overlay of the release's
    cached test root, as tests.harness.clusterdebs does for the cluster."""
    from tests.harness import rootfs
    from tests.harness.sysutil import (nspawn_run, put_in_place, remove_unfinished,
                                       safe_rmtree)
    release = rootfs.resolve(release)
    k = key(release)
    repo = DEBS_DIR / release / k
    if (repo / "Packages").is_file():
        return repo
    root = rootfs.cached_root(release)
    repo.parent.mkdir(parents=True, exist_ok=True)
    tmp = repo.parent / f".build-{k}"
    safe_rmtree(tmp)
    try:
        (tmp / "partial").mkdir(parents=True)
        nspawn_run(root, ["sh", "-c", 'apt-get update -q && exec "$@"', "sh",
                          "apt-get", "install", "-y", "-q", "--no-install-recommends",
                          "--download-only", "-o", "Dir::Cache::archives=/mnt/debs/",
                          *PACKAGES],
                   binds=[f"--bind={tmp}:/mnt/debs"], volatile=True)
        (tmp / "partial").rmdir()
        rootfs.write_repo_index(tmp)
        put_in_place(tmp, repo, k)
    finally:
        remove_unfinished(tmp)
    for old in repo.parent.iterdir():  # other keys of the release: not needed again
        if old.name != k and not old.name.startswith("."):
            safe_rmtree(old)
    return repo


def bind(release: str) -> tuple[Path, str]:
    return debs(release), MOUNT


def install(th: TestHost) -> float:
    """Install libvirt into the test host (kvmagent's offline repository at
    /mnt/debs, libvirt's at MOUNT), configure it and start its daemons;
    the seconds apt took."""
    from tests.harness.install import APT_ENV, OFFLINE_APT
    th.write_file("/etc/apt/offline.list", APT_LIST)
    th.exec(["mkdir", "-p", "/var/tmp/offline-lists/partial"])
    th.run(["apt-get", *OFFLINE_APT, "update", "-q"])
    t0 = time.monotonic()
    th.run(["apt-get", *OFFLINE_APT, "install", "-y", "-q", "--no-install-recommends",
            *PACKAGES], env=APT_ENV, timeout=900)
    seconds = time.monotonic() - t0
    th.write_file(*DROPIN)
    conf = th.exec(["cat", "/etc/libvirt/qemu.conf"]).stdout
    th.write_file("/etc/libvirt/qemu.conf", conf + QEMU_CONF, 0o600)
    th.exec(["mkdir", "-p", BOOT])
    th.exec(["systemctl", "daemon-reload"])
    start(th)
    return seconds


def start(th: TestHost) -> None:
    """libvirt's daemons, (re)started by hand, so that they read the
    configuration as it is now (the package's install may have had them
    started by a connection to their sockets); returns once virsh is
    answered."""
    th.exec(["systemctl", "stop", *reversed(UNITS), *OPTIONAL_UNITS], check=False)
    th.exec(["systemctl", "reset-failed", "libvirtd.service", "libvirtd.socket"], check=False)
    for unit in OPTIONAL_UNITS:
        th.exec(["systemctl", "start", unit], check=False)
    th.exec(["systemctl", "start", *UNITS])
    deadline = time.monotonic() + 120
    while th.exec(["virsh", "version"], check=False).returncode != 0:
        if time.monotonic() > deadline:
            th.exec(["virsh", "version"])  # its error
        time.sleep(0.2)


def copy_guest(th: TestHost, kernel: Path, initrd: Path) -> tuple[str, str]:
    """The tiny guest's kernel and initrd (this machine's files) where
    libvirt's QEMU may read them (its DAC driver relabels what it boots: not
    the files kvmagent's guest uses); their paths in the test host."""
    inside = (f"{BOOT}/{kernel.name}", f"{BOOT}/{initrd.name}")
    th.copy_in(kernel, inside[0], 0o644)
    th.copy_in(initrd, inside[1], 0o644)
    return inside


def versions(th: TestHost) -> dict[str, str]:
    """The versions of libvirt and QEMU the test host runs (dpkg's)."""
    out = th.exec(["dpkg-query", "-W", "-f", "${Package} ${Version}\n",
                   "libvirt-daemon", "qemu-system-x86"]).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def domain_xml(name: str, kernel: str, initrd: str, cmdline: str, *, memory_mib: int = 256,
               cpus: int = 1, cpu_model: str = "Westmere", machine: str = "pc",
               serial_log: str | None = None) -> str:
    """A libvirt domain run as kvmagent runs its guest (kvmagent.render.qemu):
    TCG (type qemu), the kernel booted directly, ACPI, the CPU model as
    named (check='none': libvirt would refuse a model that TCG lacks a
    feature of; QEMU itself runs it as kvmagent's does), pvpanic (panic
    model isa), no USB, no balloon, no display; the serial console to
    SERIAL_LOG (a file), or to a pty.  No NIC: the kvmagent guest it is
    compared with has none."""
    def text(s: str | int) -> str:
        return escape(str(s))
    if serial_log is None:
        serial = "<serial type='pty'><target port='0'/></serial>"
    else:
        serial = (f"<serial type='file'><source path={quoteattr(serial_log)}/>"
                  "<target port='0'/></serial>")
    return f"""<domain type='qemu'>
  <name>{text(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>{cpus}</vcpu>
  <os>
    <type arch='x86_64' machine={quoteattr(machine)}>hvm</type>
    <kernel>{text(kernel)}</kernel>
    <initrd>{text(initrd)}</initrd>
    <cmdline>{text(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='custom' match='exact' check='none'><model fallback='forbid'>{text(cpu_model)}</model></cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='none'/>
    {serial}
    <memballoon model='none'/>
    <panic model='isa'/>
  </devices>
</domain>
"""
