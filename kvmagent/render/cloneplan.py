"""`kvmagent clone SRC NEW`, as plain data: what is made for each of the
source guest's disks (by its kind, as the host found it: an image file, an
LVM logical volume, another block device), with which command, and how it
is undone; and the new guest's TOML.  Pure: kvmagent.cli.clone looks at the
host, asks the running source's supervisor to pause, runs the commands and
writes the file.

The choices, documented in kvmagent(1):

- a read-only disk (a CD-ROM, a shared image) is shared: both guests name
  the same file;
- SRC a template (every disk read-only): each image file gets a qcow2
  overlay that NEW writes, beside SRC's image
  (`qemu-img create -f qcow2 -b SRC_IMAGE -F FORMAT`);
- a writable image file is copied with --copy (`cp --sparse=always`, any
  format) and refused without: an overlay on an image that SRC writes
  again would be corrupted silently;
- a writable LVM volume gets an LVM snapshot with --snapshot SIZE
  (`lvcreate -s -L SIZE`), or with --copy a new volume of the same size in
  the same volume group and a byte copy (`dd`);
- any other writable block device is not cloned;
- a running SRC: only snapshots (an instant) are taken from its writable
  disks, with the guest paused meanwhile (kvmagent.unit.channel's freeze):
  crash-consistent, as if the power had been cut at that instant;
- NEW's images and volumes are named after SRC's with SRC's name replaced
  by NEW's where it is a word of it (/srv/kvm/web1.img -> /srv/kvm/web2.qcow2,
  vg0/web1-root -> vg0/web2-root), else prefixed with NEW's name;
- NEW's file is SRC's merged configuration (its drop-ins included; its
  comments are not kept) without `uuid` and without the NICs' `mac`: both
  are derived from NEW's name, as for any guest that sets none."""

from __future__ import annotations

import copy
import enum
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmagent.config.model import Guest
from kvmagent.errors import ExitStatus, KvmagentError, config_error
from kvmagent.foreign.importtoml import GuestToml
from kvmagent.names import default_mac, guest_uuid


class Kind(enum.StrEnum):
    FILE = "file"  # a regular file
    LV = "lv"  # an LVM logical volume
    BLOCK = "block"  # any other block device


class Action(enum.StrEnum):
    SHARE = "share"  # read-only: both guests use it
    OVERLAY = "overlay"  # qcow2 overlay on an image file
    COPY_FILE = "copy-file"
    SNAPSHOT = "snapshot"  # LVM snapshot
    COPY_LV = "copy-lv"


@dataclass(frozen=True)
class DiskFacts:
    """What the host says about one disk of SRC."""
    kind: Kind
    vg: str = ""  # an LV's volume group and name
    lv: str = ""
    size: int = 0  # bytes (LV)


@dataclass(frozen=True)
class Step:
    """One disk of NEW: how it is made (commands run in order, each an
    argv) and undone (an argv, or a file to remove)."""
    index: int
    action: Action
    source: Path
    target: Path
    format: str
    commands: tuple[tuple[str, ...], ...] = ()
    temp: Path | None = None  # made here, then linked to target (never over a file)
    undo: tuple[str, ...] = ()  # for a volume; a file target is removed


@dataclass(frozen=True)
class ClonePlan:
    src: str
    new: str
    steps: tuple[Step, ...]
    freeze: bool  # SRC runs: pause it while the snapshots are taken
    toml: str
    notes: tuple[str, ...] = field(default=())


def _word_re(name: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])")


def new_name(old: str, src: str, new: str) -> str:
    """A file or volume name of SRC's for NEW: SRC's name replaced where it
    is a word of OLD, else NEW's name put in front."""
    renamed, count = _word_re(src).subn(new, old)
    return renamed if count else f"{new}-{old}"


def _usage(message: str, hint: str | None = None) -> KvmagentError:
    return KvmagentError(message, hint, ExitStatus.USAGE)


def snapshot_size_arg(size: int) -> str:
    """lvcreate's -L for SIZE bytes: whole MiB, rounded up."""
    return f"{max(1, math.ceil(size / (1 << 20)))}m"


def plan_clone(src: Guest, data: dict[str, Any], files: list[Path], new: str,
               facts: dict[int, DiskFacts], *, snapshot: int | None, full_copy: bool,
               running: bool) -> ClonePlan:
    """SRC (validated; DATA, its merged TOML, from FILES) cloned as NEW,
    with FACTS for each of its writable disks.  KvmagentError naming the
    disk when one cannot be cloned so."""
    origin = lambda i: src.origin_of(f"disk[{i}].path")  # noqa: E731
    steps: list[Step] = []
    taken: set[Path] = set()
    notes: list[str] = []
    if snapshot is not None and not any(facts[d.index].kind is Kind.LV and not d.readonly
                                        for d in src.disks):
        raise _usage(f"--snapshot SIZE is for LVM volumes; guest {src.name} has no writable "
                     "one", "leave it out")
    for d in src.disks:
        if d.readonly:
            steps.append(Step(d.index, Action.SHARE, d.path, d.path, str(d.format)))
            continue
        fact = facts[d.index]
        where = f"{origin(d.index)}: disk[{d.index}].path = \"{d.path}\""
        if fact.kind is Kind.BLOCK:
            raise config_error(f"{where}: a block device that is not an LVM logical volume; "
                               "kvmagent clones image files and LVM volumes",
                               "copy it by hand, or clone a guest whose disk is an image file "
                               "or an LV")
        if fact.kind is Kind.LV:
            if not full_copy and snapshot is None:
                raise _usage(f"{where}: an LVM volume: clone it with --snapshot SIZE (an LVM "
                             "snapshot with room for SIZE of changes) or --copy",
                             f"e.g. kvmagent clone {src.name} {new} --snapshot 1G")
            if full_copy and running:
                raise KvmagentError(f"{where}: guest {src.name} is running and writes it; "
                                    "a copy takes time and is no snapshot",
                                    f"stop it first (kvmagent stop {src.name}), or use "
                                    "--snapshot SIZE")
            lv = new_name(fact.lv, src.name, new)
            target = Path("/dev") / fact.vg / lv
            if full_copy:
                steps.append(Step(d.index, Action.COPY_LV, d.path, target, str(d.format), (
                    ("lvcreate", "--yes", "-Wn", "-Zn", "-L", f"{fact.size}b", "-n", lv,
                     fact.vg),
                    ("dd", f"if={d.path}", f"of={target}", "bs=4M", "conv=fsync",
                     "status=none")), undo=("lvremove", "-f", f"{fact.vg}/{lv}")))
            else:
                assert snapshot is not None
                steps.append(Step(d.index, Action.SNAPSHOT, d.path, target, str(d.format), (
                    ("lvcreate", "-s", "-L", snapshot_size_arg(snapshot), "-n", lv,
                     f"{fact.vg}/{fact.lv}"),), undo=("lvremove", "-f", f"{fact.vg}/{lv}")))
        else:
            if running:
                raise KvmagentError(
                    f"{where}: guest {src.name} is running and writes this image; an image "
                    "file is cloned from a stopped guest only", f"stop it first (kvmagent "
                    f"stop {src.name}); an LVM volume can be snapshotted while it runs")
            if not full_copy:
                raise KvmagentError(
                    f"{where}: writable in guest {src.name}: a qcow2 overlay on it would be "
                    f"corrupted once {src.name} writes it again",
                    f"make {src.name} a template (readonly = true in this [[disk]]: the clone "
                    "gets an overlay, and the image stays as it is), or clone with --copy",
                    ExitStatus.CONFIG)
            name = new_name(d.path.name, src.name, new)
            target = _unique(d.path.with_name(name), d.index, taken)
            temp = target.with_name(f".{target.name}.kvmagent-clone")
            steps.append(Step(d.index, Action.COPY_FILE, d.path, target, str(d.format), (
                ("cp", "--sparse=always", "--reflink=auto", "--", str(d.path), str(temp)),),
                temp=temp))
        taken.add(steps[-1].target)
    # the image files of a template (every disk read-only): an overlay each,
    # which the clone writes
    if not full_copy and _template(src):
        steps = [_overlay(s, src, new, taken) if s.action is Action.SHARE and facts.get(
            s.index, DiskFacts(Kind.FILE)).kind is Kind.FILE and str(
                src.disks[s.index].media) == "disk" else s for s in steps]
    freeze = running and any(s.action is Action.SNAPSHOT for s in steps)
    if freeze:
        notes.append(f"guest {src.name} is running: its LVM snapshots are taken with it paused "
                     "for that instant, crash-consistent (as after a power cut): "
                     f"{new}'s file systems are checked or replayed at its first boot")
    if src.display.vnc and not src.display.vnc.startswith("unix:"):
        notes.append(f"[display] vnc = \"{src.display.vnc}\" is {src.name}'s too: give {new} "
                     "another display before both run")
    toml = clone_toml(src, data, files, new, steps, notes)
    return ClonePlan(src.name, new, tuple(steps), freeze, toml, tuple(notes))


def _template(src: Guest) -> bool:
    """SRC is a template: every drive read-only (its clones get overlays
    they write)."""
    return all(d.readonly for d in src.disks)


def _unique(target: Path, index: int, taken: set[Path]) -> Path:
    if target in taken:
        return target.with_name(f"{target.stem}-disk{index}{target.suffix}")
    return target


def _overlay(step: Step, src: Guest, new: str, taken: set[Path]) -> Step:
    stem = new_name(step.source.stem, src.name, new)
    target = _unique(step.source.with_name(f"{stem}.qcow2"), step.index, taken)
    taken.add(target)
    temp = target.with_name(f".{target.name}.kvmagent-clone")
    return Step(step.index, Action.OVERLAY, step.source, target, "qcow2", (
        ("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(step.source), "-F", step.format,
         str(temp)),), temp=temp)


def clone_toml(src: Guest, data: dict[str, Any], files: list[Path], new: str,
               steps: list[Step], notes: list[str]) -> str:
    """NEW's guest file: SRC's merged values, its disks as STEPS made
    them, no uuid and no NIC's mac (derived from NEW's name)."""
    data = copy.deepcopy(data)
    doc = GuestToml(header=[
        f"Guest {new}, cloned from {src.name} ({', '.join(map(str, files))}) "
        f"by `kvmagent clone`; its drop-ins are merged into this file."] + notes)
    data.pop("uuid", None)
    if "description" in data:
        data["description"] = f"{data['description']} (clone of {src.name})"
    for key, value in data.items():
        if not isinstance(value, (dict, list)) or (isinstance(value, list) and not all(
                isinstance(v, dict) for v in value)):
            note = ""
            if key == "description":
                note = f"{src.name}'s, marked as its clone."
            doc.top.set(key, value, note)
    doc.top.note(f"uuid: derived from the name ({guest_uuid(new)}), as for any guest that sets "
                 "none.")
    for key, value in data.items():
        if isinstance(value, dict):
            section = doc.table(key)
            for k, v in value.items():
                section.set(k, v)
    by_index = {s.index: s for s in steps}
    for i, disk in enumerate(data.get("disk", [])):
        section = doc.entry("disk")
        step = by_index[i]
        for k, v in disk.items():
            section.set(k, v)
        section.set("path", str(step.target), _disk_note(step))
        if step.action is not Action.SHARE or "format" in disk:
            section.set("format", step.format)
        if step.action is Action.OVERLAY:  # NEW writes its overlay
            section.items = [item for item in section.items if item[0] != "readonly"]
    for i, nic in enumerate(data.get("nic", [])):
        section = doc.entry("nic")
        for k, v in nic.items():
            if k != "mac":
                section.set(k, v)
        section.note(f"mac: derived from the name ({default_mac(new, i)}); {src.name}'s was "
                     f"{nic.get('mac', default_mac(src.name, i))}.")
    return doc.render()


def _disk_note(step: Step) -> str:
    return {
        Action.SHARE: "read-only, shared with the source guest.",
        Action.OVERLAY: f"a qcow2 overlay on {step.source} (its backing file, which must not "
                        "change).",
        Action.COPY_FILE: f"a copy of {step.source}.",
        Action.SNAPSHOT: f"an LVM snapshot of {step.source}.",
        Action.COPY_LV: f"a copy of {step.source}, an LVM volume of the same size.",
    }[step.action]
