"""The install run of a guest (`kvmagent install NAME --iso FILE`): the
guest's own configuration with an overlay, never written anywhere.  Pure.

The overlay adds the ISO as a read-only CD-ROM drive and puts the CD-ROM
class first in the boot order, as the hand-written scripts' `-cdrom x.iso
-boot d` did; a guest that boots a kernel directly ([kernel]) boots from
the CD-ROM instead (no -kernel), and a guest that powers off or reboots
ends the run (on_poweroff = "keep" does not apply; on_reboot = "stop"), so
that an installer's final reboot does not boot the CD again.  `--vnc ADDR` gives the run a VNC
display.  The unit that runs it (kvm-oneoff@NAME.service) passes the same
ISO and display to `kvmagent run --install ISO [--vnc ADDR] NAME`, whose
planner makes the same guest of them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kvmagent.config.guests import IDE_SLOTS
from kvmagent.config.model import (BootClass, Bus, Disk, Display, Format, Guest, Media,
                                   OnPoweroff, OnReboot)
from kvmagent.config.schema import parse_vnc
from kvmagent.errors import ExitStatus, KvmagentError

VNC_HINT = ('--vnc takes "ADDRESS:DISPLAY" (e.g. "127.0.0.1:1", port 5901) or '
            '"unix:/PATH"')


def check_vnc(value: str) -> str:
    """--vnc ADDR as [display] vnc would take it; a usage error (exit 2) otherwise."""
    try:
        return parse_vnc(value)
    except ValueError as e:
        raise KvmagentError(f"--vnc {value!r}: {e}", VNC_HINT, ExitStatus.USAGE) from None


def install_guest(guest: Guest, iso: Path, vnc: str | None = None) -> tuple[Guest, list[str]]:
    """GUEST as its install run boots it, and what differs from its own
    configuration besides the CD-ROM (notes for the admin).  ISO: an
    absolute path (the caller resolves it); VNC: checked by check_vnc()."""
    notes: list[str] = []
    disks = list(guest.disks)
    same = [d for d in disks if d.path == iso]
    if same and same[0].media is not Media.CDROM:
        raise KvmagentError(
            f"{guest.origin_of(f'disk[{same[0].index}].path')}: {iso} is disk[{same[0].index}] "
            f"of guest {guest.name}, not a CD-ROM", "attach the ISO once: give --iso another "
            "file, or remove it from the guest's [[disk]] tables", ExitStatus.USAGE)
    # The install CD is the one CD-ROM to boot from: the guest's own keep
    # their place but lose boot = true.
    disks = [dataclasses.replace(d, boot=None) if d.media is Media.CDROM and d.boot else d
             for d in disks]
    if same:
        cd = disks[same[0].index] = dataclasses.replace(disks[same[0].index], boot=True)
    else:
        # IDE: every installer's kernel and every BIOS reads an IDE CD-ROM;
        # SCSI (virtio-scsi) where the guest's IDE slots are all taken.
        ide = sum(1 for d in disks if d.bus is Bus.IDE)
        full = ide >= IDE_SLOTS["q35" if "q35" in guest.machine else "pc"]
        cd = Disk(index=len(disks), path=iso, bus=Bus.SCSI if full else Bus.IDE,
                  media=Media.CDROM, format=Format.RAW, readonly=True, boot=True)
        disks.append(cd)
        if full:
            notes.append(f"the guest's IDE slots are all taken: the ISO is a SCSI CD-ROM "
                         f"(virtio-scsi), disk[{cd.index}]")
    boot = (BootClass.CDROM, *(b for b in guest.boot if b is not BootClass.CDROM))
    if BootClass.DISK not in boot and any(d.boot_class is BootClass.DISK for d in disks):
        boot += (BootClass.DISK,)
    if guest.kernel is not None:
        notes.append(f"guest {guest.name} boots a kernel directly ([kernel] in "
                     f"{guest.origin_of('kernel.image')}); the install run boots from the "
                     "CD-ROM instead (no -kernel). Once the installed system has a boot "
                     "loader of its own, remove [kernel] to boot it from its disk")
    if guest.on_poweroff is OnPoweroff.KEEP:
        notes.append('on_poweroff = "keep" does not apply: the install run ends when the '
                     "guest powers off")
    display = guest.display if vnc is None else Display(vnc=vnc)
    return dataclasses.replace(guest, disks=tuple(disks), boot=boot, boot_explicit=True,
                               kernel=None, on_poweroff=OnPoweroff.STOP,
                               on_reboot=OnReboot.STOP,
                               display=display), notes
