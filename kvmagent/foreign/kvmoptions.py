"""The QEMU options of a hand-written kvm start script, read one by one
into a Script (kvmagent.foreign.kvmscript turns that into TOML): the 2008
spellings the seed uses (-drive ...,boot=on, -net nic/-net tap, -serial
mon:unix:...) and what such scripts commonly carry besides (-hda, -cdrom,
-localtime, -usbdevice tablet, -vga, -k).  Pure; an option it cannot
translate is a KvmagentError naming the file, the line and the text."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kvmagent.config import values
from kvmagent.errors import KvmagentError
from kvmagent.foreign.importtoml import excerpt, located_error

_FLAGS = frozenset({"-nographic", "-daemonize", "-no-shutdown", "-no-reboot", "-localtime", "-usb",
                    "-enable-kvm", "-no-kvm", "-snapshot", "-full-screen"})
_VALUED = frozenset({"-smp", "-m", "-drive", "-hda", "-hdb", "-hdc", "-hdd", "-cdrom", "-boot",
                     "-kernel", "-initrd", "-append", "-name", "-serial", "-monitor", "-net",
                     "-vnc", "-vga", "-k", "-usbdevice", "-pidfile", "-uuid", "-M", "-machine",
                     "-cpu", "-rtc", "-display"})
_BOOT_LETTERS = {"c": "disk", "d": "cdrom", "n": "network"}
_CACHE = {"none": "none", "off": "none", "writeback": "writeback", "on": "writeback",
          "writethrough": "writethrough", "unsafe": "unsafe", "directsync": "directsync"}


@dataclass(frozen=True)
class Arg:
    value: str
    line: int
    raw: str  # the word as written


@dataclass
class Drive:
    path: str
    bus: str
    media: str
    arg: Arg
    spelling: str
    index: int | None = None
    boot: str | None = None  # "on"/"off" as written
    format: str | None = None
    cache: str | None = None
    readonly: bool = False


@dataclass
class Net:
    kind: str
    vlan: int
    opts: dict[str, str]
    arg: Arg


@dataclass
class Script:
    """What the QEMU command line said, option by option."""

    file: str
    binary: str
    notes: list[str] = field(default_factory=list)
    top: dict[str, tuple[object, str]] = field(default_factory=dict)
    kernel: dict[str, tuple[str, Arg]] = field(default_factory=dict)
    drives: list[Drive] = field(default_factory=list)
    nets: list[Net] = field(default_factory=list)
    boot: tuple[list[str], Arg] | None = None
    name: tuple[str, Arg] | None = None
    serial: tuple[str, Arg] | None = None
    vnc: tuple[str, Arg] | None = None
    nographic: bool = False
    display_notes: list[str] = field(default_factory=list)
    extra: list[tuple[list[str], str]] = field(default_factory=list)

    def fail(self, arg: Arg, reason: str, hint: str | None = None) -> KvmagentError:
        return located_error(self.file, arg.line, reason, arg.raw, hint)


def qemu_opts(value: str) -> list[tuple[str, str | None]]:
    """A QEMU option string -> (key, value) pairs in order; ",," is a
    comma in a value, an item without "=" has the value None."""
    items, cur, i = [], "", 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            items.append(cur)
            cur = ""
        else:
            cur += value[i]
        i += 1
    items.append(cur)
    out: list[tuple[str, str | None]] = []
    for item in items:
        key, eq, val = item.partition("=")
        out.append((key, val if eq else None))
    return out


def _opts(s: Script, arg: Arg, value: str, allowed: set[str], what: str,
          first: str | None = None) -> dict[str, str | None]:
    """VALUE's options, each in ALLOWED and given once; a leading item
    without "=" is the value of FIRST (-smp 2,cores=2: cpus=2)."""
    found: dict[str, str | None] = {}
    for n, (key, val) in enumerate(qemu_opts(value)):
        if n == 0 and val is None and first is not None:
            key, val = first, key
        if key not in allowed:
            raise s.fail(arg, f"{what} option '{key}' is not one the importer translates",
                         "remove it from the script, or import without it and add it to "
                         "[qemu] extra_args by hand")
        if key in found:
            raise s.fail(arg, f"{what} option '{key}' is given twice")
        found[key] = val
    return found


def _need(s: Script, arg: Arg, opts: dict[str, str | None], key: str) -> str:
    val = opts.get(key)
    if not val:
        raise s.fail(arg, f"'{key}=' is missing or empty")
    return val


def _abs(s: Script, arg: Arg, path: str, what: str) -> str:
    if not path.startswith("/"):
        raise s.fail(arg, f"{what} {path!r} is a relative path: QEMU read it from the "
                     "directory the script ran in, which the importer does not know",
                     "write the absolute path in the script")
    return path


# -- the options -------------------------------------------------------------------


def read_options(s: Script, args: list[Arg]) -> None:
    it = iter(args)
    for arg in it:
        opt = "-" + arg.value.lstrip("-") if arg.value.startswith("--") else arg.value
        if not opt.startswith("-"):
            _drive_legacy(s, arg, "-hda", arg)  # `kvm disk.img`: QEMU's -hda
            continue
        if opt in _FLAGS:
            _flag(s, opt, arg)
            continue
        if opt not in _VALUED:
            raise s.fail(arg, f"the option {opt} is not one the importer translates",
                         "remove it from the script, or import without it and add it to "
                         "[qemu] extra_args by hand")
        value = next(it, None)
        if value is None:
            raise s.fail(arg, f"{opt} without its value at the end of the command")
        _valued(s, opt, Arg(value.value, value.line, f"{arg.raw} {value.raw}"))


def _flag(s: Script, opt: str, arg: Arg) -> None:
    if opt == "-nographic":
        s.nographic = True
    elif opt == "-daemonize":
        s.notes.append("-daemonize dropped: systemd supervises QEMU (kvm@NAME.service).")
    elif opt == "-no-shutdown":
        s.top["on_poweroff"] = ("keep", "-no-shutdown: QEMU stays when the guest powers off.")
    elif opt == "-no-reboot":
        s.top["on_reboot"] = ("stop", "-no-reboot: a guest reboot ends the run as a poweroff "
                              "would.")
    elif opt == "-localtime":
        s.extra.append((["-rtc", "base=localtime"], "-localtime: the guest's clock runs in "
                        "local time (today's spelling -rtc base=localtime; kvmagent has no "
                        "key for it)."))
    elif opt == "-usb":
        s.display_notes.append("-usb dropped: a guest with a VNC display gets a USB "
                               "controller and tablet from kvmagent.")
    elif opt == "-enable-kvm":
        s.top["accel"] = ("kvm", "-enable-kvm: KVM and never the slow TCG.")
    elif opt == "-no-kvm":
        s.top["accel"] = ("tcg", "-no-kvm: software emulation (TCG), as the script had it.")
    elif opt == "-full-screen":
        s.display_notes.append("-full-screen dropped: a service has no window.")
    else:  # -snapshot
        raise s.fail(arg, "-snapshot (the guest's writes were thrown away when QEMU "
                     "ended); kvmagent has no such mode", "remove -snapshot to import the "
                     "guest with its disks writable")


def _valued(s: Script, opt: str, arg: Arg) -> None:
    v = arg.value
    if opt == "-smp":
        opts = _opts(s, arg, v, {"cpus", "sockets", "cores", "threads", "maxcpus"}, "-smp",
                     first="cpus")
        n = opts.get("cpus") or ""
        if not n.isdigit() or not 1 <= int(n) <= 255:
            raise s.fail(arg, "expected a number of CPUs from 1 to 255")
        topo = [k for k in opts if k != "cpus"]
        s.top["cpus"] = (int(n), f"-smp {excerpt(v)}" + (
            f": the topology ({', '.join(topo)}) is not kept, kvmagent has no key for it"
            if topo else "") + ".")
    elif opt == "-m":
        size = v[5:] if v.startswith("size=") else v
        try:
            nbytes = values.parse_size(size + ("M" if size.isdigit() else ""))
        except ValueError as e:
            raise s.fail(arg, f"-m: {e}") from None
        s.top["memory"] = (values.format_size(nbytes), f"-m {excerpt(v)}" + (
            " (MiB, QEMU's unit)" if size.isdigit() else "") + ".")
    elif opt == "-drive":
        _drive(s, arg)
    elif opt in ("-hda", "-hdb", "-hdc", "-hdd", "-cdrom"):
        _drive_legacy(s, arg, opt, Arg(v, arg.line, arg.raw))
    elif opt == "-boot":
        _boot(s, arg)
    elif opt in ("-kernel", "-initrd"):
        s.kernel["image" if opt == "-kernel" else "initrd"] = (_abs(s, arg, v, opt), arg)
    elif opt == "-append":
        s.kernel["cmdline"] = (v, arg)
    elif opt == "-name":
        opts = _opts(s, arg, v, {"guest", "process", "debug-threads"}, "-name", first="guest")
        s.name = (opts.get("guest") or "", arg)
    elif opt == "-serial":
        if s.serial is not None:
            raise s.fail(arg, "a second -serial: a kvmagent guest has one serial port (ttyS0)")
        s.serial = (v, arg)
    elif opt == "-monitor":
        s.notes.append(f"-monitor {excerpt(v)} dropped: kvmagent talks to QEMU over QMP "
                       "itself.")
    elif opt == "-net":
        _net(s, arg)
    elif opt in ("-vnc", "-display"):
        _vnc(s, opt, arg)
    elif opt == "-vga":
        s.display_notes.append(f"-vga {excerpt(v)} dropped: kvmagent gives a guest with a "
                               "VNC display a standard VGA (there is no key for another "
                               "card).")
    elif opt == "-k":
        s.extra.append((["-k", v], f"-k {excerpt(v)}: the VNC keyboard layout (kvmagent has "
                        "no key for it)."))
    elif opt == "-usbdevice":
        if v not in ("tablet", "mouse"):
            raise s.fail(arg, f"-usbdevice {v}: the importer translates tablet and mouse only")
        s.display_notes.append(f"-usbdevice {v} dropped: a guest with a VNC display gets a "
                               "USB tablet from kvmagent.")
    elif opt == "-pidfile":
        s.notes.append(f"-pidfile {excerpt(v)} dropped: systemd knows QEMU's PID "
                       "(systemctl status kvm@NAME).")
    elif opt == "-uuid":
        s.top["uuid"] = (v, "-uuid: the guest keeps its SMBIOS UUID.")
    elif opt in ("-M", "-machine"):
        opts = _opts(s, arg, v, {"type", "accel"}, opt, first="type")
        machine = opts.get("type") or "pc"
        if machine != "pc":
            s.top["machine"] = (machine, f"{opt} {excerpt(v)}.")
        if opts.get("accel") in ("kvm", "tcg"):
            _flag(s, "-enable-kvm" if opts["accel"] == "kvm" else "-no-kvm", arg)
        elif "accel" in opts:
            raise s.fail(arg, f"accel={opts['accel']}: expected kvm or tcg")
    elif opt == "-cpu":
        if v == "host":
            s.top["cpu"] = (v, "-cpu host: the host's CPU, fastest, not migratable to a host "
                            'with another CPU (kvmagent\'s default is "Westmere").')
        elif re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v, re.ASCII):
            s.top["cpu"] = (v, f"-cpu {excerpt(v)}.")
        else:
            s.extra.append((["-cpu", v], f"-cpu {excerpt(v)}: overrides kvmagent's own -cpu; "
                            "the cpu key takes a model name without features."))
    elif opt == "-rtc":
        if v != "base=localtime":
            raise s.fail(arg, "the importer translates -rtc base=localtime only")
        _flag(s, "-localtime", arg)


def _drive_legacy(s: Script, arg: Arg, opt: str, value: Arg) -> None:
    cdrom = opt == "-cdrom"
    index = 2 if cdrom else "abcd".index(opt[-1])
    s.drives.append(Drive(_abs(s, arg, value.value, opt), "ide",
                          "cdrom" if cdrom else "disk", arg, opt, index=index))


def _drive(s: Script, arg: Arg) -> None:
    o = _opts(s, arg, arg.value, {"file", "if", "index", "bus", "unit", "media", "boot",
                                  "format", "cache", "readonly", "aio", "snapshot"}, "-drive")
    bus = o.get("if") or "ide"
    if bus not in ("ide", "virtio", "scsi"):
        raise s.fail(arg, f"if={bus}: kvmagent's disks are ide, virtio or scsi")
    media = o.get("media") or "disk"
    if media not in ("disk", "cdrom"):
        raise s.fail(arg, f"media={media}: expected disk or cdrom")
    if media == "cdrom" and bus == "virtio":
        raise s.fail(arg, "a virtio CD-ROM (virtio has no CD-ROM drive)", "use if=ide")
    d = Drive(_abs(s, arg, _need(s, arg, o, "file"), "file="), bus, media, arg, "-drive")
    for key in ("index", "bus", "unit"):
        if o.get(key) is not None and not (o[key] or "").isdigit():
            raise s.fail(arg, f"{key}={o[key]}: expected a number")
    if bus == "ide" and "index" in o:
        d.index = int(o["index"] or 0)
    elif bus == "ide" and ("bus" in o or "unit" in o):
        d.index = 2 * int(o.get("bus") or 0) + int(o.get("unit") or 0)
    if d.index is not None and d.index > 3:
        raise s.fail(arg, f"IDE drive number {d.index}: the pc machine has hda to hdd (0-3)")
    d.boot = o.get("boot")
    if d.boot not in (None, "on", "off"):
        raise s.fail(arg, f"boot={d.boot}: expected on or off")
    d.format = o.get("format")
    if d.format not in (None, "raw", "qcow2", "host_device"):
        raise s.fail(arg, f"format={d.format}: kvmagent's disks are raw or qcow2",
                     "convert the image with qemu-img convert -O qcow2")
    cache = o.get("cache")
    if cache is not None:
        if cache not in _CACHE:
            raise s.fail(arg, f"cache={cache}: expected one of {', '.join(_CACHE)}")
        d.cache = _CACHE[cache]
    if o.get("readonly") not in (None, "on", "off"):
        raise s.fail(arg, f"readonly={o['readonly']}: expected on or off")
    d.readonly = o.get("readonly") == "on"
    if o.get("snapshot") not in (None, "off"):
        raise s.fail(arg, "snapshot=on (the guest's writes were thrown away when QEMU "
                     "ended); kvmagent has no such mode")
    if "aio" in o:
        s.notes.append(f"Line {arg.line}: aio={o['aio']} dropped: kvmagent chooses native "
                       "AIO where O_DIRECT works.")
    s.drives.append(d)


def _boot(s: Script, arg: Arg) -> None:
    opts = _opts(s, arg, arg.value, {"order", "menu"}, "-boot", first="order")
    letters = opts.get("order") or ""
    if "menu" in opts:
        s.notes.append(f"-boot {excerpt(arg.value)}: menu= dropped.")
    order: list[str] = []
    for c in letters:
        if c not in _BOOT_LETTERS:
            raise s.fail(arg, f"boot device '{c}': kvmagent boots from c (disk), d (cdrom) "
                         "or n (network)")
        if _BOOT_LETTERS[c] not in order:
            order.append(_BOOT_LETTERS[c])
    if not order:
        raise s.fail(arg, "expected the boot devices, e.g. -boot d or -boot order=dc")
    s.boot = (order, arg)


def _net(s: Script, arg: Arg) -> None:
    kind = qemu_opts(arg.value)[0][0]
    allowed: dict[str, set[str]] = {
        "nic": {"vlan", "macaddr", "model", "name", "addr"},
        "tap": {"vlan", "name", "ifname", "script", "downscript"},
        "user": {"vlan", "name", "hostname"}, "none": set()}
    if kind not in allowed:
        raise s.fail(arg, f"-net {kind}: the importer translates -net nic, tap, user and none")
    o = _opts(s, arg, arg.value, allowed[kind] | {"type"}, f"-net {kind}", first="type")
    o.pop("type")
    vlan = o.pop("vlan", None) or "0"
    if not vlan.isdigit():
        raise s.fail(arg, f"vlan={vlan}: expected a number")
    s.nets.append(Net(kind, int(vlan), {k: v or "" for k, v in o.items()}, arg))


def _vnc(s: Script, opt: str, arg: Arg) -> None:
    v = arg.value
    if opt == "-display":
        if v in ("sdl", "gtk", "curses"):
            return
        if v == "none":
            s.nographic = True
            return
        if not v.startswith("vnc="):
            raise s.fail(arg, f"-display {v}: the importer translates none, sdl, gtk and vnc=")
        v = v[4:]
    if v == "none":
        s.nographic = True
        return
    if "," in v or not re.fullmatch(r"unix:/[^,=]+|(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]*):[0-9]{1,4}",
                                    v, re.ASCII):
        raise s.fail(arg, f"VNC display {v!r}: kvmagent takes ADDRESS:DISPLAY or unix:/PATH, "
                     "without options (password, tls, ...)")
    s.vnc = (v, arg)
