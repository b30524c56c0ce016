"""bench/virsh_migrate.py's pure parts: the domain moved beside kvmagent's
guest in bench_migrate.py is that guest (disk, NIC, console), one UUID on
both hosts; virsh's commands; `virsh domjobinfo --completed` read, a 0/0
reading refused; kvmagent's --json events read; the summary's medians,
ranges and ratios."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from bench.virsh_migrate import (CONSOLE_LOG, DOMAIN, UUID, Sample, Timed, breakdown,
                                 domain_xml, kvmagent_sample, migrate_argv, parse_domjobinfo,
                                 summary)
from tests.guest.build import GuestImage
from tests.harness.install import guest_toml
from tests.unit.conftest import ConfDir

IMAGE = GuestImage(Path("/srv/shared/vmlinuz"), Path("/srv/shared/initrd.gz"), "6.1")

# libvirt 9.0's virsh, after a live migration (the source's copy)
DOMJOBINFO = """\
Job type:         Completed
Operation:        Outgoing migration
Time elapsed:     1153         ms
Time elapsed w/o network: 1151         ms
Data processed:   2.016 MiB
Data remaining:   0.000 B
Data total:       264.258 MiB
Memory processed: 2.016 MiB
Memory bandwidth: 33.610 MiB/s
Dirty rate:       0            pages/s
Page size:        4096         bytes
Iteration:        3
Postcopy requests: 0
Constant pages:   65638
Normal pages:     490
Normal data:      1.914 MiB
Total downtime:   16           ms
Downtime w/o network: 14           ms
Setup time:       12           ms

"""


def test_domain_is_the_migrated_guest(conf: ConfDir) -> None:
    conf.write("guests/bench.toml", guest_toml(
        IMAGE, cmdline="guest.ip=10.77.0.2/24",
        extra='[[disk]]\npath = "/srv/shared/bench.img"\n'))
    guest = conf.guest("bench")
    assert guest.kernel is not None
    dom = ET.fromstring(domain_xml("/var/lib/libvirt/boot/vmlinuz",
                                   "/var/lib/libvirt/boot/initrd.gz",
                                   "/srv/shared/bench-lv.img", "console=ttyS0 guest.ip=x"))
    assert dom.findtext("name") == DOMAIN and dom.findtext("uuid") == UUID
    assert dom.findtext("memory") == str(guest.memory >> 20)
    assert dom.findtext("vcpu") == str(guest.cpus)
    [disk] = dom.findall("devices/disk")
    assert disk.find("source").get("file") == "/srv/shared/bench-lv.img"  # type: ignore[union-attr]
    assert disk.find("target").get("bus") == guest.disks[0].bus.value == "virtio"  # type: ignore[union-attr]
    # kvmagent's cache = "auto" is none where O_DIRECT works (the bench's ext4)
    driver = disk.find("driver")
    assert driver is not None
    assert (driver.get("type"), driver.get("cache"), driver.get("io")) == ("raw", "none", "native")
    [nic] = dom.findall("devices/interface")
    assert nic.get("type") == "bridge"
    assert nic.find("source").get("bridge") == "br-kvm"  # type: ignore[union-attr]
    assert nic.find("model").get("type") == guest.nics[0].model.value == "virtio"  # type: ignore[union-attr]
    serial = dom.find("devices/serial")
    assert serial is not None and serial.get("type") == "pty"  # the pings are typed into it
    assert serial.find("log").get("file") == CONSOLE_LOG  # type: ignore[union-attr]


def test_migrate_commands() -> None:
    assert migrate_argv("tcp", "host1", "10.79.20.2") == [
        "virsh", "migrate", "--live", "--unsafe", DOMAIN, "qemu+ssh://host1/system",
        "--migrateuri", "tcp://10.79.20.2"]
    assert migrate_argv("tunnelled", "host0", "10.79.20.1") == [
        "virsh", "migrate", "--live", "--unsafe", "--p2p", "--tunnelled", DOMAIN,
        "qemu+ssh://host0/system"]
    with pytest.raises(ValueError):
        migrate_argv("rdma", "host1", "10.79.20.2")


def test_domjobinfo() -> None:
    assert parse_domjobinfo(DOMJOBINFO) == (16, 1153)  # not the "w/o network" lines


@pytest.mark.parametrize("text", [
    "",
    "Job type:         None\n",
    DOMJOBINFO.replace("Total downtime:", "Downtime:"),
    "Job type: Completed\nTime elapsed:     0  ms\nTotal downtime:   0   ms\n",
])
def test_domjobinfo_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_domjobinfo(text)


def run_of(*events: tuple[float, dict[str, object]], wall: float = 2.2) -> Timed:
    return Timed(wall, 0, [(t, json.dumps(e)) for t, e in events], "")


def test_kvmagent_events() -> None:
    run = run_of((1.10, {"event": "started", "host": "host1"}),
                 (1.20, {"event": "progress", "status": "active"}),
                 (1.90, {"event": "progress", "status": "completed"}),
                 (2.00, {"event": "progress", "status": "completed"}),
                 (2.15, {"event": "migrated", "downtime_ms": 24, "qemu_total_ms": 780,
                         "total_seconds": 1.1}))
    sample, events = kvmagent_sample(run)
    assert sample == Sample(24, 780, 2.2) and sample.paused == 24
    paused = run_of((2.15, {"event": "migrated", "downtime_ms": 24, "paused_ms": 61,
                            "qemu_total_ms": 780, "total_seconds": 1.1}))
    assert kvmagent_sample(paused)[0] == Sample(24, 780, 2.2, 61)
    assert events == {"started": 1.10, "progress": 1.20, "completed": 1.90, "migrated": 2.15}
    with pytest.raises(ValueError):  # a move that did not end so is no sample
        kvmagent_sample(run_of((1.1, {"event": "cancelled"})))


def test_summary() -> None:
    ssh = [Sample(24, 700, 2.0), Sample(30, 800, 2.4), Sample(20, 750, 2.2)]
    text = summary({"kvmagent ssh": ssh, "kvmagent tcp": [],
                    "tcp": [Sample(12, 600, 1.0), Sample(10, 500, 1.2)],
                    "tunnelled": [Sample(48, 900, 1.1)]})
    lines = text.splitlines()
    assert len(lines) == 6  # header, rule, 3 rows (none without samples), the note
    assert "| 3 " in lines[2] and "24 (20–30)" in lines[2] and "2.20 (2.00–2.40)" in lines[2]
    assert "11 (10–12)" in lines[3] and "1.10 (1.00–1.20)" in lines[3]
    # no kvmagent tcp: virsh's tcp against kvmagent's ssh, 24/11 downtime, 2.2/1.1 command
    assert "2.18×" in lines[3] and "2.00×" in lines[3]
    assert "0.50×" in lines[4] and "2.00×" in lines[4]  # 24/48, 2.2/1.1
    text = summary({"kvmagent ssh": ssh, "kvmagent tcp": [Sample(6, 600, 1.1)],
                    "tcp": [Sample(12, 600, 1.0), Sample(10, 500, 1.2)]})
    assert "0.55×" in text.splitlines()[4]  # kvmagent's tcp against virsh's: 6/11
    # like for like: kvmagent's guest paused (paused_ms) against libvirt's downtime
    text = summary({"kvmagent tcp": [Sample(6, 600, 1.1, 44)],
                    "tcp": [Sample(12, 600, 1.0, 12), Sample(10, 500, 1.2, 10)]})
    kvm, virsh = text.splitlines()[2:4]
    assert "| 6 (6–6) " in kvm and "| 44 (44–44) " in kvm
    assert "| 11 (10–12) " in virsh and "4.00×" in virsh  # 44/11


def test_breakdown_without_a_completed_progress() -> None:
    """The destination's "running" came before the source's look saw
    QEMU completed: those rows say "–", the others stand."""
    text = breakdown([{"started": 1.0, "migrated": 2.0}], [Sample(24, 700, 2.1)],
                     {"ssh": [0.2], "facts": [0.5]})
    assert "| – " in text and "| 1000 " in text and "| 2100 " in text


def test_breakdown() -> None:
    events = [{"started": 1.0, "completed": 1.8, "migrated": 2.0},
              {"started": 1.2, "completed": 2.0, "migrated": 2.3}]
    text = breakdown(events, [Sample(24, 700, 2.1), Sample(20, 700, 2.4)],
                     {"ssh": [0.2, 0.3], "facts": [0.5, 0.7]})
    assert "| 250 " in text and "| 600 " in text and "| 1100 " in text  # ssh, facts, started
    assert "| 250 " in text and "| 2250 " in text  # completed -> migrated, wall
