"""`kvmagent import xen`, the pure part (kvmagent.foreign.xenconfig, xenparse):
Xen configurations of our own (tests/data/import/xen: PV with phy: and
file: disks, xl's key=value disks and several vifs, pygrub, HVM with a
CD-ROM in the style of Xen's xmexample.hvm) give guest files that validate,
with the QEMU command line checked; and bad input, each an error naming
the file and the line, exit status 6.  Nothing is ever evaluated."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from kvmagent.config.guests import build_guest
from kvmagent.config.layers import Layered
from kvmagent.config.model import Guest, HostConfig
from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.foreign.importtoml import Imported
from kvmagent.foreign.xenconfig import import_xen
from kvmagent.render.qemu import Sockets, qemu_argv

from tests import seed

XEN = Path(__file__).resolve().parents[1] / "data" / "import" / "xen"


def load(imported: Imported) -> Guest:
    return build_guest(imported.name, Layered(data=tomllib.loads(imported.toml)), HostConfig(),
                       Path(f"/etc/kvmagent/guests/{imported.name}.toml"))


def argv(guest: Guest) -> str:
    return " ".join(qemu_argv(guest, HostConfig(), seed.KVM,
                              Sockets.in_dir(Path("/run/kvmagent") / guest.name)))


def xen(name: str) -> Imported:
    return import_xen((XEN / name).read_text(), name)


def flat(toml: str) -> str:
    return " ".join(line.lstrip("# ").strip() for line in toml.splitlines())


def test_pv_with_partitions_as_disks():
    imported = xen("mail-pv.cfg")
    guest = load(imported)
    assert (guest.name, guest.cpus, guest.memory) == ("mail", 2, 1 << 30)
    assert [(str(d.path), str(d.bus)) for d in guest.disks] == [
        ("/dev/vg0/mail-swap", "virtio"), ("/dev/vg0/mail-disk", "virtio"),
        ("/srv/xen/mail-spool.img", "virtio")]
    assert guest.kernel is not None
    # xvda2 held a file system: under KVM the second virtio disk, whole
    assert guest.kernel.cmdline == "root=/dev/vdb ro xencons=tty console=ttyS0,115200"
    assert guest.nics[0].mac == "00:16:3e:4a:10:01" and guest.nics[0].bridge == "xenbr0"
    said = flat(imported.toml)
    assert "root=/dev/xvda2 becomes root=/dev/vdb" in said
    assert "xvda2 was a partition of a PV disk" in said
    assert "console=hvc0 (Xen's console) becomes ttyS0" in said
    assert "ip=192.168.1.20 dropped" in said
    w = " ".join(imported.warnings)
    assert "looks like a Xen-only kernel" in w and "a getty on hvc0" in w
    assert "/dev/xvda2 is /dev/vdb" in w and "virtio_blk" in w
    assert "-append root=/dev/vdb ro xencons=tty console=ttyS0,115200" in argv(guest)


def test_pv_xl_syntax_two_vifs():
    imported = xen("nfs-pv.cfg")
    guest = load(imported)
    assert guest.resources.cpu_affinity == (2, 3, 4, 5)
    assert [(str(d.format), d.readonly) for d in guest.disks] == [("raw", False), ("qcow2", True)]
    # a comma in the path survives, quoted for QEMU
    assert "file=/srv/export/images,,base.qcow2,format=qcow2" in argv(guest)
    assert guest.kernel is not None and guest.kernel.cmdline == "root=/dev/vda1 ro console=ttyS0,115200"
    assert [(n.bridge, n.mac) for n in guest.nics] == [
        ("br-kvm", "00:16:3e:00:00:21"), ("br-clients", "00:16:3e:00:00:22")]
    said = flat(imported.toml)
    assert "maxmem = 4096 dropped" in said and "vifname=nfs-clients dropped" in said
    assert "console=ttyS0,115200 added" in said


def test_pygrub():
    imported = xen("sunray-pygrub.cfg")
    guest = load(imported)
    assert guest.kernel is None and str(guest.disks[0].path) == "/srv/xen/sunray.img"
    assert len(guest.nics) == 2 and guest.nics[1].bridge == "br-kvm"  # the host's default
    assert "bootloader = pygrub dropped" in flat(imported.toml)
    assert any("pygrub is gone" in w for w in imported.warnings)
    # the advice names what exists today: no command that is not there
    assert not any("kvmagent kernel" in w for w in imported.warnings)
    assert any("as [kernel] image and initrd" in w for w in imported.warnings)
    assert "bootindex=1" in argv(guest)


def test_pygrub_on_a_partition_says_copy_the_kernel_out():
    imported = import_xen("name = 'p'\nbootloader = 'pygrub'\ndisk = ['phy:vg/p,xvda1,w']\n",
                          "p.cfg")
    assert load(imported).disks[0].path == Path("/dev/vg/p")  # phy: relative to /dev
    assert any("xvda1 is a partition without a partition table" in w
               for w in imported.warnings)


def test_hvm_with_a_cdrom():
    imported = xen("win-hvm.cfg")
    guest = load(imported)
    text = argv(guest)
    assert [(str(d.bus), str(d.media)) for d in guest.disks] == [("ide", "disk"), ("ide", "cdrom")]
    assert [str(b) for b in guest.boot] == ["cdrom", "disk"]
    assert "ide-cd,drive=disk1,id=disk1-dev,bootindex=1" in text
    assert "-vnc 127.0.0.1:2" in text and "e1000,netdev=net0,mac=00:16:3e:00:00:31" in text
    assert guest.extra_args == ("-k", "de", "-rtc", "base=localtime")
    assert str(guest.on_poweroff) == "keep" and imported.warnings == ()
    said = flat(imported.toml)
    # Xen's example lines that say nothing about the guest: skipped, never run
    assert "Line 2: `import os, re` skipped" in said
    assert "Line 3: `arch = os.uname()[4]` skipped" in said
    assert "Line 4: `if re.search('64', arch):` skipped (sets only arch_libdir" in said
    assert "kernel = hvmloader dropped" in said


def test_name_option_and_empty_cdrom():
    text = "name = 'x'\nbuilder = 'hvm'\ndisk = [',hdc:cdrom,r', 'file:/a.img,hda,w']\n"
    imported = import_xen(text, "x.cfg", name="other")
    assert load(imported).name == "other" and len(load(imported).disks) == 1
    assert "an empty CD-ROM drive, left out" in flat(imported.toml)


# -- bad input -------------------------------------------------------------------------

OK = "name = 'g'\nmemory = 512\nkernel = '/k'\n"

BAD: list[tuple[str, str, list[str]]] = [
    ("import-call", OK + "__import__('os').system('reboot')\n",
     ["{f}:4: Python code, not a KEY = value line"]),
    ("needed-code", "name = 'g'\nmemory = __import__('os').getpid()\n",
     ["{f}:2: memory is not a plain value"]),
    ("syntax", OK + "disk = ['phy:/dev/x,xvda,w'\n", ["{f}:4: not a Xen configuration"]),
    ("if-needed", "import os\nif os.path.exists('/x'):\n    memory = 512\n",
     ["{f}:2: an `if` the importer cannot follow"]),
    ("def", OK + "def f():\n    pass\n", ["{f}:4: Python code"]),
    ("augassign", OK + "memory += 1\n", ["{f}:4: Python code"]),
    ("disk-spec", OK + "disk = ['phy:/dev/x']\n", ["{f}:4: disk: a disk spec the importer cannot read"]),
    ("disk-not-list", OK + "disk = 'phy:/dev/x,xvda,w'\n", ["{f}:4: disk: expected a list of strings"]),
    ("disk-vhd", OK + "disk = ['tap:vhd:/x.vhd,xvda,w']\n", ["{f}:4: disk: image format 'vhd'"]),
    ("disk-vdev", OK + "disk = ['phy:/dev/x,vda,w']\n", ["{f}:4: disk: virtual device 'vda'"]),
    ("disk-relative", OK + "disk = ['file:x.img,xvda,w']\n", ["{f}:4: disk: 'x.img' is not an absolute path"]),
    ("disk-xl-option", OK + "disk = ['vdev=xvda, script=block-drbd, target=/x']\n",
     ["{f}:4: disk: disk option 'script=block-drbd'"]),
    ("disk-access", OK + "disk = ['phy:/dev/x,xvda,x']\n", ["{f}:4: disk: access 'x'"]),
    ("bad-name", "name = 'Mail_1'\nkernel = '/k'\n", ["{f}:1: name: 'Mail_1' is not a valid guest name"]),
    ("no-name", "memory = 512\nkernel = '/k'\n", ["{f}: the configuration has no name"]),
    ("memory-string", "name = 'g'\nkernel = '/k'\nmemory = 'lots'\n", ["{f}:3: memory: expected a whole number"]),
    ("vif-option", OK + "vif = ['mac=00:16:3e:00:00:01, accel=x']\n", ["{f}:4: vif: vif option 'accel'"]),
    ("vif-mac", OK + "vif = ['mac=01:16:3e:00:00:01']\n", ["{f}:4: vif: mac=01:16:3e:00:00:01: a multicast MAC"]),
    ("vif-route", OK + "vif = ['script=vif-route']\n", ["{f}:4: vif: script=vif-route"]),
    ("vif-bridge", OK + "vif = ['bridge=br kvm;x']\n", ["{f}:4: vif: bridge 'br kvm;x'"]),
    ("pci", OK + "pci = ['01:00.0']\n", ["{f}:4: pci: PCI passthrough"]),
    ("cpus-exclusion", OK + "cpus = '^1'\n", ["{f}:4: cpus: CPU exclusion"]),
    ("pv-no-kernel", "name = 'g'\n", ["{f}: a PV guest with neither kernel nor bootloader"]),
    ("bootloader", "name = 'g'\nbootloader = '/usr/bin/my-loader'\n", ["{f}:2: bootloader: '/usr/bin/my-loader'"]),
    ("hvm-boot", "name = 'g'\nbuilder = 'hvm'\nboot = 'a'\n", ["{f}:3: boot: boot device 'a'"]),
    ("builder", "name = 'g'\nbuilder = 'ppc'\n", ["{f}:2: builder: 'ppc': expected pv or hvm"]),
    ("hvm-model", "name = 'g'\nbuilder = 'hvm'\nvif = ['model=ne2k_pci']\n", ["{f}:3: vif: model=ne2k_pci"]),
    ("lambda", OK + "extra = (lambda: 'x')()\n", ["{f}:4: extra is not a plain value"]),
    ("fstring", OK + "root = f'/dev/{x}'\n", ["{f}:4: root is not a plain value"]),
    ("null-byte", OK + "root = '/dev/x'\0\n", ["{f}: not a Xen configuration (it contains a NUL byte)"]),
]


@pytest.mark.parametrize("case,text,expected", BAD, ids=[c[0] for c in BAD])
def test_bad_config(case, text, expected):
    file = "/etc/xen/bad.cfg"
    with pytest.raises(KvmagentError) as exc:
        import_xen(text, file)
    assert exc.value.status == ExitStatus.CONFIG
    for want in expected:
        assert want.replace("{f}", file) in str(exc.value), str(exc.value)


def test_deep_nesting_is_refused_not_a_crash():
    with pytest.raises(KvmagentError) as exc:
        import_xen("name = 'g'\nkernel = '/k'\nvif = " + "[" * 100 + "]" * 100 + "\n", "d.cfg")
    assert exc.value.status == ExitStatus.CONFIG and "d.cfg:3: vif is nested too deep" in str(exc.value)


def test_bad_cases_are_different():
    assert len(BAD) >= 25 and len({c[0] for c in BAD}) == len(BAD)
    assert len({c[1] for c in BAD}) == len(BAD)


@pytest.mark.parametrize("reboot, ends", [("destroy", True), ("preserve", True),
                                          ("restart", False), ("rename-restart", False)])
def test_on_reboot(reboot: str, ends: bool):
    imported = import_xen(f"name = 'r'\nmemory = 256\nbuilder = 'hvm'\non_reboot = '{reboot}'\n", "r.cfg")
    assert str(load(imported).on_reboot) == ("stop" if ends else "restart")
    if reboot == "rename-restart":
        assert 'on_reboot = "rename-restart" dropped' in flat(imported.toml)
