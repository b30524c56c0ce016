"""`kvmagent migrate --copy-storage`'s decisions (kvmagent.render.storagecopy),
pure: which disks are copied and which are made on the other host, the
refusals (naming disk, path and both sizes), the destination's own check,
when the copy is in step, the switch, the heartbeat."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvmagent.errors import ExitStatus
from kvmagent.render.migration import STALL_LIMIT
from kvmagent.render.storagecopy import (SWITCH_TIMEOUT, Backing, CopyDisk, CopyState, CopyStep,
                                         DiskFact, Kind, Wanted, arrival_disks, backing_path,
                                         copy_line,
                                         copy_state,
                                         copy_step, heartbeat, kept_problems, mirror_job,
                                         missing_there,
                                         parse_disk_option, plan_copy, switch_step)

MIB = 1 << 20
IMAGE = DiskFact(0, "/srv/local/g.img", Kind.FILE, 16 * MIB, True, "raw", "")
LV = DiskFact(1, "/dev/vg0/g-data", Kind.BLOCK, 64 * MIB, True, "raw", "")
ISO = DiskFact(2, "/srv/iso/d.iso", Kind.FILE, 300 * MIB, False, "raw", "")


def missing(d: DiskFact, kind: Kind = Kind.MISSING) -> DiskFact:
    return d._replace(kind=kind, size=0)


def test_an_image_missing_there_is_made_and_an_lv_there_is_copied_onto() -> None:
    copies, refusals = plan_copy("g", "host2", [IMAGE, LV, ISO], [missing(IMAGE), LV, ISO])
    assert refusals == []
    assert copies == [CopyDisk(0, "/srv/local/g.img", 16 * MIB, "raw", True),
                      CopyDisk(1, "/dev/vg0/g-data", 64 * MIB, "raw", False)]
    assert [c.node for c in copies] == ["disk0", "disk1"]
    assert copies[0].argument() == ["--make-disk", f"0={16 * MIB}"]
    assert copies[1].argument() == ["--copy-disk", f"1={64 * MIB}"]
    # an image the admin made there, of the same size: copied onto, not made
    (copy,), _ = plan_copy("g", "host2", [IMAGE], [IMAGE])
    assert not copy.make


def test_a_block_device_both_hosts_share_is_never_copied_onto_itself() -> None:
    """A SAN LUN or a shared VG's LV at the same path on both hosts is one
    device: the mirror would write the guest's disk onto itself.  Known by
    its identity, which both hosts read alike; an unknown one ("") or two
    different ones are two devices."""
    shared = LV._replace(identity="dm:LVM-Q1b2c3Zz0vgUUIDlvUUID")
    _, (r,) = plan_copy("g", "host2", [shared], [shared])
    assert r.status is ExitStatus.FAILURE
    assert r.message == ('host2: disk[1].path = "/dev/vg0/g-data" is the very device the '
                         'guest uses here (dm:LVM-Q1b2c3Zz0vgUUIDlvUUID): storage both hosts '
                         'share, which --copy-storage would copy onto itself')
    assert "without --copy-storage" in str(r.hint)
    other = shared._replace(identity="dm:LVM-another")
    for here, there in ((shared, other), (LV, LV), (shared, LV)):
        (copy,), refusals = plan_copy("g", "host2", [here], [there])
        assert refusals == [] and not copy.make


def test_disk_facts_from_an_older_kvmagent_have_no_identity() -> None:
    data = LV.to_json()
    del data["identity"]
    assert DiskFact.from_json(data) == LV
    assert DiskFact.from_json(dict(LV.to_json(), identity="wwid:x")).identity == "wwid:x"
    with pytest.raises(ValueError, match="identity"):
        DiskFact.from_json(dict(LV.to_json(), identity=5))


def test_device_identity_as_the_kernel_says_it(tmp_path: Path) -> None:
    """/sys/dev/block/MAJ:MIN as the kernel lays it out (made here): a
    device-mapper volume's UUID, a disk's WWID, a partition of it."""
    from kvmagent.host.diskfacts import device_identity
    lv, disk, part, loop = (tmp_path / n for n in ("253:3", "8:0", "disks/8:1", "7:0"))
    (lv / "dm").mkdir(parents=True)
    (lv / "dm" / "uuid").write_text("LVM-abcVGuuidXYZLVuuid\n")
    (disk / "device").mkdir(parents=True)
    (disk / "device" / "wwid").write_text("naa.600a098038303053453f463045727a6f\n")
    part.mkdir(parents=True)
    (part / "partition").write_text("1\n")
    (tmp_path / "disks" / "device").mkdir()
    (tmp_path / "disks" / "device" / "wwid").write_text("naa.6001\n")
    loop.mkdir()
    assert device_identity(os.makedev(253, 3), tmp_path) == "dm:LVM-abcVGuuidXYZLVuuid"
    assert device_identity(os.makedev(8, 0), tmp_path) == \
        "wwid:naa.600a098038303053453f463045727a6f"
    os.symlink(part, tmp_path / "8:1")  # sysfs's link: the partition inside its disk
    assert device_identity(os.makedev(8, 1), tmp_path) == "wwid:naa.6001:part1"
    assert device_identity(os.makedev(7, 0), tmp_path) == ""  # a loop device: none
    assert device_identity(os.makedev(9, 9), tmp_path) == ""


def test_read_only_disks_are_never_copied() -> None:
    assert plan_copy("g", "host2", [ISO], [missing(ISO)]) == ([], [])


def test_refusals_name_the_disk_its_path_and_both_sizes() -> None:
    _, (r,) = plan_copy("g", "host2", [IMAGE], [IMAGE._replace(size=8 * MIB)])
    assert r.status is ExitStatus.HOST_NOT_READY
    assert r.message == ('host2: disk[0].path = "/srv/local/g.img" is 8388608 bytes (8.0 MiB), '
                         'here 16777216 bytes (16.0 MiB): --copy-storage copies onto a disk of '
                         'the same size')
    assert "remove an image file there" in str(r.hint)
    _, (r,) = plan_copy("g", "host2", [LV], [LV._replace(size=32 * MIB)])
    assert r.message.startswith('host2: disk[1].path = "/dev/vg0/g-data" is 33554432 bytes '
                                '(32.0 MiB), here 67108864 bytes (64.0 MiB)')
    assert r.hint == "make it 67108864 bytes (64.0 MiB) on host2 (lvresize -L 67108864b ...)"
    _, (r,) = plan_copy("g", "host2", [LV], [missing(LV)])
    assert r.status is ExitStatus.HOST_NOT_READY
    assert "disk[1].path = \"/dev/vg0/g-data\" does not exist: kvmagent makes no block" \
        in r.message and "67108864 bytes" in str(r.hint)
    _, (r,) = plan_copy("g", "host2", [IMAGE], [missing(IMAGE, Kind.NO_DIRECTORY)])
    assert "its directory does not exist" in r.message and r.status is ExitStatus.HOST_NOT_READY
    # /dev/VG is there only while one of the VG's LVs is active: no mkdir for it
    _, (r,) = plan_copy("g", "host2", [LV], [missing(LV, Kind.NO_DIRECTORY)])
    assert r.message == ('host2: disk[1].path = "/dev/vg0/g-data" does not exist: kvmagent '
                         'makes no block device') and r.status is ExitStatus.HOST_NOT_READY
    assert "lvcreate -L 67108864b" in str(r.hint) and "mkdir" not in str(r.hint)
    _, (r,) = plan_copy("g", "host2", [IMAGE], [missing(IMAGE, Kind.OTHER)])
    assert "neither an image file nor a block device" in r.message


BASE = Backing("/srv/base.qcow2", "qcow2", 300 * MIB, "ab" * 32)
ROOT = Backing("/srv/root.img", "raw", 200 * MIB, "cd" * 32)
OVERLAY = IMAGE._replace(format="qcow2", backing="/srv/base.qcow2", chain=(BASE, ROOT))


def test_an_overlay_is_made_there_on_the_same_backing_files_and_copied_as_one() -> None:
    """A qcow2 overlay (a clone's disk): HOST has its backing files, the
    same files; kvmagent makes the overlay there on them, and the mirror
    sends what the overlay holds alone."""
    (copy,), refusals = plan_copy("g", "host2", [OVERLAY], [missing(OVERLAY)], [BASE, ROOT])
    assert refusals == []
    assert copy == CopyDisk(0, IMAGE.path, 16 * MIB, "qcow2", True, BASE.path, "qcow2")
    assert copy.sync == "top" and CopyDisk(0, IMAGE.path, 1, "raw", True).sync == "full"
    assert copy.argument() == ["--make-disk", f"0={16 * MIB}:qcow2:/srv/base.qcow2"]
    assert parse_disk_option(copy.argument()[1], True) == (
        0, Wanted(16 * MIB, True, "qcow2", "/srv/base.qcow2"))


def test_an_overlay_made_there_names_its_backing_file_as_the_one_here() -> None:
    """A header that names its backing file relative to the overlay's
    directory (qemu-img create -b base.qcow2): the overlay made there
    says the same, and the backing file compared is the one beside it."""
    beside = BASE._replace(path="/srv/local/base.qcow2")
    assert backing_path(IMAGE.path, "base.qcow2") == beside.path
    assert backing_path(IMAGE.path, BASE.path) == BASE.path
    overlay = OVERLAY._replace(backing="base.qcow2", chain=(beside,))
    _, (r,) = plan_copy("g", "host2", [overlay], [missing(overlay)], [BASE])
    assert "/srv/local/base.qcow2, which host2 lacks" in r.message
    (copy,), refusals = plan_copy("g", "host2", [overlay], [missing(overlay)], [beside])
    assert refusals == [] and copy.backing == "base.qcow2"
    assert copy.argument() == ["--make-disk", f"0={16 * MIB}:qcow2:base.qcow2"]
    index, wanted = parse_disk_option(copy.argument()[1], True)
    (there,), refusals = arrival_disks("g", {index: wanted}, [missing(overlay)], [beside])
    assert refusals == [] and there == copy
    _, (r,) = arrival_disks("g", {index: wanted}, [missing(overlay)], [BASE])
    assert "/srv/local/base.qcow2, which here lacks" in r.message


def test_an_overlay_whose_backing_files_differ_there_is_refused() -> None:
    for there, said in (([ROOT], "/srv/base.qcow2, which host2 lacks"),
                        ([BASE, ROOT._replace(size=0, sample="")],
                         "/srv/root.img, which host2 lacks"),
                        ([BASE, ROOT._replace(size=MIB)],
                         "is another file there (1048576 bytes (1.0 MiB), here 209715200"),
                        ([BASE._replace(sample="ef" * 32), ROOT],
                         "another file there (other contents: the checksums of samples")):
        copies, (r,) = plan_copy("g", "host2", [OVERLAY], [missing(OVERLAY)], there)
        assert copies == [] and said in r.message, (r.message, said)
        assert r.status is ExitStatus.HOST_NOT_READY and "rsync" in str(r.hint)
        assert "qemu-img convert" in str(r.hint)
    # an image there already: never copied onto (it may hold data of its own)
    _, (r,) = plan_copy("g", "host2", [OVERLAY], [OVERLAY], [BASE, ROOT])
    assert "exists there" in r.message and "remove it on host2" in str(r.hint)
    assert "migrate without --copy-storage" in str(r.hint)  # not the guest's own disk
    _, (r,) = plan_copy("g", "host2", [OVERLAY], [missing(OVERLAY, Kind.NO_DIRECTORY)],
                        [BASE, ROOT])
    assert "its directory does not exist" in r.message


def test_a_backing_file_replaced_since_the_guest_started_is_refused() -> None:
    """Its QEMU holds the old file open: the one at the path now is not
    what the guest reads, and the copy would give it that one."""
    from kvmagent.render.storagecopy import replaced_backing
    found = {BASE.path: (1, 10), ROOT.path: (1, 11)}
    assert replaced_backing("g", [OVERLAY], found, {(1, 10), (1, 11), (2, 5)}) == []
    (r,) = replaced_backing("g", [OVERLAY], found, {(1, 10), (1, 99)})
    assert r.message == ("guest g's disk[0] reads its backing file /srv/root.img as it was "
                         "when the guest started: the file at that path now is another one, "
                         "replaced since") and r.status is ExitStatus.FAILURE
    assert "start it again" in str(r.hint)
    # gone from its path: as replaced
    assert len(replaced_backing("g", [OVERLAY], {}, {(1, 10), (1, 11)})) == 2
    assert replaced_backing("g", [IMAGE, OVERLAY._replace(writable=False)], {}, set()) == []


def test_backing_facts_from_json_are_checked() -> None:
    assert Backing.from_json(BASE._asdict()) == BASE
    assert DiskFact.from_json(OVERLAY.to_json()) == OVERLAY
    # an older kvmagent's facts: no chain
    assert DiskFact.from_json({k: v for k, v in IMAGE.to_json().items() if k != "chain"}) == IMAGE
    for bad in ({"chain": "x"}, {"chain": [{"path": "/a"}]}):
        with pytest.raises(ValueError):
            DiskFact.from_json(dict(OVERLAY.to_json(), **bad))


def test_every_refusal_at_once_and_nothing_copied_then_for_that_disk() -> None:
    copies, refusals = plan_copy("g", "host2", [IMAGE, LV],
                                 [IMAGE._replace(size=1), missing(LV)])
    assert copies == [] and len(refusals) == 2


def test_a_guest_file_that_differs_is_preflights_to_refuse() -> None:
    assert plan_copy("g", "host2", [IMAGE], [IMAGE._replace(path="/elsewhere")]) == ([], [])
    assert plan_copy("g", "host2", [IMAGE], []) == ([], [])


def test_the_problems_of_disks_made_there_are_dropped() -> None:
    problems = ['guests/g.toml: disk[0].path = "/srv/local/g.img": disk does not exist',
                'guests/g.toml: disk[1].path = "/dev/vg0/g-data": disk does not exist',
                'guests/g.toml: nic[0].bridge = "br-kvm": no such bridge']
    assert kept_problems(problems, [(0, "/srv/local/g.img")]) == problems[1:]
    assert kept_problems(problems, []) == problems


def test_a_writable_disk_missing_there_is_for_the_copy_to_say() -> None:
    """Every writable disk missing there is made there or refused by
    plan_copy, saying why: the host check's "disk does not exist" (whose
    hint is --copy-storage, given already) is left out of the source's
    refusals.  A read-only disk is not copied: its absence is the host
    check's to say."""
    there = [missing(IMAGE), missing(LV, Kind.NO_DIRECTORY), missing(ISO)]
    assert missing_there([IMAGE, LV, ISO], there) == [(0, IMAGE.path), (1, LV.path)]
    assert missing_there([IMAGE, LV, ISO], [IMAGE, LV, ISO]) == []
    assert missing_there([IMAGE], [missing(IMAGE)._replace(path="/elsewhere")]) == []


def test_disk_options() -> None:
    assert parse_disk_option("0=16777216", False) == (0, Wanted(16777216, False))
    assert parse_disk_option("1=5:raw:/srv/a:b", True) == (1, Wanted(5, True, "raw", "/srv/a:b"))
    for bad in ("0", "x=1", "0=-1", "0=0", "=5", "0=1M", "0=5:vmdk:/a", "0=5:raw:",
                "0=5:"):
        with pytest.raises(ValueError):
            parse_disk_option(bad, True)
    assert parse_disk_option("0=5:raw:a", True) == (0, Wanted(5, True, "raw", "a"))
    with pytest.raises(ValueError):  # the admin's disk is never an overlay kvmagent makes
        parse_disk_option("0=5:raw:/srv/a", False)


def test_the_destination_checks_again() -> None:
    here = [missing(IMAGE), LV, ISO]
    copies, refusals = arrival_disks("g", {0: Wanted(16 * MIB, True),
                                           1: Wanted(64 * MIB, False)}, here)
    assert refusals == [] and [(c.number, c.make) for c in copies] == [(0, True), (1, False)]
    # made there meanwhile: not made over
    _, (r,) = arrival_disks("g", {0: Wanted(16 * MIB, True)}, [IMAGE])
    assert "exists here now" in r.message
    _, (r,) = arrival_disks("g", {1: Wanted(32 * MIB, False)}, here)
    assert "is 67108864 bytes (64.0 MiB), here 33554432 bytes" in r.message
    _, (r,) = arrival_disks("g", {2: Wanted(MIB, False)}, here)
    assert r.message == "guest g has no writable disk[2] here" and r.status is ExitStatus.CONFIG
    # an LV here has an identity (its device-mapper UUID): its own, not the source's
    lv = LV._replace(identity="dm:LVM-Q1b2c3Zz0vgUUIDlvUUID")
    (copy,), refusals = arrival_disks("g", {1: Wanted(64 * MIB, False)}, [lv])
    assert refusals == [] and copy == CopyDisk(1, LV.path, 64 * MIB, "raw", False)


def test_the_destination_makes_an_overlay_on_a_backing_file_it_has() -> None:
    wanted = {0: Wanted(16 * MIB, True, "qcow2", BASE.path)}
    overlay = IMAGE._replace(format="qcow2")  # the guest file says qcow2 here too
    (copy,), refusals = arrival_disks("g", wanted, [missing(overlay)], [BASE])
    assert refusals == [] and copy == CopyDisk(0, IMAGE.path, 16 * MIB, "qcow2", True,
                                               BASE.path, "qcow2")
    _, (r,) = arrival_disks("g", wanted, [missing(overlay)],
                            [BASE._replace(size=0, sample="")])
    assert "/srv/base.qcow2, which here lacks" in r.message
    _, (r,) = arrival_disks("g", wanted, [missing(IMAGE)], [BASE])  # format = "raw" here
    assert r.message == ('disk[0].path = "/srv/local/g.img": an overlay on /srv/base.qcow2 '
                         'asked for, the guest file here says format = "raw"')
    assert r.status is ExitStatus.CONFIG


def test_disk_facts_from_json_are_checked() -> None:
    assert DiskFact.from_json(IMAGE.to_json()) == IMAGE
    for field, value in (("size", "1"), ("kind", "socket"), ("writable", 1), ("number", True)):
        with pytest.raises(ValueError, match=field):
            DiskFact.from_json(dict(IMAGE.to_json(), **{field: value}))


def job(node: str, status: str, done: int = 0, total: int = 0, **more: object) -> dict:
    return {"id": mirror_job(node), "type": "mirror", "status": status,
            "current-progress": done, "total-progress": total, **more}


def test_in_step_when_every_mirror_is_ready() -> None:
    nodes = ["disk0", "disk1"]
    state = copy_state([job("disk0", "ready", 5, 5), job("disk1", "running", 1, 4)], nodes)
    assert state == CopyState(False, "", 6, 9)
    assert copy_state([job("disk0", "ready", 5, 5), job("disk1", "standby", 4, 4)],
                      nodes).ready
    assert copy_state([job("disk0", "ready"), job("other", "ready")], ["disk0"]).ready
    assert copy_state([], []).ready is False
    failed = copy_state([job("disk0", "concluded", error="Input/output error")], ["disk0"])
    assert failed.failed == "the copy of disk0 failed: Input/output error"
    assert copy_state([], ["disk0"]).failed == "the copy of disk0 ended"
    assert copy_line(CopyState(False, "", 8 * MIB, 16 * MIB)) == \
        "copying disks: 8.0 of 16.0 MiB (50%)"


def test_what_the_command_does_while_copying() -> None:
    ready, busy = CopyState(True, "", 1, 1), CopyState(False, "", 0, 1)
    assert copy_step(busy, "serving", interrupted=False, dest_gone=False)[0] is CopyStep.WAIT
    assert copy_step(ready, "serving", interrupted=False, dest_gone=False)[0] \
        is CopyStep.MIGRATE
    assert copy_step(ready, "serving", interrupted=True, dest_gone=False) == (
        CopyStep.CANCEL, "interrupted")
    assert copy_step(busy, "failed: x", interrupted=False, dest_gone=False) == (
        CopyStep.CANCEL, "the destination failed: x")
    assert copy_step(ready, "serving", interrupted=False, dest_gone=True)[0] is CopyStep.CANCEL
    assert copy_step(CopyState(False, "the copy of disk0 ended", 0, 0), "serving",
                     interrupted=False, dest_gone=False) == (CopyStep.CANCEL,
                                                             "the copy of disk0 ended")


def test_the_switch_waits_for_every_mirror_to_complete() -> None:
    nodes = ["disk0", "disk1"]
    both = [job("disk0", "concluded"), job("disk1", "pending")]
    assert switch_step(both, nodes, 0.1) == (None, "")
    assert switch_step([job("disk0", "concluded"), job("disk1", "concluded")], nodes, 0.1) \
        == (True, "")
    assert switch_step(both, nodes, SWITCH_TIMEOUT + 1)[0] is False
    assert switch_step([job("disk0", "concluded", error="EIO"), job("disk1", "concluded")],
                       nodes, 0.1) == (False, "the copy of disk0 failed: EIO")
    assert switch_step([job("disk0", "concluded")], nodes, 0.1) == (
        False, "the copy of disk1 is gone")


def test_the_destination_gives_up_on_a_silent_source() -> None:
    assert heartbeat(1.0) is None
    assert heartbeat(STALL_LIMIT) is None
    assert "no word from the source for 16 s" in str(heartbeat(STALL_LIMIT + 1))


def test_a_backing_file_is_known_by_its_size_and_its_ends(tmp_path: Path) -> None:
    """backing_fact reads real files: a copy byte for byte is the same file;
    a change in its first or last MiB, or another size, is another; a
    missing file has size 0."""
    from kvmagent.host.diskfacts import backing_fact
    data = bytearray(os.urandom(3 * MIB + 5))
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "copy").write_bytes(data)
    a = backing_fact(str(tmp_path / "a"), "raw")
    assert a.size == len(data) and len(a.sample) == 64 and a.format == "raw"
    assert backing_fact(str(tmp_path / "copy"), "raw")[2:] == a[2:]
    for at in (0, len(data) // 2, len(data) - 1):
        changed = bytearray(data)
        changed[at] ^= 1
        (tmp_path / "b").write_bytes(changed)
        assert backing_fact(str(tmp_path / "b"), "raw").sample != a.sample
    (tmp_path / "c").write_bytes(data[:-1])
    assert backing_fact(str(tmp_path / "c"), "raw").size == len(data) - 1
    assert backing_fact(str(tmp_path / "none"), "raw") == Backing(str(tmp_path / "none"),
                                                                 "raw", 0, "")
