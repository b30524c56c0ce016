"""`kvmagent migrate --copy-storage`: the guest's disks copied to HOST while
it runs (kvmagent.render.storagecopy decides, kvmagent.unit.mirror runs the
mirrors and the NBD server in the supervisors); and its internal command
`kvmagent migrate-nbd NAME`, run over ssh on HOST: one disk's NBD
connection, its standard input and output joined to the NBD server of the
arriving guest's QEMU (a unix socket in the guest's runtime directory,
root's alone).

Before anything moves: each host's disks (DiskFact: `migrate-nbd NAME
--facts` on HOST) go through plan_copy.  On HOST, migrate-incoming makes the
image files it was asked to (--make-disk: the same size and format, root's
and 0600, as QEMU gets its disks as file descriptors), checks the admin's
(--copy-disk: the same size), and removes what it made if the migration
fails.  Then the copy: its supervisor serves the disks over NBD, the source
opens one ssh session per disk and its supervisor mirrors each disk there;
meanwhile the source says on the migration stream, once a second, that it is
alive (HEARTBEAT), and GO once every disk is in step: the guest's state
follows."""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import IO, Any

from kvmagent.config.model import Guest
from kvmagent.errors import ExitStatus, KvmagentError, host_error
from kvmagent.host import ssh
from kvmagent.host.diskfacts import backing_fact, disk_facts, held_files
from kvmagent.paths import Paths
from kvmagent.render.migration import Refusal, SideFacts
from kvmagent.render.storagecopy import (GO, HEARTBEAT, HEARTBEAT_EVERY, Backing, CopyDisk,
                                         CopyStep, DiskFact, Wanted, arrival_disks, backing_path,
                                         copy_line, copy_state, copy_step, heartbeat,
                                         kept_problems, missing_there, parse_disk_option,
                                         plan_copy, replaced_backing)
from kvmagent.unit import protocol

POLL = 0.2  # seconds between looks at the copies
CHUNK = 1 << 20
IMAGE_MODE = 0o600
QEMU_IMG_TIMEOUT = 120.0


# -- the source's preflight ----------------------------------------------------

def _remote(target: ssh.Target, args: list[str], read: Callable[[Any], Any]) -> list[Any]:
    """`kvmagent migrate-nbd ARGS` on HOST: its JSON list, each READ."""
    proc = ssh.start(target, ["migrate-nbd", *args])
    out, err = proc.communicate(timeout=120)
    try:
        data = json.loads(out)
        if not isinstance(data, list):
            raise ValueError("not a list")
        return [read(d) for d in data]
    except ValueError:
        raise KvmagentError(f"{target}: kvmagent migrate-nbd {args[1]} failed (exit status "
                            f"{proc.returncode}): {err.decode().strip()}",
                            "is kvmagent installed there, at the same version?",
                            ExitStatus.FAILURE) from None


def _replaced(guest: Guest, here: list[DiskFact], paths: list[str],
              qemu_pid: object) -> list[Refusal]:
    """The guest's backing files (at PATHS) replaced there since its QEMU
    (QEMU_PID; None: a supervisor that does not say) opened them."""
    if not paths or not isinstance(qemu_pid, int):
        return []
    try:
        held = held_files(qemu_pid)
    except OSError as e:
        raise host_error(f"guest {guest.name}'s QEMU (pid {qemu_pid}): its open files cannot "
                         f"be read: {e.strerror}") from None
    found = {}
    for path in paths:
        with suppress(OSError):
            st = os.stat(path)
            found[path] = (st.st_dev, st.st_ino)
    return replaced_backing(guest.name, here, found, held)


def plan(target: ssh.Target, guest: Guest, there: SideFacts,
         qemu_pid: object = None) -> tuple[list[CopyDisk], SideFacts, list[Refusal]]:
    """The source's preflight of the copy: the disks to copy, HOST's facts
    without the problems of the disks missing there that kvmagent makes or
    refuses itself (missing_there), and the reasons it cannot.  QEMU_PID:
    the guest's QEMU, whose open files say which backing files it reads."""
    here = disk_facts(guest, strict=True)
    paths = [b.path for d in here if d.writable for b in d.chain]
    if refused := _replaced(guest, here, paths, qemu_pid):
        return [], there, refused
    theirs = _remote(target, [guest.name, "--facts"], DiskFact.from_json)
    backing = _remote(target, [guest.name, "--backing-facts", *paths],
                      Backing.from_json) if paths else []
    copies, refusals = plan_copy(guest.name, str(target), here, theirs, backing)
    if not copies and not refusals:
        refusals.append(Refusal(f"guest {guest.name} has no writable disk to copy",
                                "migrate without --copy-storage", ExitStatus.USAGE))
    problems = kept_problems(there.problems, missing_there(here, theirs))
    return copies, there._replace(problems=problems), refusals


# -- the destination: migrate-incoming --make-disk/--copy-disk -------------------

def _make_image(path: Path, fmt: str, size: int, backing: str = "",
                backing_format: str = "") -> None:
    if fmt == "raw":
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, IMAGE_MODE)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return
    # qcow2: qemu-img writes its header; a file is there first, ours, 0600
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, IMAGE_MODE))
    # an overlay on BACKING: its size given, qemu-img need not open it (-u)
    on = ["-b", backing, "-F", backing_format, "-u"] if backing else []
    argv = ["qemu-img", "create", "-q", "-f", fmt, *on, str(path), str(size)]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT,
                           stdin=subprocess.DEVNULL,
                           env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})
    except FileNotFoundError:
        path.unlink()
        raise host_error("qemu-img is not installed here: it makes the qcow2 image of the "
                         "copy", "apt-get install qemu-utils") from None
    if r.returncode != 0:
        path.unlink()
        raise KvmagentError(f"{' '.join(argv)} failed: {r.stderr.strip()}")


class Arrival:
    """The destination's part of the copy: the disks it made (removed again
    if the guest does not arrive), then serving them until the source says
    GO."""

    def __init__(self, name: str, paths: Paths, copies: list[CopyDisk]) -> None:
        self.name, self.paths, self.copies = name, paths, copies
        self.made: list[Path] = []
        self.served = False  # the NBD server ran: the source may have written
        self.listener = paths.guest_runtime(name) / "nbd.sock"

    @classmethod
    def check(cls, args: argparse.Namespace, guest: Guest, paths: Paths) -> Arrival:
        """Check what the source asked for against this host's disks; a
        refusal is the error of a host problem (exit 5), and nothing is
        made."""
        wanted: dict[int, Wanted] = {}
        for option, make in ((args.copy_disk, False), (args.make_disk, True)):
            for text in option or []:
                try:
                    index, wanted[index] = parse_disk_option(text, make)
                except ValueError as e:
                    raise KvmagentError(f"--{'make' if make else 'copy'}-disk: {e}", None,
                                        ExitStatus.USAGE) from None
        disks = {d.index: str(d.path) for d in guest.disks}
        backing = [backing_fact(backing_path(disks[i], w.backing), w.backing_format)
                   for i, w in wanted.items() if w.backing and i in disks]
        copies, refusals = arrival_disks(guest.name, wanted, disk_facts(guest), backing)
        if refusals:
            for r in refusals[1:]:
                print(f"kvmagent: {r.message}", file=sys.stderr)
            raise KvmagentError(refusals[0].message, refusals[0].hint, refusals[0].status)
        return cls(guest.name, paths, copies)

    def unmade(self, problems: list[KvmagentError]) -> list[KvmagentError]:
        """The host checks' problems but the missing disks this will make."""
        kept = kept_problems([p.message for p in problems],
                             [(c.number, c.path) for c in self.copies if c.make])
        return [p for p in problems if p.message in kept]

    def make(self) -> None:
        """The image files asked for (--make-disk): removed by remove()."""
        for c in self.copies:
            if c.make:
                try:
                    _make_image(Path(c.path), c.format, c.size, c.backing, c.backing_format)
                except OSError as e:
                    raise host_error(f'disk[{c.number}].path = "{c.path}": cannot make it: '
                                     f"{e.strerror}") from None
                self.made.append(Path(c.path))

    def remove(self) -> None:
        """The guest did not arrive: what this made goes; the admin's disks
        that the copy wrote to stay, and that is said."""
        for path in self.made:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        self.made.clear()
        self.listener.unlink(missing_ok=True)
        for c in self.copies if self.served else []:
            if not c.make:
                print(f"kvmagent: disk[{c.number}].path = \"{c.path}\" (the admin's, kept) "
                      "may hold a part of the copy now", file=sys.stderr)

    def arrived(self) -> None:
        self.made.clear()  # the guest's disks now
        self.listener.unlink(missing_ok=True)

    def serve(self, control: Path) -> str | None:
        """migrate-serve: the supervisor's QEMU serves the disks on a
        listening socket made here; why it refused, KvmagentError when the
        supervisor does not answer (yet)."""
        # there, or KvmagentError
        protocol.call(control, protocol.MigrateStatusAsk(), protocol.MigrationStatus, timeout=5.0)
        self.listener.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            old = os.umask(0o177)
            try:
                sock.bind(str(self.listener))
            finally:
                os.umask(old)
            protocol.call(control, protocol.ServeAsk([c.node for c in self.copies]),
                          protocol.Done, timeout=30.0, fds=[sock.fileno()])
        except KvmagentError as e:
            self.listener.unlink(missing_ok=True)
            return e.message
        finally:
            sock.close()  # QEMU holds it
        self.served = True
        return None

    def wait_for_go(self, control: Path, stopped: list[int], fd: int) -> str | None:
        """Read the source's heartbeats on the migration stream FD (the ssh
        session's standard input, or the TCP connection) until GO; None
        then, else why not.  One byte at a time: what follows GO is QEMU's."""
        heard = time.monotonic()
        while not stopped:
            ready, _, _ = select.select([fd], [], [], HEARTBEAT_EVERY)
            if ready:
                try:
                    byte = os.read(fd, 1)
                except OSError as e:
                    return f"the stream from the source failed: {e.strerror}"
                if byte == GO:
                    return None
                if byte != HEARTBEAT:
                    return ("the source closed the stream" if not byte
                            else "the source sent something else than its heartbeat")
                heard = time.monotonic()
            if (why := heartbeat(time.monotonic() - heard)) is not None:
                return why
            try:  # the supervisor is there, and waits as long as this asks
                protocol.call(control, protocol.MigrateStatusAsk(), protocol.MigrationStatus,
                              timeout=10.0)
            except KvmagentError as e:
                return f"the supervisor ended: {e.message}"
        return f"interrupted (signal {stopped[0]})"


# -- migrate-nbd NAME ----------------------------------------------------------

def _pump(read: Callable[[], bytes], write: Callable[[bytes], None],
          done: Callable[[], None]) -> None:
    try:
        while data := read():
            write(data)
    except OSError:
        pass
    finally:
        done()


def cmd_migrate_nbd(args: argparse.Namespace, paths: Paths) -> int:
    from kvmagent.config.guests import load_guest, load_host_config
    guest = load_guest(paths, args.name, load_host_config(paths))  # exit 6, 8
    if args.facts:
        print(json.dumps([d.to_json() for d in disk_facts(guest)]))
        return ExitStatus.OK
    if args.backing_facts:
        print(json.dumps([backing_fact(p, "")._asdict() for p in args.backing_facts]))
        return ExitStatus.OK
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(paths.guest_runtime(guest.name) / "nbd.sock"))
    except OSError as e:
        raise KvmagentError(f"guest {guest.name}: no NBD server of an arriving guest here: "
                            f"{e.strerror}", "kvmagent migrate --copy-storage runs this") from None
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()

    def write_out(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(stdout, view):]

    def shut() -> None:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    inbound = threading.Thread(target=_pump, args=(lambda: os.read(stdin, CHUNK), sock.sendall,
                                                   shut), daemon=True)
    inbound.start()
    # Until the server ends the connection (the source closed it, or the
    # guest's QEMU here ended): then the ssh session ends too.
    _pump(lambda: sock.recv(CHUNK), write_out, lambda: None)
    return ExitStatus.OK


# -- the source ----------------------------------------------------------------

class Copy:
    """The source's part: one ssh session per disk (migrate-nbd on HOST),
    its other end handed to the supervisor, whose QEMU mirrors the disk onto
    it; then the wait until every disk is in step."""

    def __init__(self, target: ssh.Target, name: str, control: Path,
                 copies: list[CopyDisk], bandwidth: int | None) -> None:
        self.target, self.name, self.control = target, name, control
        self.copies, self.bandwidth = copies, bandwidth
        self.sessions: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []

    def start(self) -> None:
        for c in self.copies:
            ours, theirs = socket.socketpair()
            err = tempfile.TemporaryFile()
            try:
                proc = subprocess.Popen(ssh.ssh_argv(self.target, ["migrate-nbd", self.name]),
                                        stdin=theirs.fileno(), stdout=theirs.fileno(),
                                        stderr=err, start_new_session=True)
                self.sessions.append((proc, err))
                theirs.close()
                ask = protocol.CopyAsk(c.node, str(self.target), c.sync, self.bandwidth)
                copying = protocol.call(self.control, ask, protocol.Copying, timeout=60.0,
                                        fds=[ours.fileno()])
                if copying.sync != c.sync:  # a supervisor from before sync=top
                    print(f"kvmagent: {c.node}: the guest's supervisor, older than this "
                          f"kvmagent, copies the whole disk, its backing files' data too "
                          f"(the overlay on {self.target} is fully allocated then)",
                          file=sys.stderr, flush=True)
            finally:
                ours.close()
                theirs.close()

    def wait(self, stream: socket.socket, last: Callable[[], tuple[str, bool]],
             interrupted: list[int],
             say: Callable[[str, dict[str, Any]], None]) -> tuple[CopyStep, str]:
        """Until every disk is in step (GO sent on STREAM: the state may
        follow) or the copy is to be cancelled.  LAST: the destination's last
        word, and whether its session ended."""
        nodes = [c.node for c in self.copies]
        beat = 0.0
        while True:
            now = time.monotonic()
            if now >= beat:
                try:
                    stream.sendall(HEARTBEAT)
                except OSError:
                    return CopyStep.CANCEL, "the connection to the destination ended"
                beat = now + HEARTBEAT_EVERY
            try:
                jobs = protocol.call(self.control, protocol.MigrateStatusAsk(),
                                     protocol.MigrationStatus, timeout=10.0).jobs
                state = copy_state(jobs, nodes)
            except KvmagentError as e:
                return CopyStep.CANCEL, e.message
            dest, gone = last()
            step, why = copy_step(state, dest, interrupted=bool(interrupted), dest_gone=gone)
            if step is CopyStep.MIGRATE:
                try:
                    stream.sendall(GO)
                except OSError:
                    return CopyStep.CANCEL, "the connection to the destination ended"
                say(copy_line(state), {"phase": "copy", "copied": state.done,
                                       "total": state.total, "ready": True})
                return step, why
            if step is CopyStep.CANCEL:
                return step, why
            say(copy_line(state), {"phase": "copy", "copied": state.done, "total": state.total,
                                   "ready": False})
            time.sleep(POLL)

    def close(self) -> str:
        """The sessions end once the NBD connections are closed; what the
        failed ones said."""
        said = []
        for proc, err in self.sessions:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            err.seek(0)
            text = err.read().decode(errors="replace").strip()
            err.close()
            if proc.returncode and text:
                said.append(text)
        self.sessions.clear()
        return "; ".join(said)
