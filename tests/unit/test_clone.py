"""`kvmagent clone` and `kvmagent kernel --from-host`: the pure planning
(kvmagent.render.cloneplan, kvmagent.render.hostkernel: what is made for
which kind of disk, the new names and MACs, the new file, the drop-in),
the qcow2 header reader, the dpkg ownership lookup, and the commands
against image files in a temporary directory (cp is real; LVM and
qemu-img run in the system tests)."""

from __future__ import annotations

import argparse
import os
import struct
import tomllib
from pathlib import Path

import pytest

from kvmagent import names
from kvmagent.cli import clone as clonecmd
from kvmagent.cli import kernel as kernelcmd
from kvmagent.cli.commands import package_kernels
from kvmagent.config.layers import load_layers
from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.host import dpkgfiles, imagechain
from kvmagent.render import hostkernel
from kvmagent.render.cloneplan import Action, DiskFacts, Kind, new_name, plan_clone
from kvmagent.render.qemu import HostFacts, Sockets, qemu_argv
from kvmagent.config.model import Accel, HostConfig
from kvmagent.unit import channel, protocol

GUEST = """\
description = "web server"
uuid = "6f1d5f6e-2b0c-4f3e-9a57-000000000001"
cpus = 2
[kernel]
image = "/boot/kvm/web1/vmlinuz"
cmdline = "root=/dev/vda ro"
[resources]
cpu_affinity = [0, 1]
[[disk]]
path = "/srv/kvm/web1.img"
[[disk]]
path = "/dev/vg0/web1-data"
[[disk]]
path = "/srv/iso/debian.iso"
media = "cdrom"
bus = "ide"
[[nic]]
mac = "00:1a:4a:00:8e:30"
[[nic]]
mode = "user"
"""
FACTS = {0: DiskFacts(Kind.FILE), 1: DiskFacts(Kind.LV, "vg0", "web1-data", 8 << 30),
         2: DiskFacts(Kind.FILE)}


def _plan(conf, text=GUEST, facts=FACTS, **kw):  # type: ignore[no-untyped-def]
    conf.write("guests/web1.toml", text)
    src = conf.guest("web1")
    layered = load_layers(src.config_file, required=True)
    options = {"snapshot": None, "full_copy": False, "running": False, **kw}
    return plan_clone(src, layered.data, layered.files, "web2", facts, **options)


def test_names_of_new_images_and_volumes() -> None:
    assert new_name("web1.img", "web1", "web2") == "web2.img"
    assert new_name("web1-root", "web1", "web2") == "web2-root"
    assert new_name("kvm_guest", "arkani", "arkani2") == "arkani2-kvm_guest"
    # a name inside a word is no word of it
    assert new_name("data.img", "a", "b") == "b-data.img"
    assert new_name("vm-a_disk", "a", "b") == "vm-b_disk"


def test_copy_plan_per_kind(conf) -> None:  # type: ignore[no-untyped-def]
    plan = _plan(conf, full_copy=True)
    steps = {s.index: s for s in plan.steps}
    assert steps[0].action is Action.COPY_FILE
    assert steps[0].target == Path("/srv/kvm/web2.img")
    assert steps[0].commands[0][:3] == ("cp", "--sparse=always", "--reflink=auto")
    assert steps[0].temp == Path("/srv/kvm/.web2.img.kvmagent-clone")
    assert steps[1].action is Action.COPY_LV and steps[1].target == Path("/dev/vg0/web2-data")
    assert steps[1].commands[0] == ("lvcreate", "--yes", "-Wn", "-Zn", "-L", f"{8 << 30}b",
                                    "-n", "web2-data", "vg0")
    assert steps[1].commands[1][0] == "dd" and steps[1].undo == ("lvremove", "-f",
                                                                 "vg0/web2-data")
    assert steps[2].action is Action.SHARE and steps[2].target == Path("/srv/iso/debian.iso")
    assert not plan.freeze


def test_snapshot_of_a_volume_and_the_new_file(conf) -> None:  # type: ignore[no-untyped-def]
    text = GUEST.replace('path = "/srv/kvm/web1.img"', 'path = "/srv/kvm/web1.img"\n'
                         'readonly = true')
    plan = _plan(conf, text, snapshot=1 << 30)
    steps = {s.index: s for s in plan.steps}
    # not a template (the LV is writable): the read-only image is shared
    assert steps[0].action is Action.SHARE
    assert steps[1].commands == (("lvcreate", "-s", "-L", "1024m", "-n", "web2-data",
                                  "vg0/web1-data"),)
    data = tomllib.loads(plan.toml)
    assert "uuid" not in data and data["description"] == "web server (clone of web1)"
    assert [n.get("mac") for n in data["nic"]] == [None, None]
    assert data["disk"][1]["path"] == "/dev/vg0/web2-data"
    assert data["resources"]["cpu_affinity"] == [0, 1]
    assert data["kernel"]["cmdline"] == "root=/dev/vda ro"
    # the UUID and the MACs NEW gets are derived from its name, and said so
    assert names.guest_uuid("web2") in plan.toml
    assert names.default_mac("web2", 0) in plan.toml and "00:1a:4a:00:8e:30" in plan.toml


def test_a_running_source_is_paused_for_its_snapshots(conf) -> None:  # type: ignore[no-untyped-def]
    text = GUEST.replace('path = "/srv/kvm/web1.img"', 'path = "/srv/kvm/web1.img"\n'
                         'readonly = true')
    plan = _plan(conf, text, snapshot=1 << 30, running=True)
    assert plan.freeze and "crash-consistent" in plan.toml
    with pytest.raises(KvmagentError, match="running and writes it") as e:
        _plan(conf, text, full_copy=True, running=True)
    assert e.value.status == ExitStatus.FAILURE


def test_a_template_gets_overlays(conf) -> None:  # type: ignore[no-untyped-def]
    text = ('[[disk]]\npath = "/srv/kvm/web1.img"\nreadonly = true\n'
            '[[disk]]\npath = "/srv/kvm/web1-swap.qcow2"\nformat = "qcow2"\nreadonly = true\n')
    plan = _plan(conf, text, {0: DiskFacts(Kind.FILE), 1: DiskFacts(Kind.FILE)}, running=True)
    a, b = plan.steps
    assert a.action is Action.OVERLAY and a.target == Path("/srv/kvm/web2.qcow2")
    assert a.commands == (("qemu-img", "create", "-q", "-f", "qcow2", "-b",
                           "/srv/kvm/web1.img", "-F", "raw",
                           "/srv/kvm/.web2.qcow2.kvmagent-clone"),)
    assert b.target == Path("/srv/kvm/web2-swap.qcow2") and b.commands[0][-2] == "qcow2"
    disks = tomllib.loads(plan.toml)["disk"]
    assert disks == [{"path": "/srv/kvm/web2.qcow2", "format": "qcow2"},
                     {"path": "/srv/kvm/web2-swap.qcow2", "format": "qcow2"}]
    assert not plan.freeze  # a template's disks do not change


@pytest.mark.parametrize("kw, facts, status, text", [
    ({}, FACTS, ExitStatus.CONFIG, "qcow2 overlay on it would be corrupted"),
    ({"full_copy": True}, {**FACTS, 1: DiskFacts(Kind.BLOCK)}, ExitStatus.CONFIG,
     "not an LVM logical volume"),
    ({"full_copy": False, "running": True}, FACTS, ExitStatus.FAILURE, "is running"),
])
def test_what_cannot_be_cloned_is_refused_naming_the_disk(  # type: ignore[no-untyped-def]
        conf, kw, facts, status, text) -> None:
    with pytest.raises(KvmagentError, match=text) as e:
        _plan(conf, facts=facts, **kw)
    assert e.value.status == status and "disk[" in e.value.message


def test_an_lv_needs_snapshot_or_copy(conf) -> None:  # type: ignore[no-untyped-def]
    text = '[[disk]]\npath = "/dev/vg0/web1-data"\n'
    with pytest.raises(KvmagentError, match="--snapshot SIZE") as e:
        _plan(conf, text, {0: FACTS[1]})
    assert e.value.status == ExitStatus.USAGE
    with pytest.raises(KvmagentError, match="is for LVM volumes") as e:
        _plan(conf, '[[disk]]\npath = "/srv/a.img"\n', {0: DiskFacts(Kind.FILE)},
              snapshot=1 << 30)
    assert e.value.status == ExitStatus.USAGE


def _qcow2(backing: bytes, fmt: bytes | None, version: int = 3) -> bytes:
    header = bytearray(512)
    header[:4] = imagechain.MAGIC
    ext = b""
    if fmt is not None:
        ext = struct.pack(">II", imagechain.BACKING_FORMAT_EXT, len(fmt)) + fmt.ljust(
            (len(fmt) + 7) // 8 * 8, b"\0")
    ext += struct.pack(">II", 0, 0)
    start = 104 if version == 3 else 72
    offset = start + len(ext)
    struct.pack_into(">IQI", header, 4, version, offset if backing else 0, len(backing))
    struct.pack_into(">I", header, 100, 104)
    header[start:start + len(ext)] = ext
    header[offset:offset + len(backing)] = backing
    return bytes(header)


def test_qcow2_header() -> None:
    assert imagechain.read_header(_qcow2(b"/srv/a.img", b"raw")) == ("/srv/a.img", "raw")
    assert imagechain.read_header(_qcow2(b"a.qcow2", b"qcow2", 2)) == ("a.qcow2", "qcow2")
    assert imagechain.read_header(_qcow2(b"", None)) is None
    with pytest.raises(ValueError):
        imagechain.read_header(b"\0" * 512)


def test_backing_chain_of_files(tmp_path: Path) -> None:
    (tmp_path / "base.img").write_bytes(b"\0" * 4096)
    (tmp_path / "mid.qcow2").write_bytes(_qcow2(b"base.img", b"raw"))  # relative
    (tmp_path / "top.qcow2").write_bytes(_qcow2(str(tmp_path / "mid.qcow2").encode(), b"qcow2"))
    chain = imagechain.backing_chain(tmp_path / "top.qcow2", "g.toml", "disk[0].path")
    assert chain == [(tmp_path / "mid.qcow2", "qcow2"), (tmp_path / "base.img", "raw")]
    (tmp_path / "probe.qcow2").write_bytes(_qcow2(b"base.img", None))
    with pytest.raises(KvmagentError, match="no format recorded") as e:
        imagechain.backing_chain(tmp_path / "probe.qcow2", "g.toml", "disk[0].path")
    assert e.value.status == ExitStatus.HOST_NOT_READY and "qemu-img rebase" in str(e.value)


def test_backing_files_go_to_qemu_as_fds(conf) -> None:  # type: ignore[no-untyped-def]
    conf.write("guests/g.toml", '[[disk]]\npath = "/srv/g.qcow2"\nformat = "qcow2"\n')
    sockets = Sockets(qmp="fd=3", console=None, disk_fds={"disk0": ["4", "5"]},
                      backing_fds={"disk0": [("6", "qcow2"), ("7", "raw")]})
    argv = qemu_argv(conf.guest("g"), HostConfig(), HostFacts(Accel.TCG), sockets)
    assert ["-add-fd", "fd=6,set=101", "-add-fd", "fd=7,set=201"] == argv[
        argv.index("fd=6,set=101") - 1:argv.index("fd=7,set=201") + 1]
    drive = argv[argv.index("-drive") + 1]
    assert ("file=/dev/fdset/1,format=qcow2,if=none,id=disk0,cache=none,"
            "backing.driver=qcow2,backing.file.filename=/dev/fdset/101,"
            "backing.backing.driver=raw,backing.backing.file.filename=/dev/fdset/201") in drive


def test_freeze_needs_a_time_limit() -> None:
    assert protocol.freeze_seconds({"seconds": 30}) == 30.0
    for bad in ({}, {"seconds": 0}, {"seconds": 3600}, {"seconds": True}, {"seconds": "5"}):
        assert isinstance(protocol.freeze_seconds(bad), str)
    assert {"freeze", "thaw"} <= set(channel.COMMANDS)


# -- the clone command, image files in a temporary directory ------------------------

def _args(src: str, new: str, **kw: object) -> argparse.Namespace:
    return argparse.Namespace(src=src, new=new, snapshot=kw.get("snapshot"),
                              copy=kw.get("copy", False))


def test_clone_copies_an_image_and_writes_the_file_last(conf, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "srv" / "a.img"
    image.parent.mkdir()
    image.write_bytes(b"guest data" * 100)
    conf.write("guests/a.toml", f'[[disk]]\npath = "{image}"\n[[nic]]\nbridge = "br0"\n')
    conf.write("guests/a.toml.d/mem.toml", 'memory = "1G"\n')
    assert clonecmd.cmd_clone(_args("a", "b", copy=True), conf.paths) == 0
    assert (tmp_path / "srv" / "b.img").read_bytes() == image.read_bytes()
    b = conf.guest("b")
    assert b.memory == 1 << 30  # the drop-in, merged
    assert b.nics[0].mac == names.default_mac("b", 0) != conf.guest("a").nics[0].mac
    assert b.uuid == names.guest_uuid("b")
    assert sorted(os.listdir(tmp_path / "srv")) == ["a.img", "b.img"]  # no temporary left


@pytest.mark.parametrize("src, new, status, text", [
    ("nosuch", "b", ExitStatus.UNKNOWN_GUEST, "unknown guest 'nosuch'"),
    ("a", "B!", ExitStatus.USAGE, "invalid guest name 'B!'"),
    ("a", "c", ExitStatus.CONFIG, "c.toml: exists"),
    ("a", "d", ExitStatus.CONFIG, "d.toml.d: exists"),
])
def test_clone_bad_input_changes_nothing(conf, tmp_path: Path, src, new, status, text) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "a.img"
    image.write_bytes(b"x")
    conf.write("guests/a.toml", f'[[disk]]\npath = "{image}"\n')
    conf.write("guests/c.toml", "")
    conf.write("guests/d.toml.d/x.toml", "")
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(conf.paths.guests_dir))
    with pytest.raises(KvmagentError, match=text) as e:
        clonecmd.cmd_clone(_args(src, new, copy=True), conf.paths)
    assert e.value.status == status
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(conf.paths.guests_dir))) == before


def test_a_failed_clone_removes_what_it_made(conf, tmp_path: Path,  # type: ignore[no-untyped-def]
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for n in (1, 2):
        (tmp_path / f"a{n}.img").write_bytes(b"x")
    conf.write("guests/a.toml", f'[[disk]]\npath = "{tmp_path}/a1.img"\n'
               f'[[disk]]\npath = "{tmp_path}/a2.img"\n')
    from kvmagent.cli import importcmd

    def fail(*args: object, **kw: object) -> None:
        raise KvmagentError("cannot write: No space left on device")
    monkeypatch.setattr(importcmd, "write_guest", fail)
    with pytest.raises(KvmagentError, match="No space left"):
        clonecmd.cmd_clone(_args("a", "b", copy=True), conf.paths)
    assert sorted(p for p in os.listdir(tmp_path) if "img" in p) == ["a1.img", "a2.img"]
    assert not conf.paths.guest_config("b").exists()


# -- kernel --from-host ----------------------------------------------------------------

def test_kernel_versions_and_the_dropin() -> None:
    names_ = ["vmlinuz-6.1.0-27-amd64", "vmlinuz-6.1.0-9-amd64", "initrd.img-6.1.0-9-amd64",
              "config-6.1.0-9-amd64", "vmlinuz-6.1.0-27-amd64.dpkg-tmp"]
    assert hostkernel.installed(names_) == ["6.1.0-9-amd64", "6.1.0-27-amd64"]
    assert hostkernel.pick_version(["6.1.0-9-amd64", "6.1.0-27-amd64"], "6.1.0-9-amd64") == \
        "6.1.0-9-amd64"
    assert hostkernel.pick_version(["6.1.0-9-amd64", "6.1.0-27-amd64"], "6.18.1") == \
        "6.1.0-27-amd64"
    assert hostkernel.pick_version([], "6.1") is None
    text = hostkernel.dropin_text("web", "6.1.0-9-amd64", Path("/boot/kvm/web"), True)
    assert tomllib.loads(text) == {"kernel": {"image": "/boot/kvm/web/vmlinuz",
                                              "initrd": "/boot/kvm/web/initrd.img"}}
    assert "kvmagent kernel web --from-host 6.1.0-9-amd64" in text


def test_kernel_from_host_copies_and_writes_a_dropin(conf, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    boot, kernels = tmp_path / "boot", tmp_path / "kvm"
    boot.mkdir()
    (boot / "vmlinuz-6.1.0-9-amd64").write_bytes(b"kernel")
    (boot / "initrd.img-6.1.0-9-amd64").write_bytes(b"initrd")
    conf.write("guests/g.toml", '[kernel]\nimage = "/boot/old"\ncmdline = "root=/dev/vda"\n')
    version, dropin, copied = kernelcmd.install(conf.paths, "g", "", boot, kernels)
    assert version == "6.1.0-9-amd64" and dropin.name == "kernel.toml"
    assert (kernels / "g" / "vmlinuz").read_bytes() == b"kernel"
    assert oct((kernels / "g" / "initrd.img").stat().st_mode & 0o777) == "0o644"
    g = conf.guest("g")
    assert g.kernel is not None and g.kernel.image == kernels / "g" / "vmlinuz"
    assert g.kernel.cmdline == "root=/dev/vda"  # the admin's file, untouched
    with pytest.raises(KvmagentError, match="'5.10' is not installed") as e:
        kernelcmd.install(conf.paths, "g", "5.10", boot, kernels)
    assert e.value.status == ExitStatus.HOST_NOT_READY and "6.1.0-9-amd64" in str(e.value)
    with pytest.raises(KvmagentError) as e:
        kernelcmd.install(conf.paths, "nosuch", "", boot, kernels)
    assert e.value.status == ExitStatus.UNKNOWN_GUEST


def test_validate_warns_of_a_kernel_a_package_owns(conf, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    info = tmp_path / "info"
    info.mkdir()
    (info / "linux-image-6.1.0-9-amd64.list").write_text(
        "/.\n/boot\n/boot/vmlinuz-6.1.0-9-amd64\n")
    (info / "base-files.list").write_text("/etc/debian_version\n")
    assert dpkgfiles.owner(Path("/boot/vmlinuz-6.1.0-9-amd64"), info) == \
        "linux-image-6.1.0-9-amd64"
    assert dpkgfiles.owner(Path("/boot/vmlinuz-5.10"), info) is None
    conf.write("guests/g.toml", '[kernel]\nimage = "/boot/vmlinuz-6.1.0-9-amd64"\n'
               'initrd = "/boot/initrd.img-6.1.0-9-amd64"\n')
    warnings = package_kernels(conf.guest("g"), Path("/boot"), info)
    assert len(warnings) == 2 and all("package linux-image-6.1.0-9-amd64" in w for w in warnings)
    assert "kvmagent kernel g --from-host 6.1.0-9-amd64" in warnings[0]
    conf.write("guests/h.toml", '[kernel]\nimage = "/boot/kvm/h/vmlinuz"\n')
    assert package_kernels(conf.guest("h"), Path("/boot"), info) == []
