"""`kvmagent migrate --copy-storage`'s decisions, pure: which disks are
copied and which of them kvmagent makes on the other host (plan_copy, from
plain facts of both hosts: DiskFact), what the command does while the disks
are copied (copy_step), when the supervisor may let the guest switch hosts
(switch_step), and when the destination gives up on a silent source
(heartbeat).  kvmagent.cli.nbdcopy and kvmagent.unit.mirror carry them out.

The copy, in order: the destination's QEMU (waiting, -incoming defer)
serves the guest's writable disks over NBD, each a writable export named
after its drive ("disk0"); the source's QEMU mirrors each of them there
(blockdev-mirror, sync=full) over its own ssh session, while the guest runs
and writes on; once every mirror is ready (in step), the guest's RAM
follows with QEMU's pause-before-switchover: with the guest paused, the
supervisor completes the mirrors (block-job-cancel of a ready mirror leaves
its target a consistent copy of that instant, libvirt's way), closes the
NBD connections and lets the migration finish; the destination stops its
NBD server before the guest resumes there.  Until then the source's disks
are the guest's: any failure cancels the mirrors and the migration, and the
guest runs on where it was.

A qcow2 overlay on backing files (a clone's disk on its template) is copied
as an overlay: its backing files must be on the destination already, at
the same paths and the same files (Backing: their size and a checksum of
samples across them), kvmagent makes the overlay there on them, and
the mirror sends what the overlay holds alone (sync=top)."""

from __future__ import annotations

import enum
import posixpath
from typing import Any, NamedTuple

from kvmagent.errors import ExitStatus
from kvmagent.render import records
from kvmagent.render.migration import STALL_LIMIT, Refusal

# The source's word to the destination on the migration stream while the
# disks are copied (before QEMU's own stream starts): HEARTBEAT every
# HEARTBEAT_EVERY seconds, GO once: the state follows.  A destination that
# hears nothing for STALL_LIMIT seconds gives up (a link that died without
# a word: its sshd would wait for hours).
HEARTBEAT = b"."
GO = b"!"
HEARTBEAT_EVERY = 1.0
# With the guest paused at the switch: how long the mirrors have to
# complete (what the guest wrote last is copied then).
SWITCH_TIMEOUT = 30.0


class Kind(enum.StrEnum):
    FILE = "file"  # a regular file: an image
    BLOCK = "block"  # a block device
    MISSING = "missing"  # nothing there; its directory exists
    NO_DIRECTORY = "no-directory"  # not even its directory
    OTHER = "other"  # something else, or unreadable


class Backing(NamedTuple):
    """A backing file of a qcow2 overlay as one host finds it at its path.
    Crosses ssh as JSON (`kvmagent migrate-nbd NAME --backing-facts PATH`)."""
    path: str
    format: str  # raw, qcow2: as the overlay above it says ("": not known)
    size: int  # its length in bytes; 0: not there, or unreadable
    sample: str  # sha256 of samples across it: the same file? ("": not there)

    @classmethod
    def from_json(cls, data: object) -> Backing:
        return records.read(cls, data)


class DiskFact(NamedTuple):
    """One disk of the guest as one host finds it.  Crosses ssh as JSON
    (`kvmagent migrate-nbd NAME --facts`)."""
    number: int  # disk[NUMBER] of the guest file
    path: str
    kind: str  # Kind
    size: int  # the guest's disk size in bytes (a qcow2 image's virtual size); 0: none
    writable: bool  # the guest writes it (not readonly)
    format: str  # raw, qcow2: the guest file's
    backing: str  # a qcow2 image's backing file ("": none)
    # A block device's identity, the same on every host that sees it (device
    # identity(): "dm:LVM-..." for a logical volume, "wwid:..." for a SAN or
    # iSCSI disk); "": none known
    identity: str = ""
    # A qcow2 image's backing files, nearest first (() none)
    chain: tuple[Backing, ...] = ()

    @classmethod
    def from_json(cls, data: object) -> DiskFact:
        """ValueError naming the field when DATA is not such a record."""
        fact = records.read(cls, data)
        if fact.kind not in tuple(Kind):
            raise ValueError(f"kind: {fact.kind!r}")
        return fact

    def to_json(self) -> dict[str, Any]:
        return dict(self._asdict(), chain=[b._asdict() for b in self.chain])


class CopyDisk(NamedTuple):
    """A disk that --copy-storage copies: onto HOST's disk at the same path,
    of SIZE bytes, made there by kvmagent (MAKE) or by the admin; a qcow2
    overlay made there on BACKING (of BACKING_FORMAT), which HOST has:
    named as the overlay's header here names it, relative to the overlay's
    directory or absolute (backing_path())."""
    number: int  # disk[NUMBER] of the guest file
    path: str
    size: int
    format: str
    make: bool
    backing: str = ""
    backing_format: str = ""

    @property
    def sync(self) -> str:
        """blockdev-mirror's sync: what the overlay holds alone, or all."""
        return "top" if self.backing else "full"

    @property
    def node(self) -> str:
        """The drive's id (kvmagent.render.qemu), the NBD export's name."""
        return f"disk{self.number}"

    def argument(self) -> list[str]:
        """migrate-incoming's option for it."""
        on = f":{self.backing_format}:{self.backing}" if self.backing else ""
        return ["--make-disk" if self.make else "--copy-disk", f"{self.number}={self.size}{on}"]


def backing_path(disk: str, backing: str) -> str:
    """Where the backing file that qcow2 image DISK's header names BACKING
    is: relative to the image's directory, as QEMU finds it."""
    return posixpath.join(posixpath.dirname(disk), backing)


def _size(n: int) -> str:
    return f"{n} bytes" + (f" ({n / 2 ** 20:.1f} MiB)" if n >= 2 ** 20 else "")


def _no_directory(host: str, key: str) -> Refusal:
    return Refusal(f"{host}: {key}: its directory does not exist", "make it there (mkdir), or "
                   "put the disk where both hosts have the directory", ExitStatus.HOST_NOT_READY)


def _overlay_refusals(host: str, key: str, d: DiskFact, t: DiskFact,
                      backing_there: dict[str, Backing]) -> list[Refusal]:
    """Why qcow2 overlay D cannot be copied as one to HOST (T: HOST's disk
    at its path): kvmagent makes it there, on the same backing files."""
    if t.kind == Kind.NO_DIRECTORY:
        return [_no_directory(host, key)]
    if t.kind != Kind.MISSING:
        return [Refusal(f"{host}: {key} exists there: a qcow2 image on a backing file is "
                        "copied onto an overlay that kvmagent makes there, holding nothing "
                        "but what the copy writes", f"if it is this very image, on storage "
                        f"both hosts share, migrate without --copy-storage; else remove it "
                        f"on {host}", ExitStatus.HOST_NOT_READY)]
    refusals = []
    for b in d.chain:
        found = backing_there.get(b.path)
        hint = (f"copy {b.path} to {host}, the same file at the same path (cp, rsync), or "
                "flatten the image here while the guest is stopped (qemu-img convert)")
        if found is None or not found.size:
            refusals.append(Refusal(f"{host}: {key} is a qcow2 image on backing file "
                                    f"{b.path}, which {host} lacks: the copy sends only what "
                                    "the image holds itself", hint, ExitStatus.HOST_NOT_READY))
        elif (found.size, found.sample) != (b.size, b.sample):
            refusals.append(Refusal(
                f"{host}: backing file {b.path} of {key} is another file there ("
                + (f"{_size(found.size)}, here {_size(b.size)})" if found.size != b.size
                   else "other contents: the checksums of samples across it differ)")
                + ": the guest would read another disk", hint, ExitStatus.HOST_NOT_READY))
    return refusals


def plan_copy(name: str, host: str, here: list[DiskFact], there: list[DiskFact],
              backing_there: list[Backing] | None = None
              ) -> tuple[list[CopyDisk], list[Refusal]]:
    """Guest NAME's disks to copy to HOST, and every reason they cannot be.
    HERE and THERE: the same guest's disks (the same guest file: preflight
    refuses a difference); BACKING_THERE: HOST's files at the paths of the
    backing files of HERE's qcow2 overlays.  A read-only disk is never
    copied (HOST's host checks want it there); a writable image file that
    HOST lacks is made there, of the same size and format (an overlay on
    the same backing files, which HOST must have); a block device is never
    made; what HOST has must be of the same size, exactly."""
    copies: list[CopyDisk] = []
    refusals: list[Refusal] = []
    theirs = {d.number: d for d in there}
    backing = {b.path: b for b in backing_there or []}
    for d in here:
        if not d.writable:
            continue
        key = f'disk[{d.number}].path = "{d.path}"'
        if d.kind not in (Kind.FILE, Kind.BLOCK):
            refusals.append(Refusal(f"guest {name}'s {key} is {d.kind} here", None,
                                    ExitStatus.HOST_NOT_READY))
            continue
        t = theirs.get(d.number)
        if t is None or t.path != d.path:
            continue  # the guest files differ: preflight says so
        if d.chain:
            said = _overlay_refusals(host, key, d, t, backing)
            refusals += said
            if not said:
                copies.append(CopyDisk(d.number, d.path, d.size, d.format, True,
                                       d.backing, d.chain[0].format))
            continue
        if t.kind == Kind.MISSING and d.kind == Kind.FILE:
            copies.append(CopyDisk(d.number, d.path, d.size, d.format, True))
        elif t.kind in (Kind.MISSING, Kind.NO_DIRECTORY) and d.kind == Kind.BLOCK:
            # no directory either: /dev/VG is there only while one of its LVs is active
            refusals.append(Refusal(
                f"{host}: {key} does not exist: kvmagent makes no block device",
                f"make one of {_size(d.size)} there (lvcreate -L {d.size}b ...), the size of "
                "the guest's disk here", ExitStatus.HOST_NOT_READY))
        elif t.kind == Kind.NO_DIRECTORY:
            refusals.append(_no_directory(host, key))
        elif t.kind == Kind.OTHER:
            refusals.append(Refusal(f"{host}: {key} is neither an image file nor a block "
                                    "device", None, ExitStatus.HOST_NOT_READY))
        elif d.kind == Kind.BLOCK and d.identity and t.identity == d.identity:
            refusals.append(Refusal(
                f"{host}: {key} is the very device the guest uses here ({d.identity}): "
                "storage both hosts share, which --copy-storage would copy onto itself",
                "migrate without --copy-storage: the disk is there already",
                ExitStatus.FAILURE))
        elif t.size != d.size:
            refusals.append(Refusal(
                f"{host}: {key} is {_size(t.size)}, here {_size(d.size)}: --copy-storage "
                "copies onto a disk of the same size", f"make it {_size(d.size)} on {host} "
                + (f"(lvresize -L {d.size}b ...)" if t.kind == Kind.BLOCK
                   else "(or remove an image file there: kvmagent makes it)"),
                ExitStatus.HOST_NOT_READY))
        else:
            copies.append(CopyDisk(d.number, d.path, d.size, d.format, False))
    return copies, refusals


def replaced_backing(name: str, here: list[DiskFact], found: dict[str, tuple[int, int]],
                     held: set[tuple[int, int]]) -> list[Refusal]:
    """The backing files of guest NAME's overlays (HERE) that its QEMU no
    longer reads at their paths: replaced there since it started (a new
    template moved over the old one).  FOUND: each one's (device, inode)
    at its path; HELD: those of the files its QEMU holds open."""
    return [Refusal(f"guest {name}'s disk[{d.number}] reads its backing file {b.path} as it was "
                    "when the guest started: the file at that path now is another one, "
                    "replaced since", "the copy would give the guest the new file on the "
                    "other host: stop the guest and start it again (it reads the new one "
                    "then), or put the old file back", ExitStatus.FAILURE)
            for d in here if d.writable for b in d.chain if found.get(b.path) not in held]


def missing_there(here: list[DiskFact], there: list[DiskFact]) -> list[tuple[int, str]]:
    """The disks (number, path) missing on HOST whose absence plan_copy
    answers: each writable one, which it makes there or refuses, saying
    why (a block device kvmagent does not make)."""
    theirs = {(d.number, d.path): d for d in there}
    return [(d.number, d.path) for d in here if d.writable and (t := theirs.get(
        (d.number, d.path))) is not None and t.kind in (Kind.MISSING, Kind.NO_DIRECTORY)]


def kept_problems(problems: list[str], disks: list[tuple[int, str]]) -> list[str]:
    """A host's host-check problems but that DISKS (number, path) do not
    exist: the disks kvmagent makes there (they do not exist yet, which is
    the point), or whose absence --copy-storage says more of
    (missing_there)."""
    gone = [f'disk[{number}].path = "{path}": disk does not exist' for number, path in disks]
    return [p for p in problems if not any(p.endswith(g) for g in gone)]


class Wanted(NamedTuple):
    """What the source asks the destination for one disk (--copy-disk,
    --make-disk INDEX=SIZE[:BACKING_FORMAT:BACKING])."""
    size: int
    make: bool
    backing_format: str = ""
    backing: str = ""


def parse_disk_option(text: str, make: bool) -> tuple[int, Wanted]:
    """--copy-disk/--make-disk (MAKE) INDEX=SIZE[:FORMAT:BACKING] ->
    (INDEX, what is wanted); ValueError."""
    index, sep, rest = text.partition("=")
    size, colon, on = rest.partition(":")
    fmt, _, backing = on.partition(":")
    if not sep or not index.isdigit() or not size.isdigit() or int(size) <= 0 \
            or (colon and (fmt not in ("raw", "qcow2") or not backing or not make)):
        raise ValueError(f"{text!r} is not INDEX=BYTES" + ("[:raw|qcow2:BACKING]" if make else ""))
    return int(index), Wanted(int(size), make, fmt, backing)


def arrival_disks(name: str, wanted: dict[int, Wanted], here: list[DiskFact],
                  backing_here: list[Backing] | None = None
                  ) -> tuple[list[CopyDisk], list[Refusal]]:
    """The destination checks again what the source asked for (WANTED, by
    disk index), against its own disks (HERE) and the backing files asked
    for (BACKING_HERE; the source compared them): the same rules as
    plan_copy, seen from this side."""
    mine = {d.number: d for d in here}
    mine_backing = {b.path: b for b in backing_here or []}
    copies: list[CopyDisk] = []
    refusals: list[Refusal] = []
    for index, (size, make, backing_format, backing) in sorted(wanted.items()):
        d = mine.get(index)
        if d is None or not d.writable:
            refusals.append(Refusal(f"guest {name} has no writable disk[{index}] here", None,
                                    ExitStatus.CONFIG))
            continue
        # the source's disk as it asked for it: not this host's device (identity)
        chain: tuple[Backing, ...] = ()
        if backing and d.format != "qcow2":
            refusals.append(Refusal(f'disk[{index}].path = "{d.path}": an overlay on {backing} '
                                    f'asked for, the guest file here says format = '
                                    f'"{d.format}"', None, ExitStatus.CONFIG))
            continue
        if backing:  # as this host has it: present (the source compared the files)
            path = backing_path(d.path, backing)
            b = mine_backing.get(path) or Backing(path, backing_format, 0, "")
            chain = (b._replace(format=backing_format),)
        source = d._replace(kind=Kind.FILE if make else Kind.BLOCK, size=size, backing=backing,
                            identity="", chain=chain)
        found, said = plan_copy(name, "here", [source], [d], list(chain))
        if found and found[0].make != make:
            said.append(Refusal(f'disk[{index}].path = "{d.path}" exists here now', None,
                                ExitStatus.HOST_NOT_READY))
        copies += found if not said else []
        refusals += said
    return copies, refusals


class CopyState(NamedTuple):
    """The mirrors as the source's QEMU reports them (query-jobs)."""
    ready: bool  # every one in step: the RAM may follow
    failed: str  # why one failed ("": none did)
    done: int  # bytes copied, all disks
    total: int  # bytes to copy (grows as the guest writes)


def copy_state(jobs: list[dict[str, Any]], nodes: list[str]) -> CopyState:
    """query-jobs' answer, for the mirror jobs of NODES ("copy-disk0": the
    job of disk0)."""
    by_id = {str(j.get("id")): j for j in jobs if isinstance(j, dict)}
    ready, done, total = bool(nodes), 0, 0
    for node in nodes:
        job = by_id.get(mirror_job(node))
        if job is None:
            return CopyState(False, f"the copy of {node} ended", done, total)
        status = str(job.get("status"))
        if job.get("error") or status in ("concluded", "aborting", "null"):
            return CopyState(False, f"the copy of {node} failed: "
                             f"{job.get('error') or status}", done, total)
        ready = ready and status in ("ready", "standby")  # standby: ready, drained a moment
        done += int(job.get("current-progress", 0))
        total += int(job.get("total-progress", 0))
    return CopyState(ready, "", done, total)


def mirror_job(node: str) -> str:
    """The id of the mirror job of drive NODE, and of its NBD target node
    and fd on the source."""
    return f"copy-{node}"


class CopyStep(enum.Enum):
    WAIT = "wait"
    CANCEL = "cancel"  # the mirrors cancelled; the guest runs on here
    MIGRATE = "migrate"  # every disk is in step: the RAM follows


def copy_step(state: CopyState, dest: str, *, interrupted: bool,
              dest_gone: bool) -> tuple[CopyStep, str]:
    """What `kvmagent migrate --copy-storage` does next while the disks are
    copied.  DEST: the destination's last word, as source_step has it."""
    if interrupted:
        return CopyStep.CANCEL, "interrupted"
    if dest.startswith("failed"):
        return CopyStep.CANCEL, f"the destination {dest}"
    if dest_gone:
        return CopyStep.CANCEL, "the connection to the destination ended"
    if state.failed:
        return CopyStep.CANCEL, state.failed
    if state.ready:
        return CopyStep.MIGRATE, ""
    return CopyStep.WAIT, ""


def switch_step(jobs: list[dict[str, Any]], nodes: list[str],
                waited: float) -> tuple[bool | None, str]:
    """At the switch (the guest paused, the mirrors told to complete):
    (True, "") every mirror completed, the migration may go on; (False,
    why) one failed or did not within SWITCH_TIMEOUT: cancel; (None, "")
    wait."""
    by_id = {str(j.get("id")): j for j in jobs if isinstance(j, dict)}
    pending = False
    for node in nodes:
        job = by_id.get(mirror_job(node))
        if job is None:
            return False, f"the copy of {node} is gone"
        if job.get("error"):
            return False, f"the copy of {node} failed: {job['error']}"
        pending = pending or job.get("status") != "concluded"
    if not pending:
        return True, ""
    if waited > SWITCH_TIMEOUT:
        return False, f"the copies did not complete within {SWITCH_TIMEOUT:g} s"
    return None, ""


def heartbeat(quiet_for: float) -> str | None:
    """The destination, its disks being copied: why to give up, when no
    word came from the source for QUIET_FOR seconds."""
    if quiet_for > STALL_LIMIT:
        return f"no word from the source for {quiet_for:.0f} s: the link is gone"
    return None


def copy_line(state: CopyState) -> str:
    """The progress line while the disks are copied."""
    mib = 2 ** 20
    share = f" ({100 * state.done // state.total}%)" if state.total else ""
    return (f"copying disks: {state.done / mib:.1f} of {state.total / mib:.1f} MiB{share}"
            + (", in step" if state.ready else ""))
