"""The tiny test guest boots under real QEMU (TCG) and behaves as guest.md says.

The image comes from the cache only (tests/guest/build.py, run by
`make setup`); these tests never build or download anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest.build import GuestBuildError, GuestImage, find_guest
from tests.guest.qemu_helpers import QEMU, Guest, boot, qemu_available

pytestmark = pytest.mark.qemu

BOOT_TIMEOUT = 90.0  # TCG; about 5-7 s on an idle 2-CPU host
BRIDGE_ADDR = "10.77.0.1"
GUEST_ADDR = "10.77.0.2/24"
GUEST_MAC = "52:54:00:12:34:56"


@pytest.fixture(scope="module")
def image() -> GuestImage:
    if not qemu_available():
        pytest.skip(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    try:
        return find_guest()
    except GuestBuildError as e:
        pytest.skip(str(e))


@pytest.fixture
def rundir() -> Iterator[Path]:
    # Short: unix socket paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="kvmagent-guest-") as directory:
        yield Path(directory)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def netns(request: pytest.FixtureRequest) -> str:
    """A private netns with br-kvm (10.77.0.1/24) and tap-kvm0 enslaved."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a network namespace")
    name = f"kvmagent-guest-{uuid.uuid4().hex[:8]}"
    _ip("netns", "add", name)
    request.addfinalizer(lambda: _ip("netns", "del", name))  # takes bridge and tap along
    _ip("-n", name, "link", "set", "lo", "up")
    _ip("-n", name, "link", "add", "br-kvm", "type", "bridge")
    _ip("-n", name, "addr", "add", f"{BRIDGE_ADDR}/24", "dev", "br-kvm")
    _ip("-n", name, "link", "set", "br-kvm", "up")
    _ip("-n", name, "tuntap", "add", "dev", "tap-kvm0", "mode", "tap", "user", "0", "group", "0")
    _ip("-n", name, "link", "set", "tap-kvm0", "master", "br-kvm")
    _ip("-n", name, "link", "set", "tap-kvm0", "up")
    return name


def _power_off(guest: Guest, typed: bool = False) -> None:
    """Power button (or `poweroff` typed in the shell) until GUEST-POWEROFF;
    QEMU exits 0 with SHUTDOWN reason guest-shutdown."""
    if typed:
        guest.console.send("poweroff\n")
        guest.console.read_until("GUEST-POWEROFF", 30)
    else:
        guest.powerdown(timeout=60.0)
    assert guest.wait_exit(30) == 0, guest.stderr()
    guest.qmp.poll_events(2.0)  # read the rest, up to EOF
    shutdowns = [e for e in guest.qmp.events if e["event"] == "SHUTDOWN"]
    assert [e["data"] for e in shutdowns] == [{"guest": True, "reason": "guest-shutdown"}]


def test_boot_shell_and_power_button(image: GuestImage, rundir: Path) -> None:
    with boot(image, rundir) as guest:
        init = guest.console.read_until(r"GUEST-INIT kernel=(\S+) smp=(\d+)\n", BOOT_TIMEOUT)
        assert init.groups() == (image.kernel_version, "1")
        ready = guest.console.read_until(r"GUEST-READY ip=(\S+) disks=(\S+)\n", BOOT_TIMEOUT)
        print(f"QEMU start to GUEST-READY: {time.monotonic() - guest.started:.2f} s")
        assert ready.groups() == ("none", "none")

        guest.console.read_until("guest# ", 30)
        guest.console.send("echo HELLO-$((6*7))\n")
        guest.console.read_until(r"\nHELLO-42\n", 30)  # the tty echo shows $((6*7))

        guest.console.read_until("guest# ", 30)
        _power_off(guest)
        assert "GUEST-POWERBUTTON" in guest.console.text


@pytest.mark.net
def test_guest_pings_the_bridge_in_a_netns(image: GuestImage, rundir: Path, netns: str) -> None:
    nic = ["-netdev", "tap,id=n0,ifname=tap-kvm0,script=no,downscript=no",
           "-device", f"virtio-net-pci,netdev=n0,mac={GUEST_MAC}"]
    append = f"guest.ip={GUEST_ADDR} guest.gw={BRIDGE_ADDR} guest.ping={BRIDGE_ADDR}"
    with boot(image, rundir, append=append, extra=nic, netns=netns) as guest:
        guest.console.read_until(rf"GUEST-READY ip={GUEST_ADDR} ", BOOT_TIMEOUT)
        result = guest.console.read_until(rf"GUEST-PING-(OK|FAIL) {BRIDGE_ADDR} ", 30)
        assert result.group(1) == "OK", guest.console.text
        neighbours = subprocess.run(["ip", "-n", netns, "neigh", "show", "dev", "br-kvm"],
                                    check=True, capture_output=True, text=True).stdout
        assert GUEST_MAC in neighbours

        guest.console.read_until("guest# ", 30)
        _power_off(guest, typed=True)  # poweroff without -f takes the clean path too
        assert "GUEST-POWERBUTTON" not in guest.console.text
