"""`kvmagent import kvm-script`: a hand-written start script that runs
kvm/kvm-qemu/qemu-system-x86_64 (the seed's kind, 2008 option spellings)
-> the equivalent guest TOML, with a comment for every choice made.

Pure: the script's text comes in, the TOML comes out; the ifup script that
`-net tap,script=FILE` names is read through the READ function the caller
passes (None: no such file).  The shell is read by kvmagent.foreign.shellwords,
never run.  Whatever cannot be translated is a KvmagentError (exit status
6) naming the file, the line and the text."""

from __future__ import annotations

import posixpath
import re
from typing import Callable

from kvmagent import names
from kvmagent.config import values
from kvmagent.errors import config_error
from kvmagent.foreign.importtoml import GuestToml, Imported, excerpt, located_error
from kvmagent.foreign.kvmoptions import Arg, Drive, Net, Script, read_options
from kvmagent.foreign.shellwords import KEYWORDS, Command, Word, expand_fields, expand_word, parse

ReadFile = Callable[[str], "str | None"]

QEMU_BINARIES = frozenset({"kvm", "kvm-qemu", "qemu-kvm", "qemu-system-x86_64"})
# Commands that change how the rest of the script reads: not followed.
_STATEFUL = frozenset({"cd", "pushd", "popd", "source", ".", "eval", "set", "shift", "read",
                       "trap", "unset", "alias", "exec", "local", "declare", "typeset",
                       "readonly", "return"})
_BRIDGE_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}", re.ASCII)
_TAP = "\0tap"  # what $1 stands for in an ifup script
VIRTIO_MODULES = "virtio, virtio_ring, virtio_pci, virtio_blk, virtio_net"


# -- reading the script ----------------------------------------------------------


def qemu_command(commands: list[Command], file: str) -> tuple[str, list[Arg], list[str]]:
    """The one QEMU command of the script: (binary, its arguments expanded,
    notes on the other commands)."""
    variables: dict[str, str] = {}
    found: tuple[str, list[Arg]] | None = None
    notes: list[str] = []
    for cmd in commands:
        words = list(cmd.words)
        first = words[0].literal()
        if first in KEYWORDS:
            raise located_error(file, cmd.line, f"'{first}' (shell control flow, which the "
                                "importer cannot follow)", cmd.raw,
                                "keep one plain kvm command line in the script")
        if first == "export":
            words = words[1:]
        prefix: list[tuple[str, Word]] = []
        while words and (a := words[0].assignment()) is not None:
            prefix.append(a)
            words = words[1:]
        if not words:
            for var, w in prefix:
                variables[var] = expand_word(w, variables.get, file)
            continue
        command = expand_word(words[0], variables.get, file)
        if command == "exec" and len(words) > 1:
            words = words[1:]
            command = expand_word(words[0], variables.get, file)
        base = posixpath.basename(command)
        if base in QEMU_BINARIES:
            if found is not None:
                raise located_error(file, cmd.line, "a second QEMU command (one guest per "
                                    "import)", cmd.raw, "import one script per guest")
            if prefix:
                notes.append(f"Line {cmd.line}: the environment given to QEMU "
                             f"({', '.join(v for v, _ in prefix)}) is not kept.")
            if cmd.after == "&":
                notes.append("The script ran QEMU in the background ('&'); systemd "
                             "supervises it now.")
            args = [Arg(v, w.line, w.raw) for w in words[1:]
                    for v in expand_fields(w, variables.get, file)]
            found = (base, args)
            continue
        if base in _STATEFUL:
            raise located_error(file, cmd.line, f"'{base}' changes how the rest of the script "
                                "reads, which the importer cannot follow", cmd.raw)
        if cmd.after == "&":
            raise located_error(file, cmd.line, "a command in the background ('&')", cmd.raw)
        if base == "exit" and found is not None:
            continue
        when = "after QEMU started" if found else "before QEMU"
        notes.append(f"Line {cmd.line}: `{excerpt(cmd.raw, 60)}` ran {when}; kvmagent does "
                     "not run it: do by hand (or in an ExecStartPre= drop-in) what it did.")
    if found is None:
        raise config_error(f"{file}: no kvm, kvm-qemu, qemu-kvm or qemu-system-x86_64 "
                           "command in the script", "is this the guest's start script?")
    return found[0], found[1], notes


def ifup_bridge(text: str, file: str) -> tuple[str, int]:
    """The bridge an ifup script puts its tap ($1) on, and the line that
    says so: `brctl addif BRIDGE $1` or `ip link set [dev] $1 master BRIDGE`."""
    variables: dict[str, str] = {"1": _TAP}
    found: list[tuple[str, int, str]] = []
    for cmd in parse(text, file):
        words = list(cmd.words)
        first = words[0].literal()
        if first in KEYWORDS:
            raise located_error(file, cmd.line, f"'{first}' (shell control flow, which the "
                                "importer cannot follow)", cmd.raw)
        if all(w.assignment() for w in words):
            for w in words:
                var, value = w.assignment()  # type: ignore[misc]
                variables[var] = expand_word(value, variables.get, file)
            continue
        base = posixpath.basename(words[0].literal() or "")
        if base not in ("brctl", "ip"):
            continue
        args = [a for w in words[1:] for a in expand_fields(w, variables.get, file)]
        if base == "brctl" and len(args) == 3 and args[0] == "addif" and args[2] == _TAP:
            found.append((args[1], cmd.line, cmd.raw))
        elif base == "ip" and args[:2] == ["link", "set"] and _TAP in args and \
                "master" in args[:-1]:
            found.append((args[args.index("master") + 1], cmd.line, cmd.raw))
    if not found:
        raise config_error(f"{file}: the ifup script puts the tap on no bridge (no "
                           "`brctl addif BRIDGE $1` or `ip link set $1 master BRIDGE`)",
                           "give the bridge with --bridge BRIDGE")
    bridge, line, raw = found[0]
    for other, oline, oraw in found[1:]:
        if other != bridge:
            raise located_error(file, oline, f"a second bridge ({bridge} on line {line})",
                                oraw, "give the bridge with --bridge BRIDGE")
    if not _BRIDGE_RE.fullmatch(bridge):
        raise located_error(file, line, f"{bridge!r} is not a bridge name kvmagent accepts",
                            raw, "give the bridge with --bridge BRIDGE")
    return bridge, line


# -- the guest TOML ----------------------------------------------------------------


def import_kvm_script(text: str, file: str, *, name: str | None = None,
                      bridge: str | None = None,
                      read: ReadFile = lambda path: None) -> Imported:
    """The guest TOML for the start script TEXT (read from FILE).  NAME:
    the guest's name (default: the script's -name); BRIDGE: the bridge of
    every tap (default: the one its ifup script names, read with READ)."""
    binary, args, notes = qemu_command(parse(text, file), file)
    s = Script(file, binary, notes=notes)
    read_options(s, args)
    return _Render(s, read).guest(name, bridge)


class _Render:
    def __init__(self, s: Script, read: ReadFile) -> None:
        self.s = s
        self.read = read
        self.doc = GuestToml()
        self.warnings: list[str] = []

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def guest(self, name: str | None, bridge: str | None) -> Imported:
        s, doc = self.s, self.doc
        name = self.name(name)
        script = posixpath.basename(s.file)
        doc.header += [f"Guest {name}, imported from {script} by `kvmagent import kvm-script`; "
                       "each comment says which part of the script a value comes from, and "
                       "what was changed or left out."]
        doc.top.set("description", f"{name}, imported from {excerpt(script, 100)}")
        for key in ("cpus", "memory", "machine", "cpu", "accel", "uuid", "on_poweroff",
                    "on_reboot"):
            if key in s.top:
                value, note = s.top[key]
                doc.top.set(key, value, note)  # type: ignore[arg-type]
        for note in s.notes:
            doc.top.note(note)
        self.kernel()
        disks = self.disks()
        nics = self.nics(bridge)
        self.boot(disks, nics)
        self.console_and_display()
        if s.extra:
            doc.table("qemu").set("extra_args", [a for args, _ in s.extra for a in args],
                                  *(note for _, note in s.extra))
        for w in self.warnings:
            doc.header.append("To do: " + w)
        return Imported(name, doc.render(), tuple(self.warnings))

    def name(self, name: str | None) -> str:
        s = self.s
        if name is not None:
            if not names.valid_guest_name(name):
                raise config_error(f"--name {excerpt(name)!r} is not a valid guest name",
                                   names.GUEST_NAME_RULE)
            if s.name and s.name[0] != name:
                self.doc.top.note(f"Named {name} (--name); the script said -name "
                                  f"{excerpt(s.name[0])}.")
            return name
        if s.name is None:
            raise config_error(f"{s.file}: the script gives the guest no -name",
                               "name the guest with --name NAME")
        given, arg = s.name
        if not names.valid_guest_name(given):
            raise s.fail(arg, f"-name {given!r} is not a valid guest name "
                         f"({names.GUEST_NAME_RULE})", "give the name with --name NAME")
        return given

    def kernel(self) -> None:
        s = self.s
        if not s.kernel:
            return
        if "image" not in s.kernel:
            _, arg = next(iter(s.kernel.values()))
            raise s.fail(arg, "-initrd or -append without -kernel")
        table = self.doc.table("kernel")
        image, _ = s.kernel["image"]
        note = "-kernel: the guest boots this kernel directly (no boot loader)."
        if image.startswith("/boot/") and not image.startswith("/boot/kvm/"):
            note += (" It is the host's own, straight out of /boot: a kernel upgrade of the "
                     "host removes it and the guest no longer boots; copy it (and the initrd) "
                     "to /boot/kvm/NAME/ and point image and initrd there.")
            self.warn(f"the kernel {image} is the host's own; copy it to /boot/kvm/ (see "
                      "[kernel] in the guest file).")
        table.set("image", image, note)
        if "initrd" in s.kernel:
            table.set("initrd", s.kernel["initrd"][0], "-initrd.")
        if "cmdline" in s.kernel:
            cmdline = s.kernel["cmdline"][0]
            table.set("cmdline", cmdline, "-append, unchanged: " + _root_note(
                cmdline, [d for d in s.drives if d.media == "disk"]))

    def disks(self) -> list[Drive]:
        s = self.s
        slots: dict[int, Drive] = {}
        for d in s.drives:
            if d.bus != "ide":
                continue
            if d.index is None:
                free = [i for i in range(4) if i not in slots]
                if not free:
                    raise s.fail(d.arg, "a fifth IDE drive: the pc machine has hda to hdd")
                d.index = free[0]
            if d.index in slots:
                raise s.fail(d.arg, f"IDE slot {d.index} (hd{'abcd'[d.index]}) is taken "
                             f"by {excerpt(slots[d.index].arg.raw, 60)}")
            slots[d.index] = d
        ide = [slots[i] for i in sorted(slots)]
        ordered = ide + [d for d in s.drives if d.bus != "ide"]
        boot_set = False
        for n, d in enumerate(ordered):
            self.disk(d, n, ide, boot_set)
            boot_set = boot_set or d.boot == "on" and d.bus != "ide" and not s.kernel
        return ordered

    def disk(self, d: Drive, n: int, ide: list[Drive], boot_set: bool) -> None:
        e = self.doc.entry("disk")
        e.note(f"Line {d.arg.line}: {excerpt(d.arg.raw, 150)}")
        e.set("path", d.path)
        if d.bus == "ide":
            name = "hd" + "abcd"[d.index or 0]
            note = f"IDE, as the script had it ({name})."
            if ide.index(d) != d.index:
                note += (f" kvmagent fills the IDE slots in order, so this is the "
                         f"{'first second third fourth'.split()[ide.index(d)]} IDE drive "
                         f"(hd{'abcd'[ide.index(d)]} to an old kernel; libata kernels name "
                         "drives by the order they find them anyway).")
            e.set("bus", "ide", note)
        else:
            e.set("bus", d.bus, f"if={d.bus}" + (
                f": the guest's initramfs needs the virtio modules ({VIRTIO_MODULES})."
                if d.bus == "virtio" else "."))
        if d.media == "cdrom":
            e.set("media", "cdrom", f"{d.spelling}: a CD-ROM (read-only).")
        if d.format in ("qcow2",):
            e.set("format", "qcow2", "format=qcow2.")
        elif d.format is None and d.media == "disk" and not d.path.startswith("/dev/"):
            e.note('QEMU guessed the image format; kvmagent never does (a guest could '
                   'make its raw disk look like qcow2): raw, unless you write '
                   'format = "qcow2".')
        if d.cache:
            e.set("cache", d.cache, f"cache={d.cache}.")
        if d.readonly and d.media == "disk":
            e.set("readonly", True, "readonly=on.")
        if d.boot == "on" and d.bus != "ide" and not self.s.kernel and not boot_set:
            e.set("boot", True, f"boot=on: boot from this {d.bus} drive (kvm's extboot "
                  "once; bootindex today).")
        elif d.boot:
            e.note(f"boot={d.boot} dropped: in 2008's kvm it only made a virtio or SCSI drive "
                   "bootable (extboot); " + ("the guest boots its kernel directly (-kernel)."
                                             if self.s.kernel else
                                             "the boot order is -boot's (boot = ...)."))

    def boot(self, disks: list[Drive], nics: int) -> None:
        s, top = self.s, self.doc.top
        if s.boot is None:
            return
        order, arg = s.boot
        if s.kernel:
            top.note(f"-boot {excerpt(arg.value)} dropped: the guest boots its kernel "
                     "directly (-kernel).")
            return
        present = {"cdrom" if d.media == "cdrom" else "disk" for d in disks}
        present |= {"network"} if nics else set()
        kept = [c for c in order if c in present]
        rest = [c for c in ("disk", "cdrom") if c in present and c not in kept]
        note = f"-boot {excerpt(arg.value)}"
        if len(kept) < len(order):
            note += f" ({', '.join(c for c in order if c not in kept)}: no such device, left out)"
        if rest:
            note += f", then {' and '.join(rest)}, as QEMU's BIOS falls back to them"
        if kept or rest:
            top.set("boot", kept + rest, note + ".")
        else:
            top.note(note + ": no such device; boot left as kvmagent's default.")

    def nics(self, bridge: str | None) -> int:
        s = self.s
        nets = s.nets
        none = [n for n in nets if n.kind == "none"]
        if none:
            others = [n for n in nets if n.kind != "none"]
            if others:
                raise s.fail(others[0].arg, "-net none and another -net in one script")
            self.doc.top.note("-net none: no network at all (without it QEMU gave the guest "
                              "user-mode NAT): no [[nic]].")
            return 0
        if not nets:
            e = self.doc.entry("nic")
            e.note("The script has no -net: QEMU gave the guest a NIC on user-mode NAT "
                   "(enough to phone home, as the seed warns); kept as such. Remove this "
                   "[[nic]] for no network (-net none), or give it a bridge.")
            e.set("mode", "user")
            e.set("model", "rtl8139", "The NIC model 2008's kvm gave when none was named "
                  "(QEMU's today is e1000); the guest keeps the driver it knew.")
            return 1
        count = 0
        for vlan in dict.fromkeys(n.vlan for n in nets):
            here = [n for n in nets if n.vlan == vlan]
            cards = [n for n in here if n.kind == "nic"]
            backs = [n for n in here if n.kind != "nic"]
            if len(cards) > 1 or len(backs) > 1:
                extra = (cards[1:] + backs[1:])[0]
                raise s.fail(extra.arg, f"a second -net {extra.kind} on vlan {vlan} (QEMU "
                             "joined them by a hub, which kvmagent has no equivalent for)")
            if not backs:
                raise s.fail(cards[0].arg, f"-net nic on vlan {vlan} with no -net tap or user: "
                             "the NIC would be connected to nothing")
            if not cards:
                raise s.fail(backs[0].arg, f"-net {backs[0].kind} on vlan {vlan} with no "
                             "-net nic")
            self.nic(cards[0], backs[0], bridge)
            count += 1
        return count

    def nic(self, card: Net, back: Net, bridge: str | None) -> None:
        s = self.s
        e = self.doc.entry("nic")
        e.note(f"Line {card.arg.line}: {excerpt(card.arg.raw, 120)}; line {back.arg.line}: "
               f"{excerpt(back.arg.raw, 120)}")
        if back.kind == "user":
            e.set("mode", "user", "-net user: QEMU's user-mode NAT.")
            if "hostname" in back.opts:
                e.note("hostname= dropped (kvmagent has no key for it).")
        else:
            br, note = self.tap_bridge(back, bridge)
            e.set("bridge", br, note)
            if "ifname" in back.opts:
                e.note(f"ifname={back.opts['ifname']} dropped: kvmagent names the tap "
                       "kvm-NAME-N.")
        if "macaddr" in card.opts:
            try:
                mac = values.parse_mac(card.opts["macaddr"])
            except ValueError as err:
                raise s.fail(card.arg, f"macaddr={card.opts['macaddr']}: {err}") from None
            e.set("mac", mac, "macaddr=, as the guest knows it.")
        else:
            e.note("No macaddr=: QEMU gave 52:54:00:12:34:56 to every such guest; kvmagent "
                   "derives one from the guest's name.")
        model = card.opts.get("model")
        if model is None:
            e.set("model", "rtl8139", "No model=: 2008's kvm gave an rtl8139 (QEMU's "
                  "default today is e1000); the guest keeps the driver it knew.")
        elif model in ("virtio", "e1000", "rtl8139"):
            e.set("model", model, f"model={model}.")
        else:
            raise s.fail(card.arg, f"model={model}: kvmagent's NICs are virtio, e1000 or "
                         "rtl8139", "change the model in the script (the guest needs the "
                         "driver of the new one)")

    def tap_bridge(self, back: Net, bridge: str | None) -> tuple[str, str]:
        s = self.s
        if bridge is not None:
            return bridge, "--bridge: kvmagent puts the tap on it itself (no ifup script)."
        script = back.opts.get("script")
        if script in ("no", ""):
            raise s.fail(back.arg, "script=no: the tap was put on no bridge by QEMU, and "
                         "the script does not say which one", "give the bridge with "
                         "--bridge BRIDGE")
        how = "its ifup script"
        if script is None:
            script = "/etc/qemu-ifup" if s.binary == "qemu-system-x86_64" else "/etc/kvm/kvm-ifup"
            how = "QEMU's default ifup script"
        path = script if script.startswith("/") else posixpath.join(
            posixpath.dirname(s.file), script)
        text = self.read(path)
        if text is None:
            raise s.fail(back.arg, f"the bridge is named in {how} {path}, which does not "
                         "exist here", "give the bridge with --bridge BRIDGE")
        br, line = ifup_bridge(text, path)
        return br, (f"The bridge {how} {path} put the tap on (line {line}); kvmagent puts "
                    "the tap on it itself: no ifup script.")

    def console_and_display(self) -> None:
        s = self.s
        console = self.doc.table("console")
        if s.serial is not None and s.serial[0] == "none":
            console.set("serial", False, "-serial none.")
        elif s.serial is not None:
            spec = s.serial[0]
            console.note(f"-serial {excerpt(spec)}: kvmagent keeps the serial console "
                         "itself (journalctl -u kvm@NAME, kvmagent console NAME)" +
                         ("; QEMU's monitor (mon:) is not on it, kvmagent talks QMP."
                          if spec.startswith("mon:") else "."))
        elif s.nographic:
            console.note("-nographic put the serial console on the terminal; kvmagent keeps "
                         "it (journalctl -u kvm@NAME, kvmagent console NAME).")
        display = self.doc.table("display")
        for note in s.display_notes:
            display.note(note)
        if s.vnc is not None:
            vnc = s.vnc[0]
            display.set("vnc", vnc, f"-vnc {vnc}" + (
                ": on every address, as before; \"127.0.0.1" + vnc + "\" keeps it local."
                if vnc.startswith(":") else "."))
        elif s.nographic:
            display.note("-nographic: no screen, as before.")
        else:
            display.note('The script opened QEMU\'s window (SDL), and closing it killed the '
                         'guest; a service has no window, so the guest runs headless. For a '
                         'screen: vnc = "127.0.0.1:1" (a display no other guest uses).')
            self.warn("the guest had a window (SDL) and is headless now; for a screen set "
                      "[display] vnc.")


def _root_note(cmdline: str, disks: list[Drive]) -> str:
    m = re.search(r"(?:^|\s)root=/dev/([hsv]d)([a-z])([0-9]*)", cmdline)
    if not m:
        return "as the guest has it."
    kind, letter, part = m.groups()
    rest = f"{letter}{part}"
    said = f"root=/dev/{kind}{rest} left as the guest has it"
    if kind == "hd":
        return (said + ": the old IDE driver's name for the disk; a kernel with libata calls "
                f"it /dev/sd{rest}, and with bus = \"virtio\" it would be /dev/vd{rest} (with "
                f"the virtio modules, {VIRTIO_MODULES}, in the initramfs).")
    if kind == "sd":
        return said + f"; with bus = \"virtio\" it would be /dev/vd{rest}."
    return said + "."
