"""The libvirt domain of the side-by-side benchmarks (bench/libvirt.py) is the
kvmagent guest it is compared with: the same kernel, initrd, command line,
memory, vCPUs, machine and CPU model, TCG; and the XML stays well formed
whatever the names hold."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from bench.libvirt import PACKAGES, domain_xml
from tests.guest.build import GuestImage
from tests.harness.install import guest_toml
from tests.unit.conftest import ConfDir

IMAGE = GuestImage(Path("/var/lib/guests/vmlinuz"), Path("/var/lib/guests/initrd.gz"), "6.1")


def test_domain_is_the_kvmagent_guest(conf: ConfDir) -> None:
    conf.write("guests/g.toml", guest_toml(IMAGE, nics=0))
    guest = conf.guest("g")
    assert guest.kernel is not None
    dom = ET.fromstring(domain_xml("g", str(guest.kernel.image), str(guest.kernel.initrd),
                                   guest.kernel.cmdline, memory_mib=guest.memory >> 20,
                                   cpus=guest.cpus, cpu_model=guest.cpu,
                                   machine=guest.machine))
    assert dom.get("type") == "qemu"  # TCG, as the kvmagent side runs (accel = "tcg")
    assert dom.findtext("name") == "g"
    assert (dom.findtext("memory"), dom.find("memory").get("unit")) == ("256", "MiB")  # type: ignore[union-attr]
    assert dom.findtext("vcpu") == "1"
    assert dom.find("os/type").get("machine") == "pc"  # type: ignore[union-attr]
    assert dom.findtext("os/kernel") == "/var/lib/guests/vmlinuz"
    assert dom.findtext("os/initrd") == "/var/lib/guests/initrd.gz"
    assert dom.findtext("os/cmdline") == guest.kernel.cmdline
    assert dom.findtext("cpu/model") == "Westmere"
    assert dom.find("features/acpi") is not None  # the power button of a graceful stop
    assert dom.find("devices/panic").get("model") == "isa"  # type: ignore[union-attr]
    assert dom.find("devices/interface") is None  # nics=0 on both sides
    assert dom.find("devices/memballoon").get("model") == "none"  # type: ignore[union-attr]


def test_serial_to_a_file_or_a_pty() -> None:
    dom = ET.fromstring(domain_xml("g", "/k", "/i", "", serial_log="/var/log/g.console"))
    assert dom.find("devices/serial").get("type") == "file"  # type: ignore[union-attr]
    assert dom.find("devices/serial/source").get("path") == "/var/log/g.console"  # type: ignore[union-attr]
    dom = ET.fromstring(domain_xml("g", "/k", "/i", ""))
    assert dom.find("devices/serial").get("type") == "pty"  # type: ignore[union-attr]


def test_text_is_escaped() -> None:
    dom = ET.fromstring(domain_xml("a&b", "/k<", "/i>", 'x="1" & y', serial_log="/l'\""))
    assert dom.findtext("name") == "a&b"
    assert dom.findtext("os/kernel") == "/k<"
    assert dom.findtext("os/cmdline") == 'x="1" & y'
    assert dom.find("devices/serial/source").get("path") == "/l'\""  # type: ignore[union-attr]


def test_packages_give_the_daemon_its_qemu_driver_and_virsh() -> None:
    assert {"libvirt-daemon-system", "libvirt-daemon-driver-qemu",
            "libvirt-clients"} <= set(PACKAGES)
