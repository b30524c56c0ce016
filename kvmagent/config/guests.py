"""Finding and loading guests and the host configuration, and the pure
(first-stage) checks on a guest as a whole and across guests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kvmagent import names
from kvmagent.config.layers import DEFAULT, Layered, load_layers
from kvmagent.config.model import (BootClass, Bus, Cache, Console, Disk, Display, Format,
                                   Guest, HostConfig, Kernel, Media, Nic, NicMode, NicModel,
                                   OnPoweroff, OnReboot, Resources)
from kvmagent.config.schema import GUEST_ARRAYS, GUEST_TABLES, GUEST_TOP, HOST_KEYS, Reader, render
from kvmagent.errors import ExitStatus, KvmagentError, config_error
from kvmagent.paths import Paths, guest_names  # noqa: F401 - kvmagent.guests' API

MAX_NICS = 16
MAX_DISKS = 24
IDE_SLOTS = {"pc": 4, "q35": 6}


def load_host_config(paths: Paths) -> HostConfig:
    return build_host_config(load_layers(paths.host_config, required=False),
                             paths.host_config)


def build_host_config(layered: Layered, config_file: Path) -> HostConfig:
    """Merged TOML of kvmagent.toml -> validated HostConfig.  Pure."""
    r = Reader(layered, config_file)
    r.check_keys(layered.data, HOST_KEYS, ())
    d = HostConfig()
    kw = {k: r.value(layered.data, HOST_KEYS, (), k, getattr(d, k)) for k in HOST_KEYS}
    return HostConfig(**kw, origin=r.origin)


def _file_name_ok(name: str) -> bool:
    """Whether NAME can be looked up as guests/NAME.toml without leaving
    that directory: one path component, no NUL."""
    return (bool(name) and "/" not in name and "\0" not in name and name not in (".", "..")
            and len(os.fsencode(name)) <= 250)


def load_guest(paths: Paths, name: str, host: HostConfig) -> Guest:
    if not names.valid_guest_name(name):
        # A file with that name is a configuration error (6, naming the
        # file); a name typed on the command line that cannot be a guest
        # is an unknown guest (8).  Names that are no file name are never
        # looked up: "../x" must not reach outside guests/.
        try:
            bad_file = _file_name_ok(name) and os.path.lexists(paths.guest_config(name))
        except (OSError, ValueError):
            bad_file = False
        if bad_file:
            raise config_error(f"{paths.guest_config(name)}: the guest name {name!r} (from the "
                               "file name) is not valid", names.GUEST_NAME_RULE +
                               "; rename the file")
        raise KvmagentError(f"invalid guest name {name!r}", names.GUEST_NAME_RULE,
                            ExitStatus.UNKNOWN_GUEST)
    main = paths.guest_config(name)
    if not os.path.lexists(main):
        raise KvmagentError(f"unknown guest {name!r}: {main} does not exist",
                            "kvmagent list shows the defined guests",
                            ExitStatus.UNKNOWN_GUEST)
    guest = build_guest(name, load_layers(main, required=True), host, main)
    check_hidden_paths(guest)
    return guest


# What kvm@.service's ProtectHome=yes hides: empty for a defined guest's
# supervisor and QEMU.  (A one-off guest's service has ProtectHome=read-only.)
HIDDEN_DIRS = ("/home", "/root", "/run/user")


def check_hidden_paths(guest: Guest) -> None:
    """A defined guest runs in kvm@NAME.service, which hides the home
    directories: a disk, kernel or initrd there (lexically: no file is
    looked at) is a configuration error naming the key, not a "no such
    file" at start.  Not handled with ProtectHome=read-only for that guest:
    it would show every home directory to a long-running service that
    handles guest input."""
    files = [(f"disk[{d.index}].path", d.path) for d in guest.disks]
    if guest.kernel is not None:
        files.append(("kernel.image", guest.kernel.image))
        if guest.kernel.initrd is not None:
            files.append(("kernel.initrd", guest.kernel.initrd))
    for key, path in files:
        norm = os.path.normpath(path)
        top = next((d for d in HIDDEN_DIRS if norm == d or norm.startswith(d + "/")), None)
        if top is not None:
            raise config_error(
                f"{guest.origin_of(key)}: {key} = {render(str(path))}: lies in {top}, which "
                "kvm@.service hides from every guest (ProtectHome=yes)",
                "move it out of /home, /root and /run/user (e.g. to /var/lib/kvmagent/images, "
                "or /srv: kvmagent-generator makes a writable image file there writable for "
                "this guest alone), or run the guest as a one-off: kvmagent start --transient "
                "FILE")


def load_guest_file(path: Path, host: HostConfig) -> Guest:
    """A guest straight from PATH (a one-off guest), named after the file;
    its PATH.d/*.toml drop-ins apply as for a defined guest."""
    if path.suffix != ".toml":
        raise config_error(f"{path}: a guest file is named NAME.toml",
                           "the guest is named after its file; rename it")
    return build_guest(path.stem, load_layers(path, required=True), host, path)


def _host_default(host: HostConfig, key: str) -> str:
    return host.origin.get(key, DEFAULT)


def build_guest(name: str, layered: Layered, host: HostConfig, config_file: Path) -> Guest:
    """Merged TOML of one guest -> validated Guest.  Pure."""
    if not names.valid_guest_name(name):
        raise config_error(f"{config_file}: guest name {name!r} is not valid",
                           names.GUEST_NAME_RULE + "; rename the file")
    r = Reader(layered, config_file)
    data = layered.data
    r.check_keys(data, list(GUEST_TOP) + list(GUEST_TABLES) + list(GUEST_ARRAYS), ())
    top = lambda key, default, origin=DEFAULT: r.value(  # noqa: E731
        data, GUEST_TOP, (), key, default, origin)

    tables = {t: r.table(data, t, keys) for t, keys in GUEST_TABLES.items()}

    def sub(t: str, key: str, default: Any, origin: str = DEFAULT) -> Any:
        return r.value(tables[t], GUEST_TABLES[t], (t,), key, default, origin)

    kernel = None
    if tables["kernel"]:
        image = sub("kernel", "image", None)
        if image is None:
            raise r.fail(("kernel",), "initrd or cmdline given without image",
                         "add image = \"/boot/...\" to [kernel], or remove the table")
        kernel = Kernel(image, sub("kernel", "initrd", None), sub("kernel", "cmdline", None))

    disks = _disks(r, r.array(data, "disk", GUEST_ARRAYS["disk"]))
    cpus = top("cpus", 1)
    nics = _nics(r, name, host, r.array(data, "nic", GUEST_ARRAYS["nic"]), cpus)

    machine = top("machine", host.machine, _host_default(host, "machine"))
    boot_explicit = "boot" in data
    boot = top("boot", (BootClass.DISK, BootClass.CDROM))
    res = Resources(sub("resources", "cpu_weight", None), sub("resources", "cpu_affinity", None),
                    sub("resources", "io_weight", None), sub("resources", "tasks_max", None))
    guest = Guest(
        name=name,
        uuid=top("uuid", names.guest_uuid(name)),
        description=top("description", f"KVM guest {name}"),
        cpus=cpus,
        memory=top("memory", 512 << 20),
        machine=machine,
        cpu=top("cpu", host.cpu, _host_default(host, "cpu")),
        accel=top("accel", host.accel, _host_default(host, "accel")),
        boot=boot,
        boot_explicit=boot_explicit,
        on_poweroff=top("on_poweroff", OnPoweroff.STOP),
        on_reboot=top("on_reboot", OnReboot.RESTART),
        kernel=kernel,
        disks=disks,
        nics=nics,
        console=Console(sub("console", "serial", True), sub("console", "escape", "^]"),
                        sub("console", "log_burst", 1000), sub("console", "log_interval", 10.0)),
        display=Display(sub("display", "vnc", None)),
        stop_timeout=sub("stop", "timeout", host.stop_timeout,
                         _host_default(host, "stop_timeout")),
        resources=res,
        extra_args=sub("qemu", "extra_args", ()),
        config_file=config_file,
        origin=r.origin,
    )
    _check_boot(r, guest)
    _check_ide(r, guest)
    return guest


def _disks(r: Reader, items: list[dict[str, Any]]) -> tuple[Disk, ...]:
    keys = GUEST_ARRAYS["disk"]
    if len(items) > MAX_DISKS:
        raise r.fail(("disk",), f"{len(items)} disks; at most {MAX_DISKS} are supported")
    out: list[Disk] = []
    seen: dict[Path, int] = {}
    for i, item in enumerate(items):
        v = lambda key, default: r.value(item, keys, ("disk", i), key, default)  # noqa: E731
        if "path" not in item:
            raise r.fail(("disk", i), "no path", 'add path = "/dev/vg/lv" or an image file')
        path = v("path", None)
        media = v("media", Media.DISK)
        bus = v("bus", Bus.VIRTIO)
        readonly = v("readonly", media is Media.CDROM)
        if media is Media.CDROM and bus is Bus.VIRTIO:
            raise r.fail(("disk", i, "bus"), 'media = "cdrom" needs bus = "ide" or "scsi"; '
                         "virtio has no CD-ROM drive",
                         'set bus = "ide" (or "scsi") for this [[disk]]')
        if media is Media.CDROM and not readonly:
            raise r.fail(("disk", i, "readonly"), "a cdrom is always read-only",
                         "remove readonly = false")
        if path in seen:
            raise r.fail(("disk", i, "path"), f"{render(str(path))} is already disk[{seen[path]}]",
                         f"remove one of the two [[disk]] tables (disk[{seen[path]}] or "
                         f"disk[{i}]): one image attached twice would be corrupted")
        seen[path] = i
        out.append(Disk(index=i, path=path, bus=bus, media=media,
                        format=v("format", Format.RAW), readonly=readonly,
                        cache=v("cache", Cache.AUTO), boot=v("boot", None)))
    return tuple(out)


def _nics(r: Reader, name: str, host: HostConfig, items: list[dict[str, Any]],
          cpus: int) -> tuple[Nic, ...]:
    keys = GUEST_ARRAYS["nic"]
    if len(items) > MAX_NICS:
        raise r.fail(("nic",), f"{len(items)} NICs; at most {MAX_NICS} are supported")
    out: list[Nic] = []
    macs: dict[str, int] = {}
    for i, item in enumerate(items):
        v = lambda key, default, o=DEFAULT: r.value(  # noqa: E731
            item, keys, ("nic", i), key, default, o)
        mode = v("mode", NicMode.BRIDGE)
        if mode is NicMode.USER and "bridge" in item:
            raise r.fail(("nic", i, "bridge"), 'a mode = "user" NIC has no bridge',
                         'remove bridge, or use mode = "bridge"')
        bridge = (v("bridge", host.bridge, _host_default(host, "bridge"))
                  if mode is NicMode.BRIDGE else None)
        mac = v("mac", names.default_mac(name, i))
        if mac in macs:
            raise r.fail(("nic", i, "mac"), f"{render(mac)} is already the MAC of nic[{macs[mac]}]",
                         "change one of the two, or remove mac from one: kvmagent then "
                         "derives one from the guest name and the NIC's index")
        macs[mac] = i
        model = v("model", NicModel.VIRTIO)
        queues = v("queues", 1)
        if queues > 1 and (model is not NicModel.VIRTIO or mode is not NicMode.BRIDGE):
            raise r.fail(("nic", i, "queues"), 'multiqueue needs model = "virtio" and '
                         'mode = "bridge"', "remove queues, or use a virtio bridged NIC")
        if queues > cpus:
            raise r.fail(("nic", i, "queues"), f"{queues} queues for {cpus} vCPUs",
                         "more queues than vCPUs only costs; set queues <= cpus")
        out.append(Nic(index=i, mac=mac, tap=names.tap_name(name, i), bridge=bridge,
                       model=model, mode=mode, queues=queues))
    return tuple(out)


def _check_boot(r: Reader, g: Guest) -> None:
    if len(set(g.boot)) != len(g.boot):
        raise r.fail(("boot",), f"{render([str(b) for b in g.boot])} names a class twice")
    if g.kernel and g.boot_explicit:
        raise r.fail(("boot",), "has no effect with direct kernel boot ([kernel] image)",
                     "remove boot, or remove [kernel] to boot from a drive")
    present = {d.boot_class for d in g.disks} | ({BootClass.NETWORK} if g.nics else set())
    if g.boot_explicit:
        for cls in g.boot:
            if cls not in present:
                what = "[[nic]]" if cls is BootClass.NETWORK else f'[[disk]] with media = "{cls}"'
                raise r.fail(("boot",), f'lists "{cls}" but the guest has no {what}',
                             f'remove "{cls}" from boot, or add a {what}')
    for cls in (BootClass.DISK, BootClass.CDROM):
        flagged = [d for d in g.disks if d.boot_class is cls and d.boot]
        if flagged and g.kernel:
            # boot itself is refused with [kernel] (above): adding to it cannot help
            raise r.fail(("disk", flagged[0].index, "boot"),
                         "is true but direct kernel boot ([kernel] image) is used: the guest "
                         "starts that kernel, never a drive's boot loader",
                         "remove boot = true (the kernel finds its root file system by "
                         "[kernel] cmdline, root=...), or remove [kernel] to boot from the "
                         "drive's own boot loader")
        if flagged and cls not in g.boot:
            raise r.fail(("disk", flagged[0].index, "boot"),
                         f'is true but boot = {render([str(b) for b in g.boot])} does not '
                         f'list "{cls}"', f'add "{cls}" to boot, or remove boot = true')
        if len(flagged) > 1:
            raise r.fail(("disk", flagged[1].index, "boot"),
                         f"disk[{flagged[0].index}] is already the boot {cls}",
                         f"remove boot = true from all {cls} drives but the one to boot from")


def _check_ide(r: Reader, g: Guest) -> None:
    ide = [d for d in g.disks if d.bus is Bus.IDE]
    slots = IDE_SLOTS["q35" if "q35" in g.machine else "pc"]
    if len(ide) > slots:
        # virtio has no CD-ROM drive: a CD-ROM can only move to SCSI
        buses = ('"virtio" (disks) or "scsi" (disks and CD-ROMs; virtio has no CD-ROM drive)'
                 if any(d.media is Media.CDROM for d in ide) else '"virtio" or "scsi"')
        raise r.fail(("disk", ide[slots].index, "bus"),
                     f"{len(ide)} IDE drives; machine {render(g.machine)} has {slots} IDE slots",
                     f"keep {slots} drives on IDE and give the others bus = {buses}")


def check_unique(guests: list[Guest]) -> None:
    """Checks across guests: MACs, tap names and writable disks are each
    used by one guest only."""
    macs: dict[str, Guest] = {}
    taps: dict[str, Guest] = {}
    disks: dict[Path, tuple[Guest, Disk]] = {}
    for g in guests:
        for nic in g.nics:
            other = macs.get(nic.mac)
            if other is not None:
                raise config_error(
                    f"{g.origin_of(f'nic[{nic.index}].mac')}: nic[{nic.index}].mac = "
                    f"{render(nic.mac)} is also a MAC of guest {other.name} "
                    f"({other.config_file})", "give every NIC its own MAC")
            macs[nic.mac] = g
            if nic.mode is NicMode.BRIDGE:
                other = taps.get(nic.tap)
                if other is not None:
                    raise config_error(
                        f"{g.config_file}: tap name {nic.tap} of nic[{nic.index}] is also "
                        f"used by guest {other.name}", "rename one of the two guests")
                taps[nic.tap] = g
        for d in g.disks:
            seen = disks.get(d.path)
            if seen is not None and not (d.readonly and seen[1].readonly):
                raise config_error(
                    f"{g.origin_of(f'disk[{d.index}].path')}: disk[{d.index}].path = "
                    f"{render(str(d.path))} is also disk[{seen[1].index}] of guest "
                    f"{seen[0].name}", "a writable disk can belong to one guest only; "
                    "set readonly = true on both to share it")
            disks[d.path] = (g, d)
