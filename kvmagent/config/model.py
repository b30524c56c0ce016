"""The validated model: frozen dataclasses built by kvmagent.config.schema from the
merged TOML.  Everything downstream (QEMU argv, systemd settings, show)
reads only these."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path


class Accel(enum.StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class Bus(enum.StrEnum):
    VIRTIO = "virtio"
    IDE = "ide"
    SCSI = "scsi"


class Media(enum.StrEnum):
    DISK = "disk"
    CDROM = "cdrom"


class Format(enum.StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"


class Cache(enum.StrEnum):
    AUTO = "auto"  # none (O_DIRECT) where the file system supports it, else writeback
    NONE = "none"
    WRITEBACK = "writeback"
    WRITETHROUGH = "writethrough"
    DIRECTSYNC = "directsync"
    UNSAFE = "unsafe"


class NicModel(enum.StrEnum):
    VIRTIO = "virtio"
    E1000 = "e1000"
    RTL8139 = "rtl8139"


class NicMode(enum.StrEnum):
    BRIDGE = "bridge"
    USER = "user"


class OnPoweroff(enum.StrEnum):
    STOP = "stop"  # a guest poweroff ends QEMU and the unit
    KEEP = "keep"  # QEMU stays with the guest stopped (-no-shutdown)


class OnReboot(enum.StrEnum):
    RESTART = "restart"  # the guest reboots in the same QEMU
    STOP = "stop"  # a guest reboot is a poweroff (-action reboot=shutdown)


class BootClass(enum.StrEnum):
    DISK = "disk"
    CDROM = "cdrom"
    NETWORK = "network"


@dataclass(frozen=True)
class HostConfig:
    bridge: str = "br-kvm"
    accel: Accel = Accel.AUTO
    tcg_fallback: bool = False
    qemu: Path = Path("/usr/bin/qemu-system-x86_64")
    machine: str = "pc"
    cpu: str = "Westmere"  # kvmagent.config.schema.DEFAULT_CPU
    stop_timeout: float = 90.0
    memory_overhead: int = 256 << 20
    device_timeout: float = 90.0
    qemu_user: str = "kvmagent-qemu"
    origin: dict[str, str] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Kernel:
    image: Path
    initrd: Path | None = None
    cmdline: str | None = None


@dataclass(frozen=True)
class Disk:
    index: int
    path: Path
    bus: Bus = Bus.VIRTIO
    media: Media = Media.DISK
    format: Format = Format.RAW
    readonly: bool = False
    cache: Cache = Cache.AUTO
    boot: bool | None = None  # None: not said; False: never boot from it

    @property
    def node(self) -> str:
        return f"disk{self.index}"

    @property
    def boot_class(self) -> BootClass:
        return BootClass.CDROM if self.media is Media.CDROM else BootClass.DISK


@dataclass(frozen=True)
class Nic:
    index: int
    mac: str
    tap: str  # interface name on the host (bridge mode)
    bridge: str | None = None  # None in user mode
    model: NicModel = NicModel.VIRTIO
    mode: NicMode = NicMode.BRIDGE
    queues: int = 1  # multiqueue virtio-net: one tap queue (and vhost) per queue

    @property
    def id(self) -> str:
        return f"net{self.index}"


@dataclass(frozen=True)
class Console:
    serial: bool = True
    escape: str = "^]"
    log_burst: int = 1000  # console lines to the journal per log_interval
    log_interval: float = 10.0


@dataclass(frozen=True)
class Display:
    vnc: str | None = None


@dataclass(frozen=True)
class Resources:
    cpu_weight: int | None = None
    cpu_affinity: tuple[int, ...] | None = None
    io_weight: int | None = None
    tasks_max: int | None = None


@dataclass(frozen=True)
class Guest:
    name: str
    uuid: str
    description: str
    cpus: int
    memory: int  # bytes
    machine: str
    cpu: str  # "host" or a QEMU CPU model
    accel: Accel
    boot: tuple[BootClass, ...]
    boot_explicit: bool
    on_poweroff: OnPoweroff
    on_reboot: OnReboot
    kernel: Kernel | None
    disks: tuple[Disk, ...]
    nics: tuple[Nic, ...]
    console: Console
    display: Display
    stop_timeout: float
    resources: Resources
    extra_args: tuple[str, ...]
    config_file: Path
    origin: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def origin_of(self, key: str) -> str:
        """The file that set KEY; the guest's own file for defaults, so that
        a message always names a file to edit."""
        origin = self.origin.get(key)
        return origin if origin and origin != "default" else str(self.config_file)
