"""`kvmagent migrate NAME [USER@]HOST`: live migration over ssh, shared
storage; and its other half, `kvmagent migrate-incoming NAME` (internal:
run over ssh on HOST by migrate).

The stream is ssh's own: migrate makes a socketpair, starts
`ssh HOST kvmagent migrate-incoming NAME ...` with one end as its stdin, and
hands the other end to the guest's supervisor, whose QEMU migrates into it
(kvmagent.unit.migration).  On HOST, migrate-incoming starts kvm@NAME.service
in incoming mode (a request file its supervisor reads), hands the
supervisor its own stdin (the ssh stream), and reports on its stdout, one
JSON object a line: "listening", "incoming" (with QEMU's status),
"running" or "failed".  Before anything moves, both hosts' facts
(migrate-incoming --facts) go through kvmagent.render.migration.preflight;
while it moves, source_step decides: the source's QEMU ends only once HOST
said that the guest runs there, and anything else (an error, the ssh
session ending, the destination's QEMU dying, Ctrl-C) cancels the migration
and the guest runs on here.  With --transport tcp..., the control stays on
ssh and the stream goes over plain TCP (kvmagent.cli.tcpstream); the
record that follows the guest (its boot, the downtime) is
kvmagent.cli.arrival's.  With --copy-storage the disks go first, while the
guest runs (kvmagent.cli.nbdcopy)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from kvmagent.cli import arrival, tcpstream
from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.host import ssh
from kvmagent.names import service_unit
from kvmagent.paths import Paths
from kvmagent.render.migration import (CPU_RE, MACHINE_RE, Refusal, SideFacts, Step, preflight,
                                       progress_line, source_step, stalled)
from kvmagent.render.plan import Incoming
from kvmagent.render.transport import SSH, TCP, Transport, parse_transport, warning
from kvmagent.unit import channel

if TYPE_CHECKING:
    from kvmagent.cli.nbdcopy import Arrival, Copy
    from kvmagent.render.storagecopy import CopyDisk

SYSTEMCTL_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
LISTEN_TIMEOUT = 120.0  # for the destination's QEMU to wait for the stream
POLL = 0.1  # seconds between looks at the migration (each part of the switch's downtime)
END_TIMEOUT = 60.0  # for the source's unit to end once the guest runs there


def _systemctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=SYSTEMCTL_ENV, timeout=60)


def _emit(event: str, **fields: Any) -> None:
    """A line to the source (over ssh): the destination's progress."""
    try:
        print(json.dumps({"event": event, **fields}), flush=True)
    except BrokenPipeError:
        pass  # the source is gone; the stream's end says it to QEMU too


# -- the destination ---------------------------------------------------------

def side_facts(name: str, paths: Paths) -> SideFacts:
    """What this host says about guest NAME (migrate-incoming --facts)."""
    from kvmagent.config.guests import load_guest, load_host_config
    from kvmagent.host import systemd
    from kvmagent.host.hostcheck import check_host
    from kvmagent.host.qemucaps import capabilities
    from kvmagent.render.show import effective_config
    running = systemd.active_state(service_unit(name)) in systemd.RUNNING_STATES
    try:
        host = load_host_config(paths)
        guest = load_guest(paths, name, host)
    except KvmagentError as e:
        return SideFacts(None, e.message, running, [], [], "")
    _, problems = check_host(guest, host)
    try:
        caps = capabilities(host.qemu, paths.state_dir)
        machines, version = sorted(caps.machines), ".".join(map(str, caps.version))
    except KvmagentError:
        machines, version = [], ""
    return SideFacts(effective_config(guest), "", running, [p.message for p in problems],
                     machines, version)


def cmd_migrate_incoming(args: argparse.Namespace, paths: Paths) -> int:
    if args.facts:
        print(json.dumps(side_facts(args.name, paths)._asdict()))
        return ExitStatus.OK
    if args.arrived:
        return arrival.cmd_arrived(args, paths)
    from kvmagent.config.guests import load_guest, load_host_config
    from kvmagent.host import systemd
    from kvmagent.host.hostcheck import check_host
    if not (args.machine and args.cpu and args.source):
        raise KvmagentError("migrate-incoming needs --machine, --cpu and --from (it is run "
                            "by kvmagent migrate)", None, ExitStatus.USAGE)
    if not MACHINE_RE.fullmatch(args.machine) or not CPU_RE.fullmatch(args.cpu):
        raise KvmagentError(f"--machine {args.machine!r} --cpu {args.cpu!r}: not QEMU's "
                            "values", None, ExitStatus.USAGE)
    transport = parse_transport(args.transport)  # exit 2
    guest = load_guest(paths, args.name, load_host_config(paths))  # exit 6, 8
    unit = service_unit(guest.name)
    if systemd.active_state(unit) in systemd.RUNNING_STATES:
        raise KvmagentError(f"guest {guest.name} is running here already ({unit})",
                            "two copies of a guest must never run", ExitStatus.FAILURE)
    copy = _copy_arrival(args, guest, paths)  # --copy-storage: checked, nothing made yet
    _, problems = check_host(guest, load_host_config(paths))
    problems = copy.unmade(problems) if copy is not None else problems
    if problems:
        raise problems[0]
    if not systemd.template_installed():
        raise KvmagentError("kvm@.service is not installed here", "install the kvmagent "
                            "package", ExitStatus.HOST_NOT_READY)
    request = paths.incoming_request(guest.name)
    request.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    tmp = request.with_name(f".{request.name}.tmp")
    tmp.write_text(Incoming(args.machine, args.cpu, args.source, args.booted).to_json())
    os.replace(tmp, request)
    stopped: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGPIPE):
        signal.signal(sig, lambda signum, _: stopped.append(signum))
    try:
        if transport.kind == TCP:
            with tcpstream.incoming(args.transport, _emit, stopped, LISTEN_TIMEOUT) as stream:
                ok = _arrive(guest.name, unit, paths, stopped, stream.fileno(), copy)
        else:
            ok = _arrive(guest.name, unit, paths, stopped, sys.stdin.fileno(), copy)
    except KvmagentError as e:
        _emit("failed", error=e.message, status=int(e.status))
        ok = False
    if not ok:  # nothing may be left running here
        systemd.stop_unit(unit, wait=True, timeout=120)
        _systemctl("reset-failed", unit)
        request.unlink(missing_ok=True)
        if copy is not None:  # the disks it made, once QEMU let go of them
            copy.remove()
        return ExitStatus.FAILURE
    if copy is not None:
        copy.arrived()
    if args.enable:
        _systemctl("enable", "--quiet", unit)
    return ExitStatus.OK


def _copy_arrival(args: argparse.Namespace, guest: Any, paths: Paths) -> Arrival | None:
    if not (args.copy_disk or args.make_disk):
        return None
    from kvmagent.cli.nbdcopy import Arrival
    return Arrival.check(args, guest, paths)


def _arrive(name: str, unit: str, paths: Paths, stopped: list[int], stream: int,
            copy: Arrival | None = None) -> bool:
    """STREAM: the ssh session's (standard input) or the TCP connection.
    COPY: --copy-storage's disks, made and served first."""
    from kvmagent.host import systemd
    if copy is not None:
        copy.make()
    systemd.start_unit(unit, wait=False)
    control, deadline = paths.control_socket(name), time.monotonic() + LISTEN_TIMEOUT
    while True:  # until its supervisor listens, QEMU waiting for the stream
        if stopped:
            _emit("failed", error=f"interrupted (signal {stopped[0]})")
            return False
        try:
            if copy is None:
                channel.ask(control, "migrate-incoming", timeout=5.0, fds=[stream])
            elif (refused := copy.serve(control)) is not None:
                _emit("failed", error=refused)
                return False
            break
        except KvmagentError as e:
            state = systemd.active_state(unit)
            if time.monotonic() > deadline or state not in ("activating", "active"):
                _emit("failed", error=f"{unit} is {state}: {e.message}")
                return False
            time.sleep(0.1)
    if copy is not None:  # the disks are copied, then the state comes
        _emit("serving")
        if (why := copy.wait_for_go(control, stopped, stream)) is not None:
            _emit("failed", error=why)
            return False
        channel.ask(control, "migrate-incoming", timeout=5.0, fds=[stream])
    # The stream is QEMU's now: this process keeps no copy of it.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, stream)
    os.close(devnull)
    _emit("listening")
    # What sshd, our parent, reads from the network: the stream, and its
    # keepalives; QEMU's own reads would count its QMP traffic too.  A TCP
    # stream's dead link ends it by its keepalives (kvmagent.cli.tcpstream).
    said = ""
    session = os.getppid() if stream == sys.stdin.fileno() else None
    read, read_at = _bytes_read(session), time.monotonic()
    while not stopped:
        try:
            reply = channel.ask(control, "migrate-status", timeout=10.0)
        except KvmagentError as e:
            _emit("failed", error=f"the supervisor ended: {e.message}")
            return False
        if reply.get("phase") != "incoming" and reply.get("runstate") == "running":
            _emit("running")
            return True
        status = str(reply.get("incoming", reply.get("runstate", "?")))
        if status != said:
            _emit("incoming", status=status)
            said = status
        if (now_read := _bytes_read(session)) != read or now_read is None:
            read, read_at = now_read, time.monotonic()
        if (why := stalled(status, time.monotonic() - read_at)) is not None:
            _emit("failed", error=why)
            return False
        time.sleep(POLL)
    _emit("failed", error=f"interrupted (signal {stopped[0]})")
    return False


def _bytes_read(pid: int | None) -> int | None:
    """What process PID has read so far (rchar).  Root's to read; the
    supervisor's sandbox could not."""
    try:
        with open(f"/proc/{pid}/io") as f:
            return int(next(line for line in f if line.startswith("rchar:")).split()[1])
    except (OSError, ValueError, StopIteration):
        return None


# -- the source ----------------------------------------------------------------

def _remote_facts(target: ssh.Target, name: str) -> SideFacts:
    proc = ssh.start(target, ["migrate-incoming", name, "--facts"])
    out, err = proc.communicate(timeout=120)
    if proc.returncode == ssh.UNREACHABLE:
        raise KvmagentError(f"{target}: cannot reach it over ssh: {err.decode().strip()}",
                            None, ExitStatus.UNREACHABLE)
    try:
        return SideFacts.from_json(json.loads(out))
    except ValueError:
        raise KvmagentError(f"{target}: kvmagent migrate-incoming --facts failed (exit "
                            f"status {proc.returncode}): {err.decode().strip()}",
                            "is kvmagent installed there, at the same version?",
                            ExitStatus.FAILURE) from None


def _parse_rate(text: str | None) -> int | None:
    from kvmagent.config.values import parse_size
    if text is None:
        return None
    try:
        return parse_size(text if text[-1:].isalpha() else text + "B")
    except ValueError as e:
        raise KvmagentError(f"--bandwidth {text!r}: {e}", 'bytes per second: "10M", "1G"',
                            ExitStatus.USAGE) from None


class _Lines:
    """The destination's JSON lines, read in a thread (ssh's stdout)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.last = ""
        self.events: list[dict[str, Any]] = []
        self.ended = False
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        for line in stream:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                self.events.append(event)
                kind = str(event.get("event", ""))
                self.last = (f"failed: {event.get('error', '?')}" if kind == "failed"
                             else kind)
        self.ended = True


def cmd_migrate(args: argparse.Namespace, paths: Paths) -> int:
    from kvmagent.config.guests import load_guest, load_host_config
    from kvmagent.render.show import effective_config
    target = ssh.parse_target(args.host)
    transport = parse_transport(args.transport)  # exit 2
    guest = load_guest(paths, args.name, load_host_config(paths))  # exit 6, 8
    name, control = guest.name, paths.control_socket(guest.name)
    bandwidth = _parse_rate(args.bandwidth)
    try:
        status = channel.ask(control, "migrate-status", timeout=5.0)
    except KvmagentError:
        status = {}
    running = status.get("runstate") == "running" and status.get("phase") in (
        "none", "completed", "failed", "cancelled")
    machine, cpu = str(status.get("machine", "")), str(status.get("cpu", ""))
    here = SideFacts(effective_config(guest), "", running, [], [], "")
    there = _remote_facts(target, name)
    copies: list[CopyDisk] = []
    more: list[Refusal] = []
    if args.copy_storage:  # kvmagent.cli.nbdcopy: which disks, made there or not
        from kvmagent.cli.nbdcopy import plan
        copies, there, more = plan(target, guest, there)
    refusals = preflight(name, str(target), here, there, machine=machine or "none",
                         cpu=cpu or "none", force=args.force) + more
    if refusals:
        for r in refusals[1:]:
            print(f"kvmagent: {r.message}" + (f"\n  hint: {r.hint}" if r.hint else ""),
                  file=sys.stderr)
        raise KvmagentError(refusals[0].message, refusals[0].hint, refusals[0].status)
    enabled = _systemctl("is-enabled", service_unit(name)).stdout.strip() == "enabled"
    booted = arrival.guest_booted(paths, name)  # its uptime goes on there
    extra = (["--booted", repr(booted)] if booted is not None else []) + (
        ["--transport", str(transport)] if transport.kind != SSH else [])
    extra += [word for c in copies for word in c.argument()]
    return _move(args, target, name, control, machine, cpu, bandwidth, enabled, transport,
                 extra, copies)


def _say(args: argparse.Namespace, event: str, text: str, **fields: Any) -> None:
    if args.json:
        print(json.dumps({"event": event, **fields}), flush=True)
    elif sys.stdout.isatty():
        end = "\n" if event != "progress" else ""
        print(f"\r\033[K{text}", end=end, flush=True)
    elif event != "progress":
        print(text, flush=True)


def _move(args: argparse.Namespace, target: ssh.Target, name: str, control: Path,
          machine: str, cpu: str, bandwidth: int | None, enabled: bool, transport: Transport,
          extra: list[str], copies: list[CopyDisk] | None = None) -> int:
    t0 = time.monotonic()
    interrupted: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, _: interrupted.append(signum))
    signal.signal(signal.SIGTERM, lambda signum, _: interrupted.append(signum))
    # ssh: the stream is the ssh session's input; tcp: that input carries
    # the tokens that admit the stream (kvmagent.cli.tcpstream)
    tokens = tcpstream.Tokens.new() if transport.kind == TCP else None
    ours, theirs = socket.socketpair() if tokens is None else (None, None)
    remote = ["migrate-incoming", name, "--machine", machine, "--cpu", cpu,
              "--from", socket.gethostname()] + (["--enable"] if enabled else []) + extra
    copy: Copy | None = None
    if copies:
        from kvmagent.cli.nbdcopy import Copy
        copy = Copy(target, name, control, copies, bandwidth)
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(ssh.ssh_argv(target, remote),
                                stdin=theirs.fileno() if theirs else subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        if theirs is not None:
            theirs.close()
        assert proc.stdout is not None
        lines = _Lines(proc.stdout)
        try:
            if tokens is not None:
                ours = _connect(args, target, name, proc, lines, tokens, interrupted)
            assert ours is not None
            return _watch(args, target, name, control, proc, lines, ours, interrupted,
                          bandwidth, enabled, t0, copy)
        finally:
            if ours is not None:
                ours.close()
            if copy is not None and (said := copy.close()):
                print(f"kvmagent: {target}: the disks' copy: {said}", file=sys.stderr)
            if proc.stdin is not None:
                proc.stdin.close()  # tcp: the destination's session ends
            if proc.poll() is None:  # the destination cleans up once its stream ends
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            signal.signal(signal.SIGINT, old)
            err.seek(0)
            trouble = err.read().decode(errors="replace").strip()
            if trouble and proc.returncode:
                print(f"kvmagent: {target}: {trouble}", file=sys.stderr)


def _connect(args: argparse.Namespace, target: ssh.Target, name: str,
             proc: subprocess.Popen[bytes], lines: _Lines, tokens: tcpstream.Tokens,
             interrupted: list[int]) -> socket.socket:
    """--transport tcp: the tokens to the destination, then the stream,
    connected to where it listens; said loudly."""
    assert proc.stdin is not None
    try:
        proc.stdin.write(tokens.line())
        proc.stdin.flush()
        sock = tcpstream.outgoing(lines.events, lambda: lines.ended, tokens,
                                  lambda: bool(interrupted), LISTEN_TIMEOUT)
    except OSError as e:  # the ssh session's input
        raise KvmagentError(f"migration of guest {name} to {target} not started: {e}; the "
                            "guest runs on here", None, ExitStatus.FAILURE) from None
    except KvmagentError as e:
        raise KvmagentError(f"migration of guest {name} to {target} not started: {target}: "
                            f"{e.message}; the guest runs on here", e.hint, e.status) from None
    address, port = sock.getpeername()[:2]
    print(f"kvmagent: {warning(name, address, port)}", file=sys.stderr, flush=True)
    return sock


def _cancel(args: argparse.Namespace, target: ssh.Target, name: str, control: Path,
            why: str) -> int:
    """The migration (and the disks' copy) cancelled: the guest runs on here."""
    try:
        resumed = channel.ask(control, "migrate-cancel", why=why, host=str(target)).get("resumed")
    except KvmagentError as e:
        raise KvmagentError(f"migration of guest {name} to {target} failed ({why}), and "
                            f"cancelling it failed: {e.message}",
                            f"see: systemctl status {service_unit(name)}") from None
    _say(args, "cancelled", f"migration of guest {name} to {target} cancelled: {why}; the "
         "guest runs on here", why=why, resumed=bool(resumed))
    return ExitStatus.FAILURE


def _watch(args: argparse.Namespace, target: ssh.Target, name: str, control: Path,
           proc: subprocess.Popen[bytes], lines: _Lines, ours: socket.socket,
           interrupted: list[int], bandwidth: int | None, enabled: bool, t0: float,
           copy: Copy | None = None) -> int:
    deadline = time.monotonic() + LISTEN_TIMEOUT
    ready = ("serving",) if copy is not None else ("listening", "incoming")
    while lines.last not in ready and not lines.last.startswith("failed"):
        if interrupted or lines.ended or time.monotonic() > deadline:
            why = ("interrupted" if interrupted else "the destination did not get ready "
                   f"(ssh exit status {proc.poll()})")
            raise KvmagentError(f"migration of guest {name} to {target} not started: {why}; "
                                "the guest runs on here", None, ExitStatus.FAILURE)
        time.sleep(0.05)
    if lines.last.startswith("failed"):
        raise KvmagentError(f"{target}: {lines.last}; guest {name} runs on here", None,
                            ExitStatus.FAILURE)
    if copy is not None:  # --copy-storage: the disks first, while the guest runs
        from kvmagent.render.storagecopy import CopyStep
        _say(args, "started", f"copying the disks of guest {name} to {target}",
             host=str(target), phase="copy")
        try:
            copy.start()
            step, why = copy.wait(ours, lambda: (lines.last, lines.ended), interrupted,
                                  lambda text, fields: _say(args, "progress", text, **fields))
        except KvmagentError as e:
            step, why = CopyStep.CANCEL, e.message
        if step is CopyStep.CANCEL:
            return _cancel(args, target, name, control, why)
    fields: dict[str, Any] = {"host": str(target)}
    if args.max_downtime is not None:
        fields["downtime_ms"] = args.max_downtime
    if bandwidth is not None:
        fields["bandwidth"] = bandwidth
    try:
        started = channel.ask(control, "migrate", fds=[ours.fileno()],
                              copy_storage=copy is not None, **fields)
    except KvmagentError as e:
        if copy is None:
            raise
        return _cancel(args, target, name, control, e.message)
    ours.close()  # QEMU holds the stream now
    _say(args, "started", f"migrating guest {name} to {target}", host=str(target),
         transport=args.transport, downtime_limit_ms=started.get("downtime_limit_ms"),
         max_bandwidth=started.get("max_bandwidth"))
    completed_at: float | None = None
    info: dict[str, Any] = {}
    while True:
        time.sleep(POLL)
        try:
            reply = channel.ask(control, "migrate-status", timeout=5.0)
            phase = str(reply.get("phase"))
            info = reply.get("info") if isinstance(reply.get("info"), dict) else {}  # type: ignore
        except KvmagentError:
            phase = "failed"
        if phase == "completed" and completed_at is None:
            completed_at = time.monotonic()
        decision = source_step(phase, lines.last, interrupted=bool(interrupted),
                               completed_for=None if completed_at is None
                               else time.monotonic() - completed_at,
                               dest_gone=lines.ended and lines.last != "running")
        if decision.step is Step.WAIT:
            _say(args, "progress", progress_line(info), **info)
            continue
        if decision.step is Step.CANCEL:
            return _cancel(args, target, name, control, decision.why)
        break
    ending: dict[str, Any] = {"host": str(target)}
    if isinstance(info.get("downtime"), int):
        ending["downtime_ms"] = info["downtime"]
    channel.ask(control, "migrate-end", **ending)
    unit = service_unit(name)
    end = time.monotonic() + END_TIMEOUT
    while _systemctl("is-active", unit).stdout.strip() in ("active", "deactivating",
                                                           "reloading"):
        if time.monotonic() > end:
            raise KvmagentError(f"guest {name} runs on {target}, but {unit} did not end "
                                f"here within {END_TIMEOUT:g} s", f"systemctl status {unit}")
        time.sleep(0.1)
    if enabled:  # enabled there by migrate-incoming --enable
        _systemctl("disable", "--quiet", unit)
    total = time.monotonic() - t0
    if isinstance(info.get("downtime"), int):  # for the record there (kvmagent.cli.arrival)
        trouble = arrival.tell_destination(target, name, socket.gethostname(),
                                           info["downtime"])
        if trouble:
            print(f"kvmagent: {target}: the downtime is not in its record: {trouble}",
                  file=sys.stderr)
    copied = f"; disks copied: {', '.join(c.node for c in copy.copies)}" if copy else ""
    _say(args, "migrated", f"guest {name} migrated to {target}: downtime "
         f"{info.get('downtime', '?')} ms, total {total:.1f} s"
         + ("; enabled there, disabled here" if enabled else "") + copied,
         host=str(target), downtime_ms=info.get("downtime"), total_seconds=round(total, 3),
         qemu_total_ms=info.get("total-time"), enabled_there=enabled,
         **({"copied": [c.node for c in copy.copies]} if copy is not None else {}))
    return ExitStatus.OK
