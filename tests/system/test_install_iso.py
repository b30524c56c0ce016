"""`kvmagent install NAME --iso FILE` on a real systemd host with the tiny
guest (TCG): an El Torito ISO is built here from the tiny guest's kernel and
initramfs with xorriso and Debian's isolinux, and the defined guest, which
boots that kernel directly, boots it from the CD-ROM instead, as the
transient kvm-oneoff@NAME.service.  The ISO lies in /var/tmp, which the
unit's PrivateTmp= would hide; the guest's file is byte-identical after.
On each release's own root (Debian 12 and 13: QEMU 7.2 and 10.0)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest.build import GuestImage
from tests.harness import TestHost
from tests.harness.install import copy_guest, define_guest, guest_toml, install_on_release
from tests.system.test_kvm_service import show, wait_for, wait_state
from tests.system.test_transient import leftovers

pytestmark = pytest.mark.system

ISOLINUX = Path("/usr/lib/ISOLINUX/isolinux.bin")  # Debian's isolinux
LDLINUX = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")  # syslinux-common
GUEST = "/etc/kvmagent/guests/inst.toml"


def build_iso(image: GuestImage, out: Path, append: str) -> Path:
    """A bootable El Torito ISO (isolinux, no emulation) of the tiny guest,
    its kernel command line APPEND (the tiny guest's init reads it)."""
    xorriso = shutil.which("xorriso", path="/usr/bin:/bin")
    missing = [str(p) for p in (ISOLINUX, LDLINUX) if not p.exists()]
    if xorriso is None or missing:
        pytest.fail(f"cannot build the install ISO: {'xorriso' if xorriso is None else ''} "
                    f"{' '.join(missing)} missing; run `make setup` (apt-get install xorriso "
                    "isolinux syslinux-common)", pytrace=False)
    tree = out.with_suffix(".tree")
    (tree / "isolinux").mkdir(parents=True)
    shutil.copyfile(image.kernel, tree / "vmlinuz")
    shutil.copyfile(image.initrd, tree / "initrd.gz")
    shutil.copyfile(ISOLINUX, tree / "isolinux" / "isolinux.bin")
    shutil.copyfile(LDLINUX, tree / "isolinux" / "ldlinux.c32")
    (tree / "isolinux" / "isolinux.cfg").write_text(
        "SERIAL 0 115200\nDEFAULT install\nPROMPT 0\nTIMEOUT 0\nLABEL install\n"
        f"  KERNEL /vmlinuz\n  APPEND initrd=/initrd.gz {append}\n")
    subprocess.run([xorriso, "-as", "mkisofs", "-quiet", "-o", str(out), "-V", "TINY_INSTALL",
                    "-b", "isolinux/isolinux.bin", "-c", "isolinux/boot.cat", "-no-emul-boot",
                    "-boot-load-size", "4", "-boot-info-table", str(tree)],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def host(debian_testhost: TestHost, image: GuestImage,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestHost]:
    testhost = debian_testhost
    install_on_release(testhost)
    work = tmp_path_factory.mktemp("install-iso")
    console = "console=ttyS0 quiet panic=-1"
    # the installer that powers the guest off when it is done; the one that waits
    testhost.copy_in(build_iso(image, work / "off.iso", f"{console} guest.shell=0 "
                               "guest.then=poweroff"), "/var/tmp/off.iso", 0o600)
    # the installer that reboots when it is done, as most do
    testhost.copy_in(build_iso(image, work / "reboot.iso", f"{console} guest.shell=0 "
                               "guest.then=reboot"), "/var/tmp/reboot.iso", 0o600)
    testhost.copy_in(build_iso(image, work / "wait.iso", console),
                     "/var/tmp/wait.iso", 0o600)
    # the guest boots its kernel directly, and has a disk (outside /var/lib/kvmagent)
    testhost.exec(["truncate", "-s", "16M", "/srv/inst.img"])
    define_guest(testhost, "inst", guest_toml(copy_guest(testhost, image), nics=0)
                 + '[[disk]]\npath = "/srv/inst.img"\n')
    testhost.exec(["systemctl", "daemon-reload"])  # the generator: ReadWritePaths for kvm@inst
    yield testhost
    testhost.exec(["systemctl", "stop", "kvm-oneoff@inst.service"], check=False)


def sha256(th: TestHost, path: str) -> str:
    return str(th.exec(["sha256sum", path]).stdout.split()[0])


def test_install_boots_the_iso_and_ends_when_the_guest_powers_off(host: TestHost) -> None:
    before = sha256(host, GUEST)
    t0 = time.monotonic()
    r = host.run(["kvmagent", "install", "inst", "--iso", "/var/tmp/off.iso", "--console"],
                 input="", timeout=180)
    started_and_attached = time.monotonic() - t0
    assert r.stdout.startswith("kvm-oneoff@inst.service: started\n"), (r.stdout, r.stderr)
    assert "ISOLINUX" in r.stdout  # the viewer's copy: the CD's boot loader on the serial line
    assert ("guest inst boots a kernel directly ([kernel] in /etc/kvmagent/guests/inst.toml); "
            "the install run boots from the CD-ROM instead (no -kernel)") in r.stderr
    s = wait_state(host, "kvm-oneoff@inst.service", ("inactive",), timeout=120)
    assert s["ActiveState"] == "inactive"
    journal = host.journal("kvm-oneoff@inst.service")
    # the CD's boot loader, and its kernel command line (guest.then=poweroff: the guest's
    # own [kernel] cmdline has none)
    for marker in ("ISOLINUX", "GUEST-INIT", "GUEST-READY", "GUEST-THEN poweroff", "GUEST-POWEROFF",
                   "guest inst: install run from /var/tmp/off.iso",
                   "guest inst powered off"):
        assert marker in journal, (marker, journal[-3000:])
    assert re.search(r"GUEST-READY ip=none disks=(sda|vda)\b", journal), journal[-3000:]
    # the end is recorded, as any run of the guest
    history = host.run(["kvmagent", "history", "inst"]).stdout
    assert re.search(r"stopped\s.*guest powered off", history), history
    assert sha256(host, GUEST) == before  # the guest's own file: untouched
    assert leftovers(host, "inst") == ""  # the transient unit is collected
    print(f"install run: started and attached in {started_and_attached:.1f} s")


def test_the_installers_reboot_ends_the_run_instead_of_booting_the_cd_again(
        host: TestHost) -> None:
    before = host.journal("kvm-oneoff@inst.service")
    offs = host.run(["kvmagent", "history", "inst"]).stdout.count("guest powered off")
    r = host.run(["kvmagent", "install", "inst", "--iso", "/var/tmp/reboot.iso"], timeout=60)
    assert r.returncode == 0, r.stderr
    wait_state(host, "kvm-oneoff@inst.service", ("inactive",), timeout=120)
    journal = host.journal("kvm-oneoff@inst.service")[len(before):]
    for marker in ("GUEST-THEN reboot", "GUEST-REBOOT",
                   "guest inst powered off at its reboot (on_reboot = stop)"):
        assert marker in journal, (marker, journal[-3000:])
    assert journal.count("GUEST-INIT") == 1, journal[-3000:]  # booted once, not twice
    history = host.run(["kvmagent", "history", "inst"]).stdout
    assert history.count("guest powered off") == offs + 1, history
    assert leftovers(host, "inst") == ""


def test_a_running_install_is_visible_and_refuses_a_second_run(host: TestHost) -> None:
    r = host.run(["kvmagent", "install", "inst", "--iso", "/var/tmp/wait.iso", "--vnc",
                  "127.0.0.1:7"], timeout=180)
    assert r.stdout.startswith("kvm-oneoff@inst.service: started\ninst: VNC display "
                               "127.0.0.1:7\n"), (r.stdout, r.stderr)
    units = host.exec(["systemctl", "list-units", "--no-legend", "--plain",
                       "kvm-oneoff@*"]).stdout
    assert re.search(r"^kvm-oneoff@inst\.service\s+loaded\s+active\s+running\s+KVM guest inst "
                     r"\(install from /var/tmp/wait\.iso\)", units, re.M), units
    assert re.search(r"^inst\s+running\s", host.run(["kvmagent", "list"]).stdout, re.M)
    assert "kvm-oneoff@inst.service" in host.run(["kvmagent", "status", "inst"]).stdout
    s = show(host, "kvm-oneoff@inst.service", "BindReadOnlyPaths", "ExecStart",
             "RestrictAddressFamilies")
    assert s["BindReadOnlyPaths"] == "/var/tmp/wait.iso:/var/tmp/wait.iso:rbind"
    assert "run --install /var/tmp/wait.iso --vnc 127.0.0.1:7 inst" in s["ExecStart"]
    # VNC on TCP: the install unit allows QEMU its IP sockets
    probe = ("import socket; s = socket.create_connection(('127.0.0.1', 5907), 10); "
             "print(s.recv(12).decode())")
    assert host.exec(["python3", "-c", probe]).stdout.startswith("RFB 003.008")
    wait_for(host, "kvm-oneoff@inst.service", r"GUEST-READY")

    # one run of a guest at a time; nothing else is started
    r = host.run(["kvmagent", "install", "inst", "--iso", "/var/tmp/off.iso"], check=False)
    assert r.returncode == 1 and r.stdout == ""
    assert ("guest inst is already running as a one-off guest or an install run "
            "(kvm-oneoff@inst.service)") in r.stderr
    r = host.run(["kvmagent", "start", "inst"], check=False)
    assert r.returncode == 1 and "already running as a one-off guest" in r.stderr
    assert show(host, "kvm@inst.service", "ActiveState")["ActiveState"] == "inactive"

    r = host.run(["kvmagent", "stop", "inst"], timeout=120)  # the admin ends it
    assert r.stdout == "kvm-oneoff@inst.service: stopped\n"
    assert leftovers(host, "inst") == ""
    assert "stopped by admin" in host.run(["kvmagent", "history", "inst"]).stdout


def test_bad_input_starts_nothing(host: TestHost) -> None:
    host.exec(["mkdir", "-p", "/var/tmp/isodir"])
    for args, status, text in [
            (["nope", "--iso", "/var/tmp/off.iso"], 8, "unknown guest 'nope'"),
            (["inst", "--iso", "/var/tmp/none.iso"], 5, "--iso /var/tmp/none.iso: no such file"),
            (["inst", "--iso", "/var/tmp/isodir"], 5, "not a file"),
            (["inst", "--iso", "/var/tmp/off.iso", "--console", "--vnc", "127.0.0.1:1"], 2,
             "not allowed with argument --console")]:
        r = host.run(["kvmagent", "install", *args], check=False)
        assert (r.returncode, r.stdout) == (status, ""), (args, r.stderr)
        assert text in r.stderr, (args, r.stderr)
        assert leftovers(host, "inst") == "" and leftovers(host, "nope") == ""

