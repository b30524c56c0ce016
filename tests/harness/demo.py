"""The README's main job: guest `demo` as kvm@demo.service in a throwaway
systemd host, its serial console in the journal.

    /usr/bin/python3 -m tests.harness demo [--release bookworm|trixie] [--keep]

Builds the Debian package from this tree in a clean build root of the
release, boots a test host of that release (systemd-nspawn, private
network), installs the package with apt, creates br-kvm, defines the tiny test guest as `demo`, then
shows what an admin would look at: systemctl status, machinectl list, the
bridge and its tap, journalctl -u kvm@demo (the guest's console), and a
graceful `systemctl stop`.  --keep leaves the host up until Ctrl-C."""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from pathlib import Path

from tests.guest.build import find_guest
from tests.harness import rootfs
from tests.harness.install import (REPO, build_deb, copy_guest, define_guest, guest_toml,
                                   install_package)
from tests.harness.testhost import TestHost


def _say(text: str) -> None:
    print(f"\n\033[1m{text}\033[0m" if sys.stdout.isatty() else f"\n{text}", flush=True)


def _show(th: TestHost, argv: list[str], unit: bool = False) -> str:
    print(f"\n# {' '.join(argv)}", flush=True)
    done = th.run(argv, check=False) if unit else th.exec(argv, check=False)
    print((done.stdout + done.stderr).rstrip(), flush=True)
    return str(done.stdout)


def _wait_journal(th: TestHost, marker: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker in th.journal("kvm@demo.service"):
            return True
        time.sleep(0.5)
    return False


def demo(release: str = "bookworm", keep: bool = False) -> int:
    image = find_guest()
    version = rootfs.RELEASES[release]
    _say(f"== the Debian package, built from this tree in a clean Debian {version} build root")
    work = Path(tempfile.mkdtemp(prefix="kvmagent-demo-"))
    deb = build_deb(work, release=release)
    print(deb.name)
    _say(f"== a throwaway Debian {version} ({release}) systemd host "
         "(systemd-nspawn, systemd as PID 1, private network)")
    with TestHost(root=release, name="kvmagent-demo", src=REPO,
                  bind_ro=[(rootfs.cached_debs(release), "/mnt/debs")]) as th:
        print(f"booted {th.name} in {th.boot_seconds[-1]:.1f} s; enter it with: "
              f"nsenter -t {th.leader} -a /bin/bash")
        _show(th, ["systemctl", "--version"])
        install_package(th, deb)
        image = copy_guest(th, image)
        _show(th, ["dpkg-query", "-W", "kvmagent"])
        _say("== a bridge for the guest, over netlink")
        _show(th, ["kvmagent", "bridge", "ensure", "br-kvm", "--address", "10.77.0.1/24"],
              unit=True)
        define_guest(th, "demo", guest_toml(
            image, cmdline="guest.ip=10.77.0.2/24 guest.ping=10.77.0.1",
            description="kvmagent demo guest"))
        _say("== the guest definition, and the command line kvmagent makes of it")
        _show(th, ["cat", "/etc/kvmagent/guests/demo.toml"])
        _show(th, ["kvmagent", "show", "demo"], unit=True)
        _say("== systemctl start kvm@demo")
        t0 = time.monotonic()
        _show(th, ["systemctl", "start", "kvm@demo"])
        print(f"(returned after {time.monotonic() - t0:.2f} s; QEMU runs under TCG here)")
        booted = _wait_journal(th, "GUEST-PING-OK", 120)
        _show(th, ["systemctl", "status", "--no-pager", "--lines=0", "kvm@demo"])
        _show(th, ["systemctl", "status", "--no-pager", "--lines=0", "kvm-demo.scope"])
        _show(th, ["machinectl", "list"])
        _show(th, ["kvmagent", "bridge", "show"], unit=True)
        _say("== the guest's serial console, in its unit's journal")
        _show(th, ["journalctl", "--no-pager", "-o", "short", "-u", "kvm@demo"])
        if keep:
            print(f"\nkvm@demo is running; enter the host with: nsenter -t {th.leader} -a "
                  "/bin/bash\nCtrl-C stops the guest and the host.", flush=True)
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass
        _say("== systemctl stop kvm@demo: the ACPI power button, a clean poweroff")
        _show(th, ["systemctl", "stop", "kvm@demo"])
        _show(th, ["journalctl", "--no-pager", "-o", "short", "-u", "kvm@demo", "-n", "8"])
        state = th.exec(["systemctl", "is-active", "kvm@demo"], check=False).stdout.strip()
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    _say(f"== done: the guest {'booted and pinged its bridge' if booted else 'DID NOT BOOT'}, "
         f"kvm@demo is {state}; the test host is gone")
    return 0 if booted and state == "inactive" else 1
