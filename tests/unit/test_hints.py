"""A hint says what helps: for each of the guest checks whose hint was
wrong or missing, the hint as given, and the guest file changed as the
hint says loads (so following it really helps)."""

from __future__ import annotations

import pytest

from kvmagent.errors import ExitStatus, KvmagentError

KERNEL = '[kernel]\nimage = "/boot/vmlinuz"\ncmdline = "root=/dev/vda ro"\n'
DISK = '[[disk]]\npath = "/x"\n'
CDROM = '[[disk]]\npath = "/c.iso"\nbus = "ide"\nmedia = "cdrom"\n'
IDE = '[[disk]]\npath = "/d{i}"\nbus = "ide"\n'

# (id, guest TOML, the key in the message, the hint, TOML changed as the hint says)
CASES = [
    ("boot-true-with-kernel", KERNEL + DISK + "boot = true\n", "disk[0].boot",
     "remove boot = true (the kernel finds its root file system by [kernel] cmdline, "
     "root=...), or remove [kernel] to boot from the drive's own boot loader",
     [KERNEL + DISK, DISK + "boot = true\n"]),
    ("boot-true-not-listed", 'boot = ["disk"]\n' + DISK + CDROM + "boot = true\n",
     "disk[1].boot", 'add "cdrom" to boot, or remove boot = true',
     ['boot = ["disk", "cdrom"]\n' + DISK + CDROM + "boot = true\n",
      'boot = ["disk"]\n' + DISK + CDROM]),
    ("boot-true-twice", DISK + "boot = true\n" + DISK.replace("/x", "/y") + "boot = true\n",
     "disk[1].boot", "remove boot = true from all disk drives but the one to boot from",
     [DISK + "boot = true\n" + DISK.replace("/x", "/y")]),
    ("boot-lists-missing-class", 'boot = ["cdrom", "disk"]\n' + DISK, "boot",
     'remove "cdrom" from boot, or add a [[disk]] with media = "cdrom"',
     ['boot = ["disk"]\n' + DISK, 'boot = ["cdrom", "disk"]\n' + DISK + CDROM]),
    ("disk-twice", DISK + DISK, "disk[1].path",
     "remove one of the two [[disk]] tables (disk[0] or disk[1]): one image attached twice "
     "would be corrupted", [DISK]),
    ("mac-twice", '[[nic]]\nmac = "52:54:00:00:00:01"\n[[nic]]\nmac = "52:54:00:00:00:01"\n',
     "nic[1].mac", "change one of the two, or remove mac from one: kvmagent then derives one "
     "from the guest name and the NIC's index",
     ['[[nic]]\nmac = "52:54:00:00:00:01"\n[[nic]]\nmac = "52:54:00:00:00:02"\n',
      '[[nic]]\nmac = "52:54:00:00:00:01"\n[[nic]]\n']),
    ("ide-cdrom-over-the-slots", "".join(IDE.format(i=i) for i in range(4)) + CDROM,
     "disk[4].bus", 'keep 4 drives on IDE and give the others bus = "virtio" (disks) or "scsi" (disks and '
     'CD-ROMs; virtio has no CD-ROM drive)',
     ["".join(IDE.format(i=i) for i in range(4)) + CDROM.replace('"ide"', '"scsi"'),
      IDE.format(i=0).replace('"ide"', '"virtio"') +
      "".join(IDE.format(i=i) for i in range(1, 4)) + CDROM]),
    ("ide-disks-over-the-slots", "".join(IDE.format(i=i) for i in range(5)), "disk[4].bus",
     'keep 4 drives on IDE and give the others bus = "virtio" or "scsi"',
     ["".join(IDE.format(i=i) for i in range(4)) + IDE.format(i=4).replace("ide", "virtio")]),
]


@pytest.mark.parametrize("toml, key, hint, fixed", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_the_hint_says_what_helps(conf, toml: str, key: str, hint: str,
                                  fixed: list[str]) -> None:
    path = conf.write("guests/g.toml", toml)
    with pytest.raises(KvmagentError) as exc:
        conf.guest()
    assert exc.value.status == ExitStatus.CONFIG
    assert exc.value.message.startswith(f"{path}: {key}: "), exc.value.message
    assert exc.value.hint == hint
    for toml in fixed:  # each way the hint names
        conf.write("guests/g.toml", toml)
        conf.guest()


def test_boot_true_with_a_kernel_does_not_advise_adding_to_boot(conf) -> None:
    conf.write("guests/g.toml", KERNEL + DISK + "boot = true\n")
    with pytest.raises(KvmagentError) as exc:
        conf.guest()
    assert 'add "disk" to boot' not in str(exc.value)
    # what that advice would give: refused in turn
    conf.write("guests/g.toml", 'boot = ["disk"]\n' + KERNEL + DISK + "boot = true\n")
    with pytest.raises(KvmagentError) as exc:
        conf.guest()
    assert "boot: has no effect with direct kernel boot" in exc.value.message
