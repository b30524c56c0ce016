"""`kvmagent import xen`: a Xen xm/xl domain configuration -> the
equivalent guest TOML, with a comment for every choice made and, for a
paravirtual (PV) guest, what the guest itself needs changed to boot under
KVM (its disks' names, its console, the virtio modules, its boot loader).
The file is read, never run, by kvmagent.foreign.xenparse.  Pure."""

from __future__ import annotations

import posixpath
import re
from typing import Callable

from kvmagent import names
from kvmagent.config import values
from kvmagent.errors import KvmagentError, config_error
from kvmagent.foreign.importtoml import (GuestToml, Imported, Section, TomlValue, excerpt,
                                         located_error)
from kvmagent.foreign.xenparse import Setting, XenDisk, parse_disk, parse_vif, read_settings

_BRIDGE = re.compile(r"[A-Za-z0-9_.-]{1,15}", re.ASCII)
VIRTIO_MODULES = "virtio, virtio_ring, virtio_pci, virtio_blk, virtio_net"
_VIF_DROPPED = {"vifname": "kvmagent names the tap kvm-NAME-N",
                "ip": "Xen's vif-bridge let only this address out; kvmagent has no key for it",
                "rate": "kvmagent has no key for a rate limit",
                "type": "the NIC is the model below",
                "backend": "the network runs in the host"}


def import_xen(text: str, file: str, *, name: str | None = None) -> Imported:
    """The guest TOML for the Xen domain configuration TEXT (read from FILE)."""
    settings, notes = read_settings(text, file)
    return _Xen(file, settings, notes).guest(name)


class _Xen:
    def __init__(self, file: str, settings: dict[str, Setting], notes: list[str]) -> None:
        self.file = file
        self.s = settings
        self.doc = GuestToml()
        self.warnings: list[str] = []
        for note in notes:
            self.doc.top.note(note)
        kind = self.text("type", "") or self.text("builder", "") or ""
        if kind not in ("", "linux", "pv", "hvm", "generic", "pvh"):
            raise self.fail("type" if "type" in settings else "builder",
                            f"'{excerpt(kind, 20)}': expected pv or hvm")
        self.hvm = kind == "hvm"
        self.renames: dict[str, str] = {}  # Xen device -> KVM device (PV)

    def fail(self, key: str, reason: str, hint: str | None = None) -> KvmagentError:
        st = self.s[key]
        return located_error(self.file, st.line, f"{key}: {reason}", st.text, hint)

    def failer(self, key: str) -> Callable[[str], Exception]:
        return lambda reason: self.fail(key, reason)

    def text(self, key: str, default: str | None = None) -> str | None:
        if key not in self.s:
            return default
        v = self.s[key].value
        if not isinstance(v, str):
            raise self.fail(key, "expected a string")
        return v

    def number(self, key: str) -> int | None:
        if key not in self.s:
            return None
        v = self.s[key].value
        if isinstance(v, str) and v.strip().isdigit() and v.isascii():
            return int(v)  # xm takes '1024' as well (xen-tools writes it so)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise self.fail(key, "expected a whole number")
        return v

    def flag(self, key: str) -> bool:
        v = self.s[key].value if key in self.s else 0
        if v not in (0, 1, True, False, "0", "1"):
            raise self.fail(key, "expected 0 or 1")
        return v in (1, True, "1")

    def strings(self, key: str) -> list[str]:
        v = self.s[key].value if key in self.s else []
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self.fail(key, "expected a list of strings")
        return [x for x in v if isinstance(x, str)]

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def extra(self, args: list[str], note: str) -> None:
        qemu = self.doc.table("qemu")
        before: TomlValue = qemu.items[0][1] if qemu.items else []
        notes = qemu.items[0][2] if qemu.items else []
        assert isinstance(before, list)
        qemu.set("extra_args", before + args, *notes, note)

    def guest(self, name: str | None) -> Imported:
        doc, top = self.doc, self.doc.top
        name = self.name(name)
        config = posixpath.basename(self.file)
        doc.header.append(f"Guest {name}, imported from the Xen configuration {config} by "
                          "`kvmagent import xen` (a " + ("fully virtualised (HVM)"
                                                         if self.hvm else "paravirtual (PV)")
                          + " guest); each comment says where a value comes from and what "
                          "was changed or left out.")
        top.set("description", f"{name}, imported from {excerpt(config, 100)}")
        vcpus = self.number("vcpus")
        if vcpus is not None:
            top.set("cpus", vcpus, "vcpus.")
        if "maxvcpus" in self.s:
            top.note("maxvcpus dropped: kvmagent has no CPU hotplug.")
        memory = self.number("memory")
        if memory is not None:
            top.set("memory", values.format_size(memory << 20), "memory (MiB).")
        maxmem = self.number("maxmem")
        if maxmem and memory and maxmem > memory:
            top.note(f"maxmem = {maxmem} dropped: kvmagent has no balloon; the guest has "
                     "memory, fixed.")
        if "uuid" in self.s:
            top.set("uuid", self.text("uuid") or "", "uuid: the guest keeps its UUID.")
        self.lifecycle()
        if "pci" in self.s and self.s["pci"].value:
            raise self.fail("pci", "PCI passthrough, which kvmagent does not do")
        self.cpus()
        disks = self.disks()
        self.kernel(disks)
        nics = self.nics()
        self.boot(disks, nics)
        self.display()
        for w in self.warnings:
            doc.header.append("To do: " + w)
        return Imported(name, doc.render(), tuple(self.warnings))

    def name(self, name: str | None) -> str:
        given = self.text("name")
        if name is not None:
            if not names.valid_guest_name(name):
                raise config_error(f"--name {excerpt(name)!r} is not a valid guest name",
                                   names.GUEST_NAME_RULE)
            if given and given != name:
                self.doc.top.note(f"Named {name} (--name); Xen's name was {excerpt(given)}.")
            return name
        if given is None:
            raise config_error(f"{self.file}: the configuration has no name",
                               "name the guest with --name NAME")
        if not names.valid_guest_name(given):
            raise self.fail("name", f"{given!r} is not a valid guest name "
                            f"({names.GUEST_NAME_RULE})", "give the name with --name NAME")
        return given

    def lifecycle(self) -> None:
        top = self.doc.top
        poweroff = self.text("on_poweroff", "destroy")
        if poweroff == "preserve":
            top.set("on_poweroff", "keep", "on_poweroff = \"preserve\": QEMU stays when the "
                    "guest powers off.")
        elif poweroff != "destroy":
            top.note(f"on_poweroff = \"{excerpt(poweroff or '', 20)}\" dropped: a guest that "
                     "powers off ends its unit.")
        reboot = self.text("on_reboot", "restart")
        if reboot in ("destroy", "preserve"):
            top.set("on_reboot", "stop", f"on_reboot = \"{reboot}\": a guest reboot ends "
                    "the guest's run as a poweroff would.")
        elif reboot != "restart":
            top.note(f"on_reboot = \"{excerpt(reboot or '', 20)}\" dropped: the guest "
                     "reboots in place (on_reboot = \"restart\").")
        crash = self.text("on_crash", "restart")
        top.note(f"on_crash = \"{excerpt(crash or '', 20)}\": a guest kernel panic ends QEMU "
                 "with a failure, which systemd restarts (Restart=on-failure)" +
                 ("." if crash == "restart" else "; kvmagent has no key for another choice."))

    def cpus(self) -> None:
        if "cpus" not in self.s:
            return
        v = self.s["cpus"].value
        if v == "all":
            return
        if isinstance(v, str) and "^" in v:
            raise self.fail("cpus", "CPU exclusion (^N) is not one the importer translates",
                            "write the CPUs the guest may use, e.g. \"0-3\"")
        try:
            cpus = values.parse_cpu_list(v)
        except ValueError as e:
            raise self.fail("cpus", str(e)) from None
        self.doc.table("resources").set("cpu_affinity", values.format_cpu_list(cpus),
                                        "cpus: the host CPUs the guest runs on.")

    def disks(self) -> list[XenDisk]:
        if "disk" not in self.s:
            return []
        out: list[XenDisk] = []
        for spec in self.strings("disk"):
            d = parse_disk(spec, self.failer("disk"))
            if d is None:
                self.doc.top.note(f"disk '{excerpt(spec, 40)}': an empty CD-ROM drive, left "
                                  "out (kvmagent's drives have an image).")
            else:
                out.append(d)
        ide = sorted((d for d in out if self.bus(d) == "ide"), key=lambda d: d.vdev)
        if len(ide) > 4:
            raise self.fail("disk", "more than four IDE drives")
        ordered = ide + [d for d in out if self.bus(d) != "ide"]
        virtio = 0
        for d in ordered:
            e = self.doc.entry("disk")
            e.note(f"disk '{excerpt(d.spec, 120)}'")
            e.set("path", d.target)
            bus = self.bus(d)
            xen = f"/dev/{d.vdev}{d.part}"
            if bus == "virtio":
                kvm = "/dev/vd" + "abcdefghijklmnopqrstuvwxyz"[virtio % 26]
                virtio += 1
                self.renames[xen] = kvm
                if d.part:
                    e.set("bus", "virtio", f"{d.vdev}{d.part} was a partition of a PV disk: "
                          "the volume holds a file system, not a partition table, so under "
                          f"KVM it is the whole disk {kvm}.")
                else:
                    e.set("bus", "virtio", f"Paravirtual {d.vdev} becomes virtio: the guest "
                          f"sees {kvm} (partitions {kvm}1, ...).")
            elif bus == "ide":
                e.set("bus", "ide", f"{d.vdev}: an emulated IDE drive, as Xen gave the HVM "
                      "guest" + ("." if d.cdrom else "; bus = \"virtio\" is faster once the "
                                 "guest has virtio drivers."))
            else:
                e.set("bus", "scsi", f"{d.vdev}: SCSI, as Xen gave the HVM guest.")
            if d.cdrom:
                e.set("media", "cdrom", ":cdrom.")
            elif d.readonly:
                e.set("readonly", True, "access r.")
            if d.format == "qcow2":
                e.set("format", "qcow2", "qcow2 image.")
        return ordered

    def bus(self, d: XenDisk) -> str:
        if d.cdrom:
            return "ide"
        if not self.hvm:
            return "virtio"
        return "scsi" if d.vdev.startswith("sd") else "ide"

    def kernel(self, disks: list[XenDisk]) -> None:
        kernel, loader = self.text("kernel"), self.text("bootloader")
        if kernel and "hvmloader" in kernel:
            self.doc.top.note("kernel = hvmloader dropped: it was Xen's BIOS; QEMU has its own.")
            kernel = None
        if loader:
            if posixpath.basename(loader) != "pygrub":
                raise self.fail("bootloader", f"'{excerpt(loader, 40)}': the importer "
                                "translates pygrub only")
            part = [d for d in disks if d.part and not d.cdrom]
            self.doc.top.note("bootloader = pygrub dropped: pygrub read the guest's GRUB menu "
                              "from its disk; under KVM the BIOS boots the disk.")
            self.warn("pygrub is gone: the guest's disk needs a boot loader in its MBR "
                      "(grub-install in the guest), or boot a kernel copied out of the guest "
                      "(its vmlinuz and initrd.img, e.g. in /boot/kvm/NAME/, as [kernel] image "
                      "and initrd)" + (
                          f"; {part[0].vdev}{part[0].part} is a partition without a "
                          "partition table, which no BIOS boots: copy the kernel out."
                          if part else "."))
        if not kernel:
            if not self.hvm and not loader:
                raise config_error(f"{self.file}: a PV guest with neither kernel nor "
                                   "bootloader", "add kernel = ... or bootloader = \"pygrub\"")
            for key in ("ramdisk", "root", "extra", "cmdline"):
                if key in self.s:
                    self.doc.top.note(f"{key} dropped: the guest boots from its disk.")
            return
        table = self.doc.table("kernel")
        table.set("image", kernel, "kernel: booted directly, as Xen did.")
        if "xen" in posixpath.basename(kernel):
            self.warn(f"{kernel} looks like a Xen-only kernel: boot one with the virtio "
                      "drivers (the guest's own, copied to /boot/kvm/NAME/).")
        ramdisk = self.text("ramdisk")
        if ramdisk:
            table.set("initrd", ramdisk, "ramdisk.")
        self.cmdline(table)

    def cmdline(self, table: Section) -> None:
        root, extra = self.text("root"), self.text("extra")
        given = self.text("cmdline")
        line = given if given is not None else " ".join(
            x for x in ((f"root={root}" if root else None), extra) if x)
        notes = ["cmdline." if given is not None else "root= and extra, joined as Xen did."]
        words = line.split()
        for i, w in enumerate(words):
            key, eq, val = w.partition("=")
            if self.hvm or not eq:
                continue
            kvm = self.rename(val) if key == "root" else val
            if kvm != val:
                words[i] = f"root={kvm}"
                notes.append(f"root={val} becomes root={kvm}: the disk's name under KVM.")
            if key == "console" and val.startswith(("hvc", "xvc")):
                words[i] = "console=ttyS0,115200"
                notes.append(f"console={val} (Xen's console) becomes ttyS0, kvmagent's serial "
                             "console.")
        if not self.hvm:
            if self.renames:
                self.warn("the guest's /etc/fstab names its disks as Xen did; under KVM: " +
                          ", ".join(f"{x} is {k}" for x, k in self.renames.items()) +
                          " (partitions keep their numbers), or use LABEL= or UUID=.")
            if not any(w.startswith("console=") for w in words):
                words.append("console=ttyS0,115200")
                notes.append("console=ttyS0,115200 added: a PV guest wrote to Xen's console "
                             "(hvc0); under KVM that is the serial port kvmagent keeps.")
            self.warn("a getty on hvc0 (in /etc/inittab, or serial-getty@hvc0) must move to "
                      "ttyS0.")
            self.warn(f"the guest's initramfs needs the virtio modules ({VIRTIO_MODULES}): "
                      "add them to /etc/initramfs-tools/modules and run update-initramfs -u.")
        if words:
            table.set("cmdline", " ".join(words), *notes)

    def rename(self, dev: str) -> str:
        if dev in self.renames:
            return self.renames[dev]
        m = re.fullmatch(r"(/dev/(?:xvd|hd|sd)[a-z]+)([0-9]+)", dev)
        if m and m.group(1) in self.renames:
            return self.renames[m.group(1)] + m.group(2)
        return dev

    def nics(self) -> int:
        if "vif" not in self.s:
            return 0
        specs = self.strings("vif")
        for spec in specs:
            vif = parse_vif(spec, self.failer("vif"))
            e = self.doc.entry("nic")
            e.note(f"vif '{excerpt(spec, 120)}'")
            if "bridge" in vif:
                if not _BRIDGE.fullmatch(vif["bridge"]):
                    raise self.fail("vif", f"bridge '{excerpt(vif['bridge'], 30)}' is not a "
                                    "bridge name kvmagent accepts")
                e.set("bridge", vif["bridge"], "bridge: the same bridge on this host" + (
                    " (Xen's own name: create it with `kvmagent bridge ensure "
                    f"{vif['bridge']}`, or rename)." if vif["bridge"].startswith("xenbr")
                    else "."))
            else:
                e.note("No bridge=: the host's default bridge (kvmagent.toml).")
            if "mac" in vif:
                try:
                    e.set("mac", values.parse_mac(vif["mac"]), "mac, as the guest knows it.")
                except ValueError as err:
                    raise self.fail("vif", f"mac={excerpt(vif['mac'], 30)}: {err}") from None
            else:
                e.note("No mac=: Xen chose a random one at every start; kvmagent derives a "
                       "stable one from the name.")
            model = vif.get("model")
            if self.hvm and model in (None, "rtl8139", "e1000", "virtio"):
                e.set("model", model or "rtl8139", f"model={model}." if model else
                      "No model=: Xen's emulated NIC was an rtl8139.")
            elif self.hvm:
                raise self.fail("vif", f"model={excerpt(model or '', 20)}: kvmagent's NICs are "
                                "virtio, e1000 or rtl8139")
            else:
                e.set("model", "virtio", "A paravirtual NIC becomes virtio (virtio_net).")
            script = vif.get("script", "vif-bridge")
            if posixpath.basename(script) != "vif-bridge":
                raise self.fail("vif", f"script={excerpt(script, 40)}: the importer "
                                "translates bridged vifs only")
            for key, why in _VIF_DROPPED.items():
                if key in vif:
                    e.note(f"{key}={excerpt(vif[key], 40)} dropped: {why}.")
        return len(specs)

    def boot(self, disks: list[XenDisk], nics: int) -> None:
        if not self.hvm or "boot" not in self.s or self.doc.table("kernel").items:
            return
        letters = self.text("boot") or ""
        order: list[str] = []
        for c in letters:
            cls = {"c": "disk", "d": "cdrom", "n": "network"}.get(c)
            if cls is None:
                raise self.fail("boot", f"boot device '{c}': kvmagent boots from c (disk), "
                                "d (cdrom) or n (network)")
            present = (nics > 0 if cls == "network" else
                       any(d.cdrom == (cls == "cdrom") for d in disks))
            if present and cls not in order:
                order.append(cls)
        if order:
            self.doc.top.set("boot", order, f"boot = \"{excerpt(letters, 10)}\".")

    def display(self) -> None:
        display = self.doc.table("display")
        vfb = self.strings("vfb") if "vfb" in self.s else []
        fb = dict(i.strip().partition("=")[::2] for s in vfb[:1] for i in s.split(","))
        vnc = self.flag("vnc") or fb.get("type") == "vnc" or fb.get("vnc") == "1"
        if vnc:
            listen = self.text("vnclisten") or fb.get("vnclisten") or "127.0.0.1"
            number = self.number("vncdisplay")
            number = number if number is not None else int(fb.get("vncdisplay", "0") or 0)
            display.set("vnc", f"{listen}:{number}", "vnc" + (
                "" if "vncdisplay" in self.s or "vncdisplay" in fb else
                ": Xen chose a free display; kvmagent needs a fixed one, one no other guest "
                "uses") + ".")
            if "keymap" in self.s:
                self.extra(["-k", self.text("keymap") or ""], "keymap: the VNC keyboard layout.")
        elif self.flag("sdl"):
            display.note("sdl = 1 dropped: a service has no window; for a screen set vnc.")
        if "serial" in self.s:
            self.doc.table("console").note("serial: kvmagent keeps the serial console itself "
                                           "(journalctl -u kvm@NAME, kvmagent console NAME).")
        if self.flag("localtime"):
            self.extra(["-rtc", "base=localtime"],
                       "localtime: the guest's clock runs in local time (no key for it).")
        for key in ("usb", "usbdevice"):
            if key in self.s:
                display.note(f"{key} dropped: a guest with a VNC display gets a USB tablet.")
