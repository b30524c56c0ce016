"""The QEMU command line, a pure function: golden files for the six seed
configurations (tests/data/seed/guests), plus the rules behind them.

Regenerate the golden files after a deliberate change with
KVMAGENT_REGEN_GOLDEN=1 and review the diff."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kvmagent.config.guests import guest_names, load_guest, load_host_config
from kvmagent.config.model import Accel
from kvmagent.render.qemu import HostFacts, Sockets, boot_indexes, qemu_argv, quote
from kvmagent.render.scope import render_settings, scope_settings

from tests import seed

SEED = seed.copy(Path("/var/lib/kvmagent"), Path("/run/kvmagent"))
GOLDEN = seed.GOLDEN
SEED_GUESTS = seed.SEED_GUESTS
KVM = seed.KVM


def seed_argv(name: str, facts: HostFacts = KVM) -> list[str]:
    return seed.seed_argv(SEED, name, facts)


def test_all_seed_guests_have_golden_files():
    assert guest_names(SEED) == sorted(SEED_GUESTS)


@pytest.mark.parametrize("name", SEED_GUESTS)
def test_golden(name):
    argv = seed_argv(name)
    golden = GOLDEN / f"{name}.argv"
    assert argv == golden.read_text().splitlines(), \
        "after a deliberate change: /usr/bin/python3 -m tests.seed --regen-golden"


def test_arkani_reads_like_the_seed():
    argv = seed_argv("arkani")
    text = " ".join(argv)
    # the seed: kvm -smp 2 -drive if=ide,file=/dev/internal/kvm_guest,boot=on -m 1024
    #   -name arkani -kernel /boot/kvm/arkani/... -initrd ... -append "root=/dev/hda ro"
    assert "-smp 2" in text and "-m 1024M" in text and "-name guest=arkani" in text
    assert "-kernel /boot/kvm/arkani/vmlinuz-2.6.26-1-amd64" in text
    assert "-drive file=/dev/internal/kvm_guest,format=raw,if=none,id=disk0" in text
    assert "-device ide-hd,drive=disk0" in text
    assert argv[argv.index("-append") + 1] == "root=/dev/sda ro"


def test_fukano_install_from_iso():
    argv = seed_argv("fukano")
    assert "-no-shutdown" in argv
    assert not any(a.startswith(("-netdev", "-nic", "-net")) for a in argv)  # -net none
    assert "ide-cd,drive=disk1,id=disk1-dev,bootindex=1" in argv
    assert "ide-hd,drive=disk0,id=disk0-dev,bootindex=2" in argv


def test_tcg_and_kvm():
    assert seed_argv("arkani", HostFacts(Accel.TCG))[seed_argv("arkani").index("-accel") + 1] == "tcg,split-wx=on"
    kvm = seed_argv("arkani")
    assert kvm[kvm.index("-accel") + 1] == "kvm"
    # the same migratable CPU model under both (tests/unit/test_cpu_machine.py)
    assert kvm[kvm.index("-cpu") + 1] == "Westmere"


def test_quoting_prevents_option_injection(conf):
    conf.write("guests/g.toml", '[[disk]]\npath = "/a,format=raw,file=/etc/shadow"\n'
               '[display]\nvnc = "unix:/run/x.sock"\n')
    host = load_host_config(conf.paths)
    g = load_guest(conf.paths, "g", host)
    argv = qemu_argv(g, host, KVM, Sockets.in_dir(Path("/run/a,b")))
    drive = argv[argv.index("-drive") + 1]
    assert drive.startswith("file=/a,,format=raw,,file=/etc/shadow,format=raw,if=none,")
    assert argv[argv.index("-vnc") + 1] == "unix:/run/x.sock"
    assert "socket,id=qmp,path=/run/a,,b/qmp.sock,server=on,wait=off" in argv
    assert quote("a,b,,c") == "a,,b,,,,c"


def test_extra_args_verbatim_at_the_end(conf):
    conf.write("guests/g.toml", '[qemu]\nextra_args = ["-rtc", "base=localtime", "-snapshot"]\n')
    host = load_host_config(conf.paths)
    argv = qemu_argv(load_guest(conf.paths, "g", host), host, KVM, Sockets.in_dir(Path("/r")))
    assert argv[-3:] == ["-rtc", "base=localtime", "-snapshot"]


def test_cache_follows_o_direct(conf):
    conf.write("guests/g.toml", '[[disk]]\npath = "/a"\n[[disk]]\npath = "/b"\ncache = "unsafe"\n')
    host = load_host_config(conf.paths)
    g = load_guest(conf.paths, "g", host)
    facts = HostFacts(Accel.KVM, direct_io={Path("/a"): False, Path("/b"): True})
    drives = [a for a in qemu_argv(g, host, facts, Sockets.in_dir(Path("/r"))) if a.startswith("file=")]
    assert "cache=writeback" in drives[0] and "aio=native" not in drives[0]
    assert "cache=unsafe" in drives[1] and "aio=native" not in drives[1]
    facts = HostFacts(Accel.KVM, direct_io={Path("/a"): True})
    drives = [a for a in qemu_argv(g, host, facts, Sockets.in_dir(Path("/r"))) if a.startswith("file=")]
    assert "cache=none,aio=native" in drives[0]


def test_boot_order(conf):
    conf.write("guests/g.toml", """
boot = ["network", "cdrom", "disk"]
[[disk]]
path = "/data"
boot = false
[[disk]]
path = "/srv/root.img"
[[disk]]
path = "/cd.iso"
bus = "scsi"
media = "cdrom"
[[nic]]
""")
    g = load_guest(conf.paths, "g", load_host_config(conf.paths))
    assert boot_indexes(g) == {"net0": 1, "disk2": 2, "disk1": 3}
    conf.write("guests/g.toml", '[[disk]]\npath = "/a"\n[[disk]]\npath = "/b"\nboot = true\n')
    g = load_guest(conf.paths, "g", load_host_config(conf.paths))
    assert boot_indexes(g) == {"disk1": 1}


def test_fd_passing_for_the_supervisor(conf):
    conf.write("guests/g.toml", "[[nic]]\n")
    host = load_host_config(conf.paths)
    g = load_guest(conf.paths, "g", host)
    argv = qemu_argv(g, host, dataclasses.replace(KVM, vhost_net=True),
                     Sockets(qmp="fd=3,server=on,wait=off", console="fd=4,server=on,wait=off",
                             taps={0: "fd=5,vhostfd=6"}))
    assert "socket,id=qmp,fd=3,server=on,wait=off" in argv
    assert "tap,id=net0,fd=5,vhostfd=6,vhost=on" in argv
    assert not any("ifname=" in a for a in argv)


def test_console_off(conf):
    conf.write("guests/g.toml", "[console]\nserial = false\n")
    host = load_host_config(conf.paths)
    argv = qemu_argv(load_guest(conf.paths, "g", host), host, KVM, Sockets.in_dir(Path("/r")))
    assert "-serial" not in argv


def test_scope_settings(conf):
    conf.write("kvmagent.toml", 'memory_overhead = "128M"\n')
    conf.write("guests/g.toml", 'memory = "1G"\n[resources]\ncpu_weight = 200\n'
               'cpu_affinity = [0, 1, 2, 5]\nio_weight = 50\ntasks_max = 100\n')
    host = load_host_config(conf.paths)
    s = dict(scope_settings(load_guest(conf.paths, "g", host), host))
    assert s["MemoryMax"] == (1 << 30) + (128 << 20)
    assert s["CPUWeight"] == 200 and s["IOWeight"] == 50 and s["TasksMax"] == 100
    assert s["AllowedCPUs"] == "0-2,5"
    # part of the service (stopped with it), not bound to it: QEMU outlives a
    # supervisor that dies, for the next one to take over
    assert "BindsTo" not in s
    assert s["PartOf"] == ["kvm@g.service"] and s["Before"] == ["kvm@g.service"]
    assert s["Slice"] == "machine.slice"
    assert "Before=kvm@g.service" in render_settings(list(s.items()))
    assert s["DevicePolicy"] == "closed" and s["DeviceAllow"] == [("/dev/kvm", "rw")]


def test_scope_allows_the_guests_block_devices(conf):
    conf.write("guests/g.toml", '[[disk]]\npath = "/dev/vg/a"\n[[disk]]\npath = "/dev/sr0"\n'
               'media = "cdrom"\nbus = "ide"\n[[disk]]\npath = "/img/x.raw"\n')
    host = load_host_config(conf.paths)
    g = load_guest(conf.paths, "g", host)
    facts = HostFacts(Accel.KVM, block_devices=frozenset({Path("/dev/vg/a"), Path("/dev/sr0")}))
    s = dict(scope_settings(g, host, facts))
    assert s["DeviceAllow"] == [("/dev/kvm", "rw"), ("/dev/vg/a", "rw"), ("/dev/sr0", "r")]
    lines = render_settings(scope_settings(g, host, facts))
    assert "DeviceAllow=/dev/vg/a rw" in lines and "DeviceAllow=/dev/sr0 r" in lines


def test_block_devices_passed_as_fds_get_qemus_block_device_drivers(conf):
    """The supervisor passes every disk as an fd set, whose path tells QEMU
    nothing: its default driver ("file") refuses a block device ("'file'
    driver requires '/dev/fdset/1' to be a regular file", QEMU 7.2 and
    10.0), so a block device is named host_device, a CD-ROM drive
    host_cdrom.  By path (kvmagent show) QEMU finds them itself."""
    conf.write("guests/g.toml", '[[disk]]\npath = "/dev/vg/a"\n[[disk]]\npath = "/dev/sr0"\n'
               'media = "cdrom"\nbus = "ide"\n[[disk]]\npath = "/img/x.raw"\n')
    host = load_host_config(conf.paths)
    g = load_guest(conf.paths, "g", host)
    facts = HostFacts(Accel.KVM, block_devices=frozenset({Path("/dev/vg/a"), Path("/dev/sr0")}))
    fds = Sockets("fd=3", None, disk_fds={"disk0": ["4", "5"], "disk1": ["6"],
                                          "disk2": ["7", "8"]})
    drives = [a for a in qemu_argv(g, host, facts, fds) if a.startswith("file=")]
    assert drives[0].startswith("file=/dev/fdset/1,file.driver=host_device,format=raw,")
    assert drives[1].startswith("file=/dev/fdset/2,file.driver=host_cdrom,format=raw,")
    assert drives[2].startswith("file=/dev/fdset/3,format=raw,")
    by_path = qemu_argv(g, host, facts, Sockets.in_dir(Path("/r")))
    assert not any("file.driver" in a for a in by_path)


def test_multiqueue(conf):
    conf.write("guests/g.toml", "cpus = 4\n[[nic]]\nqueues = 4\n")
    host = load_host_config(conf.paths)
    g = load_guest(conf.paths, "g", host)
    argv = qemu_argv(g, host, KVM, Sockets.in_dir(Path("/r")))
    assert "tap,id=net0,ifname=kvm-g-0,script=no,downscript=no,queues=4" in argv
    assert any(a.endswith(",mq=on,vectors=10") for a in argv)
    argv = qemu_argv(g, host, KVM, Sockets("fd=3", None, taps={0: "fds=5:6:7:8"}))
    assert "tap,id=net0,fds=5:6:7:8" in argv


def test_incoming_migration_same_argv_but_waiting_with_the_sources_machine_and_cpu():
    """The destination of kvmagent migrate: the normal command line, but
    -incoming defer, and the source's exact machine type and CPU model."""
    guest = load_guest(SEED, "arkani", load_host_config(SEED))
    sockets = Sockets.in_dir(Path("/run/kvmagent/arkani"))
    normal = qemu_argv(guest, load_host_config(SEED), KVM, sockets)
    argv = qemu_argv(guest, load_host_config(SEED), KVM, sockets, incoming=True,
                     machine="pc-i440fx-7.2", cpu="qemu64,+ssse3")
    assert argv[-2:] == ["-incoming", "defer"]
    assert argv[argv.index("-machine") + 1] == "pc-i440fx-7.2"
    assert argv[argv.index("-cpu") + 1] == "qemu64,+ssse3"  # the source's, as it is
    changed = [i for i, (a, b) in enumerate(zip(normal, argv)) if a != b]
    assert changed == [argv.index("-machine") + 1, argv.index("-cpu") + 1]
    assert len(argv) == len(normal) + 2
