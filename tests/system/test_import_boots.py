"""An imported guest boots as kvm@NAME (#19): a start script in the seed's
style (tests/data/import/kvm-scripts) — a virtio disk image in /srv, the
tiny guest's kernel, the serial console on a unix socket, a NIC on the tap
that the seed's ifup script puts on br-kvm — is imported with --write on
the test host, and after a daemon-reload the guest boots as kvm@NAME.service
and pings the bridge.  Its image lies outside /var/lib/kvmagent, so
kvmagent-generator's ReadWritePaths= drop-in is what lets the supervisor
open it read-write; the rest of /srv stays read-only in the service."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.harness import TestHost
from tests.harness.install import install_checkout
from tests.system.test_kvm_service import show, wait_for, wait_state

pytestmark = pytest.mark.system

SCRIPT = """#!/bin/bash
KDIR={kdir}
NAME=tiny
kvm -smp 1 \\
-drive if=virtio,file=/srv/kvm/${{NAME}}.img,boot=on \\
-m 256 \\
-nographic \\
-daemonize \\
-name ${{NAME}} \\
-kernel ${{KDIR}}/{kernel} \\
-initrd ${{KDIR}}/{initrd} \\
-append "console=ttyS0 quiet panic=-1 guest.ip=10.78.0.2/24 guest.ping=10.78.0.1" \\
-serial mon:unix:/etc/kvm/consoles/${{NAME}}.sock,server,nowait \\
-net nic,macaddr=00:1A:4A:00:8E:77,model=virtio \\
-net tap,script=/etc/kvm/kvm-ifup-local
"""
IFUP = """#!/bin/sh
switch=br-kvm
/sbin/ip link set $1 up
/usr/sbin/brctl addif ${switch} $1
exit 0
"""


@pytest.fixture(scope="module")
def host(testhost: TestHost, image) -> Iterator[TestHost]:  # type: ignore[no-untyped-def]
    install_checkout(testhost)
    testhost.run(["kvmagent", "bridge", "ensure", "br-kvm", "--address", "10.78.0.1/24"])
    yield testhost
    testhost.exec(["systemctl", "stop", "kvm@tiny"], check=False, timeout=120)


def test_an_imported_script_boots_as_kvm_at_name(host: TestHost, image) -> None:  # type: ignore[no-untyped-def]
    assert image.kernel.parent == image.initrd.parent
    host.write_file("/root/kvm-tiny.bash", SCRIPT.format(
        kdir=image.kernel.parent, kernel=image.kernel.name, initrd=image.initrd.name), 0o755)
    host.write_file("/etc/kvm/kvm-ifup-local", IFUP, 0o755)
    host.exec(["mkdir", "-p", "/srv/kvm"])
    host.exec(["truncate", "-s", "16M", "/srv/kvm/tiny.img", "/srv/kvm/other.img"])
    r = host.exec(["kvmagent", "import", "kvm-script", "/root/kvm-tiny.bash", "--write"])
    assert "wrote /etc/kvmagent/guests/tiny.toml" in r.stderr, r.stderr
    toml = host.exec(["cat", "/etc/kvmagent/guests/tiny.toml"]).stdout
    assert 'bridge = "br-kvm"' in toml and 'mac = "00:1a:4a:00:8e:77"' in toml, toml
    # a second import may not take the MAC (or the disk) of the guest now defined
    r = host.exec(["kvmagent", "import", "kvm-script", "/root/kvm-tiny.bash", "--name", "tiny2",
                   "--write"], check=False)
    assert r.returncode == 6 and "is also a MAC of guest tiny" in r.stderr, r.stderr
    assert host.exec(["test", "-e", "/etc/kvmagent/guests/tiny2.toml"],
                     check=False).returncode == 1

    host.exec(["systemctl", "daemon-reload"])  # the generator's drop-in for /srv/kvm/tiny.img
    dropin = host.exec(["cat", "/run/systemd/generator/kvm@tiny.service.d/"
                        "50-kvmagent-images.conf"]).stdout
    assert dropin.splitlines()[-1] == "ReadWritePaths=-/srv/kvm/tiny.img", dropin
    host.exec(["systemctl", "start", "kvm@tiny"], timeout=180)
    s = wait_state(host, "kvm@tiny.service", ("active",))
    journal = wait_for(host, "kvm@tiny.service", r"GUEST-PING-OK 10\.78\.0\.1", timeout=240)
    assert "disks=vda" in journal, journal[-3000:]
    ports = host.run(["kvmagent", "bridge", "show"]).stdout
    assert re.search(r"kvm-tiny-0\s+guest tiny", ports), ports
    argv = host.run(["kvmagent", "show", "tiny"]).stdout
    assert "mac=00:1a:4a:00:8e:77" in argv, argv

    # in the service: its image writable, the rest of /srv not
    in_unit = ["nsenter", "-t", s["MainPID"], "-m", "--"]
    assert host.exec([*in_unit, "sh", "-c", ": >> /srv/kvm/tiny.img"],
                     check=False).returncode == 0
    r = host.exec([*in_unit, "sh", "-c", ": >> /srv/kvm/other.img"], check=False)
    assert r.returncode != 0 and "Read-only file system" in r.stderr, r.stderr
    assert show(host, "kvm@tiny.service", "ReadWritePaths")["ReadWritePaths"] == \
        "-/srv/kvm/tiny.img"

    host.exec(["systemctl", "stop", "kvm@tiny"], timeout=120)
    assert show(host, "kvm@tiny.service", "Result")["Result"] == "success"
