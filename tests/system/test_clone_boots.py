"""`kvmagent clone` and `kvmagent kernel --from-host` on the test host (#19).

A template guest (its image file read-only, root's, mode 0600) runs; it is
cloned while it runs: the clone's disk is a qcow2 overlay beside it, whose
backing file QEMU (the unprivileged kvmagent-qemu) gets as a file
descriptor from the supervisor — it could not open root's image by the
path in the overlay.  The clone boots beside its source with its own MAC
and tap, and both ping the bridge.  Then the clone gets a copy of a host
kernel (the tiny guest's kernel installed as /boot/vmlinuz-VERSION on the
throwaway test host: this machine's /boot has none) and boots it.  The
supervisor's freeze/thaw (the pause that LVM snapshots of a running guest
take) is asked over the control channel, and a freeze that nobody thaws
ends by itself.  LVM volumes are not cloned here: this machine's kernel has
no device-mapper (see README's Tests).  On each release's own root (Debian 12
and 13)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from tests.harness import TestHost
from tests.guest.build import GuestImage
from tests.harness.install import copy_guest, install_on_release
from tests.system.test_kvm_service import wait_for, wait_state

pytestmark = pytest.mark.system

BRIDGE = "br-clone"
TEMPLATE = """\
cpus = 1
memory = "256M"
[kernel]
image = "{kernel}"
initrd = "{initrd}"
cmdline = "console=ttyS0 quiet panic=-1 guest.ip=10.77.9.2/24 guest.ping=10.77.9.1"
[[disk]]
path = "/srv/kvm/tpl.img"
readonly = true
[[nic]]
bridge = "{bridge}"
mac = "00:1a:4a:00:77:02"
"""
CHANNEL = ("import sys; sys.path.insert(0, '/src/kvmagent'); import json; "
           "from pathlib import Path; from kvmagent.unit import channel; "
           "print(json.dumps(channel.ask(Path('/run/kvmagent/{name}/control.sock'), {args})))")


@pytest.fixture(scope="module")
def host(debian_testhost: TestHost) -> Iterator[TestHost]:
    testhost = debian_testhost
    install_on_release(testhost)
    testhost.run(["kvmagent", "bridge", "ensure", BRIDGE, "--address", "10.77.9.1/24"])
    yield testhost
    for name in ("tpl2", "tpl"):
        testhost.exec(["systemctl", "stop", f"kvm@{name}"], check=False, timeout=120)


@pytest.fixture(scope="module")
def tiny(host: TestHost, image: GuestImage) -> GuestImage:
    """The tiny guest's kernel and initrd inside the test host."""
    return copy_guest(host, image)


def ask(host: TestHost, name: str, args: str) -> str:
    return host.exec(["/usr/bin/python3", "-c", CHANNEL.format(name=name, args=args)]).stdout


def test_a_clone_boots_beside_its_running_source(host: TestHost, tiny: GuestImage) -> None:
    host.exec(["mkdir", "-p", "/srv/kvm"])
    host.exec(["truncate", "-s", "16M", "/srv/kvm/tpl.img"])
    host.exec(["chmod", "600", "/srv/kvm/tpl.img"])
    host.write_file("/etc/kvmagent/guests/tpl.toml", TEMPLATE.format(
        kernel=tiny.kernel, initrd=tiny.initrd, bridge=BRIDGE))
    host.exec(["systemctl", "daemon-reload"])
    host.exec(["systemctl", "start", "kvm@tpl"], timeout=180)
    wait_for(host, "kvm@tpl.service", r"GUEST-PING-OK 10\.77\.9\.1", timeout=240)

    t0 = time.monotonic()
    r = host.exec(["kvmagent", "clone", "tpl", "tpl2"])
    took = time.monotonic() - t0
    assert "tpl2: disk[0] /srv/kvm/tpl2.qcow2: qcow2 overlay on /srv/kvm/tpl.img" in r.stdout, r
    assert "wrote /etc/kvmagent/guests/tpl2.toml" in r.stderr, r.stderr
    info = host.exec(["qemu-img", "info", "-U", "/srv/kvm/tpl2.qcow2"]).stdout
    assert "backing file: /srv/kvm/tpl.img" in info and "backing file format: raw" in info, info
    toml = host.exec(["cat", "/etc/kvmagent/guests/tpl2.toml"]).stdout
    assert "mac =" not in toml and "uuid =" not in toml, toml
    # the clone's own address, in a drop-in of the admin's
    host.write_file("/etc/kvmagent/guests/tpl2.toml.d/ip.toml", '[kernel]\ncmdline = "console='
                    'ttyS0 quiet panic=-1 guest.ip=10.77.9.3/24 guest.ping=10.77.9.1"\n')
    # bad input: nothing made, the documented statuses
    for argv, status, text in ((["nosuch", "x"], 8, "unknown guest 'nosuch'"),
                               (["tpl", "tpl2"], 6, "tpl2.toml: exists"),
                               (["tpl", "Bad_Name"], 2, "invalid guest name"),
                               (["tpl", "x", "--snapshot", "1G"], 2, "is for LVM volumes")):
        r = host.exec(["kvmagent", "clone", *argv], check=False)
        assert r.returncode == status and text in r.stderr, (argv, r)
    assert host.exec(["ls", "/srv/kvm"]).stdout.split() == ["tpl.img", "tpl2.qcow2"]

    host.exec(["systemctl", "daemon-reload"])  # the generator: the overlay is writable
    host.exec(["systemctl", "start", "kvm@tpl2"], timeout=180)
    journal = wait_for(host, "kvm@tpl2.service", r"GUEST-PING-OK 10\.77\.9\.1", timeout=240)
    assert "disks=vda" in journal, journal[-3000:]
    for name in ("tpl", "tpl2"):
        assert wait_state(host, f"kvm@{name}.service", ("active",))["SubState"] == "running"
    ports = host.run(["kvmagent", "bridge", "show"]).stdout
    assert re.search(r"kvm-tpl-0\s+guest tpl\s", ports) and re.search(
        r"kvm-tpl2-0\s+guest tpl2\s", ports), ports
    macs = re.findall(r"mac=([0-9a-f:]+)", host.exec(["ps", "-eo", "args"]).stdout)
    assert "00:1a:4a:00:77:02" in macs and len(set(macs)) == 2, macs
    args = host.exec(["ps", "-C", "qemu-system-x86_64", "-o", "user:20=,args="]).stdout
    line = next(a for a in args.splitlines() if "guest=tpl2," in a)
    assert line.startswith("kvmagent-qemu") and "backing.file.filename=/dev/fdset/101" in line
    print(f"clone of a running template: {took:.2f} s")


def test_freeze_and_thaw_over_the_control_channel(host: TestHost) -> None:
    assert '"seconds": 5.0' in ask(host, "tpl", "'freeze', seconds=5")
    assert '"resumed": true' in ask(host, "tpl", "'thaw'")
    # a freeze nobody thaws ends by itself at its limit
    assert '"seconds": 1.0' in ask(host, "tpl", "'freeze', seconds=1")
    time.sleep(2.5)
    assert '"resumed": false' in ask(host, "tpl", "'thaw'")
    journal = host.journal("kvm@tpl.service")
    assert "guest tpl resumed: the snapshot is taken" in journal, journal[-2000:]
    assert "guest tpl resumed: its time for the snapshot is up" in journal, journal[-2000:]
    r = host.exec(["/usr/bin/python3", "-c", CHANNEL.format(name="tpl", args="'freeze'")],
                  check=False)
    assert r.returncode != 0 and "freeze needs seconds" in r.stderr, r


def test_kernel_from_host_boots_the_clone(host: TestHost, tiny: GuestImage) -> None:
    version = "6.1.0-99-kvmagenttest"
    host.exec(["cp", str(tiny.kernel), f"/boot/vmlinuz-{version}"])
    host.exec(["cp", str(tiny.initrd), f"/boot/initrd.img-{version}"])
    r = host.exec(["kvmagent", "kernel", "tpl2", "--from-host", "5.10.0-nosuch"], check=False)
    assert r.returncode == 5 and "'5.10.0-nosuch' is not installed" in r.stderr, r
    # no VERSION: the running kernel (not installed in this test host) or the newest
    r = host.exec(["kvmagent", "kernel", "tpl2", "--from-host"])
    assert f"/boot/kvm/tpl2/vmlinuz (kernel {version})" in r.stdout, r
    modes = host.exec(["stat", "-c", "%a %n", "/boot/kvm/tpl2/vmlinuz",
                       "/boot/kvm/tpl2/initrd.img"]).stdout.split()
    assert modes[::2] == ["644", "644"], modes
    dropin = host.exec(["cat", "/etc/kvmagent/guests/tpl2.toml.d/kernel.toml"]).stdout
    assert 'image = "/boot/kvm/tpl2/vmlinuz"' in dropin, dropin
    show = host.exec(["kvmagent", "show", "tpl2"]).stdout
    assert "-kernel /boot/kvm/tpl2/vmlinuz" in show, show
    pings = host.journal("kvm@tpl2.service").count("GUEST-PING-OK")
    host.exec(["systemctl", "restart", "kvm@tpl2"], timeout=180)
    deadline = time.monotonic() + 240
    while host.journal("kvm@tpl2.service").count("GUEST-PING-OK") == pings:
        assert time.monotonic() < deadline, host.journal("kvm@tpl2.service")[-3000:]
        time.sleep(1)
    args = host.exec(["ps", "-C", "qemu-system-x86_64", "-o", "args="]).stdout
    assert "-kernel /boot/kvm/tpl2/vmlinuz" in args, args
