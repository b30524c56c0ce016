"""The QEMU command line of a guest: a pure function from the validated
guest (plus what the host checks found) to an argv list.  Never a shell
string.  -drive if=none + -device, -netdev + -device, -chardev, bootindex:
one command line for QEMU 7.2 (Debian 12) and 10.0 (Debian 13), as nothing
it uses is in QEMU's list of features removed up to 10.0.  Whether the
installed QEMU has each of them is asked of it (kvmagent.host.qemucaps)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvmagent.config.model import (Accel, BootClass, Bus, Cache, Guest, HostConfig, Media,
                                   NicMode, NicModel, OnPoweroff, OnReboot)

NIC_DEVICES = {NicModel.VIRTIO: "virtio-net-pci", NicModel.E1000: "e1000",
               NicModel.RTL8139: "rtl8139"}
# QEMU's driver of a disk that is a block device (an LV, a SAN disk, /dev/sr0)
BLOCK_DRIVERS = {Media.DISK: "host_device", Media.CDROM: "host_cdrom"}


def quote(value: str) -> str:
    """Quote a value for a QEMU option string: a comma is written twice, so
    a path like "a,format=raw" cannot add options of its own."""
    return value.replace(",", ",,")


@dataclass(frozen=True)
class HostFacts:
    """What the second-stage (host) checks found; plain data, so argv
    generation stays pure and testable with made-up facts."""

    accel: Accel  # resolved: KVM or TCG
    direct_io: dict[Path, bool] = field(default_factory=dict)  # O_DIRECT works per disk
    vhost_net: bool = False
    notices: tuple[str, ...] = ()
    block_devices: frozenset[Path] = frozenset()  # disks that are block devices
    # The versioned machine type the guest runs with (pinned at its first
    # start, kvmagent.render.pin); None: the guest's machine as written.
    machine: str | None = None


@dataclass(frozen=True)
class Sockets:
    """Where QEMU's control and console endpoints are.  `kvmagent show` and
    tests use socket paths; the supervisor passes listening fds instead."""

    qmp: str  # "path" or "fd=N"
    console: str | None
    taps: dict[int, str] = field(default_factory=dict)  # nic index -> "fd=N" / "fds=N:M,..."
    # disk node -> the fds QEMU gets for it (-add-fd, one fd set per disk):
    # the supervisor opens the disks, so an unprivileged QEMU needs no access
    disk_fds: dict[str, list[str]] = field(default_factory=dict)
    # disk node -> its qcow2 backing chain, nearest first: (read-only fd, format)
    # each; QEMU would open them by the path in the image, and could not
    backing_fds: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @classmethod
    def in_dir(cls, rundir: Path) -> "Sockets":
        return cls(qmp=str(rundir / "qmp.sock"), console=str(rundir / "console.sock"))


def _endpoint(spec: str) -> str:
    return spec if spec.startswith("fd=") else f"path={quote(spec)},server=on,wait=off"


def effective_cache(guest_disk_cache: Cache, direct_io: bool | None) -> Cache:
    if guest_disk_cache is Cache.AUTO:
        return Cache.NONE if direct_io in (True, None) else Cache.WRITEBACK
    return guest_disk_cache


def boot_indexes(guest: Guest) -> dict[str, int]:
    """Device id -> bootindex.  Classes in the order of `boot`; within a
    class the drive marked boot = true, else every drive not marked
    boot = false, in the order written."""
    if guest.kernel is not None:
        return {}
    order: dict[str, int] = {}
    n = 1
    for cls in guest.boot:
        if cls is BootClass.NETWORK:
            ids = [nic.id for nic in guest.nics[:1]]
        else:
            disks = [d for d in guest.disks if d.boot_class is cls and d.boot is not False]
            chosen = [d for d in disks if d.boot] or disks
            ids = [d.node for d in chosen]
        for dev in ids:
            order[dev] = n
            n += 1
    return order


def machine_and_cpu(guest: Guest, facts: HostFacts) -> tuple[str, str]:
    """The exact -machine and -cpu values of the guest on this host (before
    quoting): what the guest sees, so what a migration's destination must
    be started with.  "host" under TCG is "max": everything the
    accelerator has, which is no more migratable than the host's CPU."""
    cpu = "max" if guest.cpu == "host" and facts.accel is Accel.TCG else guest.cpu
    return facts.machine or guest.machine, cpu


def qemu_argv(guest: Guest, host: HostConfig, facts: HostFacts, sockets: Sockets, *,
              incoming: bool = False, machine: str | None = None,
              cpu: str | None = None) -> list[str]:
    """incoming: the destination of a live migration (kvmagent migrate):
    QEMU waits for the stream (-incoming defer; the supervisor hands it the
    fd), with the source QEMU's exact -machine and -cpu values, MACHINE and
    CPU, where they are given (as the source's command line has them)."""
    accel = facts.accel
    own_machine, own_cpu = machine_and_cpu(guest, facts)
    argv = [str(host.qemu),
            "-name", f"guest={guest.name},debug-threads=on",
            "-uuid", guest.uuid,
            "-no-user-config", "-nodefaults",
            "-machine", quote(machine or own_machine),
            # split-wx: TCG's JIT writes and runs code through two mappings,
            # so it works under MemoryDenyWriteExecute= (kvm@.service).
            "-accel", "tcg,split-wx=on" if accel is Accel.TCG else str(accel),
            "-cpu", cpu or quote(own_cpu),
            "-smp", str(guest.cpus),
            "-m", f"{guest.memory >> 20}M"]
    if guest.display.vnc:
        argv += ["-vnc", quote(guest.display.vnc), "-device", "VGA",
                 "-device", "qemu-xhci", "-device", "usb-tablet"]
    else:
        argv += ["-display", "none"]
    argv += ["-chardev", f"socket,id=qmp,{_endpoint(sockets.qmp)}",
             "-mon", "chardev=qmp,mode=control"]
    if guest.console.serial and sockets.console:
        argv += ["-chardev", f"socket,id=console,{_endpoint(sockets.console)}",
                 "-serial", "chardev:console"]
    if guest.kernel:
        argv += ["-kernel", str(guest.kernel.image)]
        if guest.kernel.initrd:
            argv += ["-initrd", str(guest.kernel.initrd)]
        if guest.kernel.cmdline:
            argv += ["-append", guest.kernel.cmdline]

    bootindex = boot_indexes(guest)
    if any(d.bus is Bus.SCSI for d in guest.disks):
        argv += ["-device", "virtio-scsi-pci,id=scsi0"]
    for n, d in enumerate(guest.disks, start=1):
        cache = effective_cache(d.cache, facts.direct_io.get(d.path))
        file = quote(str(d.path))
        if d.node in sockets.disk_fds:
            for fd in sockets.disk_fds[d.node]:
                argv += ["-add-fd", f"fd={fd},set={n}"]
            file = f"/dev/fdset/{n}"
        drive = [f"file={file}", f"format={d.format}", "if=none",
                 f"id={d.node}", f"cache={cache}"]
        if file.startswith("/dev/fdset/") and d.path in facts.block_devices:
            # QEMU picks its block device driver by the path, which an fd
            # set hides; its default ("file") refuses a block device
            drive.insert(1, f"file.driver={BLOCK_DRIVERS[d.media]}")
        for depth, (fd, fmt) in enumerate(sockets.backing_fds.get(d.node, [])):
            fdset = n + 100 * (depth + 1)  # MAX_DISKS < 100
            argv += ["-add-fd", f"fd={fd},set={fdset}"]
            node = "backing." * (depth + 1)
            drive += [f"{node}driver={fmt}", f"{node}file.filename=/dev/fdset/{fdset}"]
        if cache in (Cache.NONE, Cache.DIRECTSYNC):
            drive.append("aio=native")
        if d.readonly:
            drive.append("readonly=on")
        else:
            # Without it QEMU reopens a disk read-only when it lets go of it
            # (the end of a live migration's source) and closes the read-write
            # fd unlocked: that open file lives on in the fd set, and so do
            # its image locks, which the destination then cannot take.
            drive.append("auto-read-only=off")
        if d.media is Media.DISK and not d.readonly:
            drive.append("discard=unmap")
        argv += ["-drive", ",".join(drive)]
        if d.bus is Bus.VIRTIO:
            dev = f"virtio-blk-pci,drive={d.node},id={d.node}-dev"
        elif d.bus is Bus.IDE:
            kind = "ide-cd" if d.media is Media.CDROM else "ide-hd"
            dev = f"{kind},drive={d.node},id={d.node}-dev"
        else:
            kind = "scsi-cd" if d.media is Media.CDROM else "scsi-hd"
            dev = f"{kind},bus=scsi0.0,drive={d.node},id={d.node}-dev"
        if d.node in bootindex:
            dev += f",bootindex={bootindex[d.node]}"
        argv += ["-device", dev]

    for nic in guest.nics:
        if nic.mode is NicMode.USER:
            netdev = f"user,id={nic.id}"
        else:
            queues = f",queues={nic.queues}" if nic.queues > 1 else ""
            tap = (sockets.taps.get(nic.index) or
                   f"ifname={nic.tap},script=no,downscript=no{queues}")
            netdev = f"tap,id={nic.id},{tap}"
            if nic.model is NicModel.VIRTIO and facts.vhost_net:
                netdev += ",vhost=on"
        dev = f"{NIC_DEVICES[nic.model]},netdev={nic.id},mac={nic.mac},id={nic.id}-dev"
        if nic.queues > 1:  # MSI-X: one vector per rx and tx queue, plus config and control
            dev += f",mq=on,vectors={2 * nic.queues + 2}"
        if nic.id in bootindex:
            dev += f",bootindex={bootindex[nic.id]}"
        argv += ["-netdev", netdev, "-device", dev]

    # A guest kernel panic ends QEMU with status 1: a failure that systemd
    # restarts, not a silent reboot (guest.md: without pvpanic a panic looks
    # like a reboot).
    argv += ["-device", "pvpanic", "-action", "panic=exit-failure"]
    if guest.on_reboot is OnReboot.STOP:  # a reboot is a guest poweroff (SHUTDOWN guest-reset)
        argv += ["-action", "reboot=shutdown"]
    # QEMU's own seccomp filter, for QEMU alone (the supervisor forks and
    # execs; QEMU never needs to): no new privileges, processes or old
    # syscalls, no changes of scheduling or affinity.
    argv += ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,"
             "resourcecontrol=deny"]
    if guest.on_poweroff is OnPoweroff.KEEP:
        argv.append("-no-shutdown")
    argv += list(guest.extra_args)
    if incoming:
        argv += ["-incoming", "defer"]
    return argv
