"""`kvmagent migrate NAME [USER@]HOST`: live migration over ssh, shared
storage; its other half, `kvmagent migrate-incoming NAME`, is
kvmagent.cli.incoming (internal: run over ssh on HOST by migrate).

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
and the guest runs on here; once the whole guest went there, nothing but
the destination's word resumes it here (kvmagent.cli.settle).  With
--transport tcp..., the control stays on ssh and the stream goes over
plain TCP (kvmagent.cli.tcpstream); the record that follows the guest (its
boot, the downtime) is kvmagent.cli.arrival's.  With --copy-storage the disks go first, while the
guest runs (kvmagent.cli.nbdcopy)."""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from kvmagent.cli import arrival, settle, tcpstream
from kvmagent.cli.incoming import LISTEN_TIMEOUT, systemctl
from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.host import ssh
from kvmagent.names import service_unit
from kvmagent.paths import Paths
from kvmagent.render.migration import (DEFAULT_DOWNTIME_MS, MAX_DOWNTIME_MS,
                                       PAUSED_BY_MIGRATION, Refusal, SideFacts, Step,
                                       differences, paused_ms, preflight, progress_line,
                                       Said, source_step, tcg_warning)
from kvmagent.render.transport import SSH, TCP, Transport, parse_transport, warning
from kvmagent.unit import protocol

if TYPE_CHECKING:
    from kvmagent.cli.configcopy import GuestFiles
    from kvmagent.cli.nbdcopy import Copy
    from kvmagent.render.storagecopy import CopyDisk

POLL = 0.1  # seconds between looks at the migration (each part of the switch's downtime)
END_TIMEOUT = 60.0  # for the source's unit to end once the guest runs there


def _remote_facts(target: ssh.Target, name: str, files: GuestFiles | None = None) -> SideFacts:
    """HOST's facts about guest NAME; with FILES, as if they were its files there."""
    proc = ssh.start(target, ["migrate-incoming", name, "--facts"] +
                     (["--config-in"] if files else []), input=files is not None)
    out, err = proc.communicate(files.to_json().encode() if files else None, timeout=120)
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


def _put_config(target: ssh.Target, files: GuestFiles) -> None:
    """--copy-config, nothing having refused the move: the files installed on HOST."""
    from kvmagent.cli.configcopy import Installed
    proc = ssh.start(target, ["migrate-incoming", files.name, "--put-config"], input=True)
    out, err = proc.communicate(files.to_json().encode(), timeout=120)
    try:
        kept = Installed.from_json(out).kept
    except ValueError:
        raise KvmagentError(f"{target}: guest {files.name}'s files were not copied (exit "
                            f"status {proc.returncode}): {err.decode().strip()}", None,
                            ExitStatus.FAILURE) from None
    print(f"kvmagent: copied guests/{files.name}.toml" + (" and its drop-ins" if
          len(files.files) > 1 else "") + f" to {target}" + (
          f"; its own kept as {', '.join(kept)}" if kept else ""), file=sys.stderr)


def _parse_rate(text: str | None) -> int | None:
    from kvmagent.config.values import parse_size
    if text is None:
        return None
    try:
        rate = parse_size(text if text[-1:].isalpha() else text + "B")
    except ValueError as e:
        raise KvmagentError(f"--bandwidth {text!r}: {e}", 'bytes per second: "10M", "1G"',
                            ExitStatus.USAGE) from None
    if rate <= 0:
        raise KvmagentError(f"--bandwidth {text!r}: no bytes per second",
                            'bytes per second: "10M", "1G"', ExitStatus.USAGE)
    return rate


def _check_downtime(ms: int | None) -> None:
    if ms is not None and not 1 <= ms <= MAX_DOWNTIME_MS:
        raise KvmagentError(f"--max-downtime {ms}: not from 1 to {MAX_DOWNTIME_MS} ms",
                            "the longest pause at the switch, in milliseconds (QEMU's default "
                            f"{DEFAULT_DOWNTIME_MS})", ExitStatus.USAGE)


class _Lines:
    """The destination's JSON lines, read in a thread (ssh's stdout)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.last = ""
        self.events: list[Said] = []
        self.ended = False
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        for line in stream:
            if (said := Said.from_line(line)) is not None:
                self.events.append(said)
                self.last = (f"failed: {said.error or '?'}" if said.event == "failed"
                             else said.event)
        self.ended = True


def cmd_migrate(args: argparse.Namespace, paths: Paths) -> int:
    from kvmagent.config.guests import load_guest, load_host_config
    from kvmagent.render.show import effective_config
    target = ssh.parse_target(args.host)
    transport = parse_transport(args.transport)  # exit 2
    bandwidth = _parse_rate(args.bandwidth)  # exit 2
    _check_downtime(args.max_downtime)
    guest = load_guest(paths, args.name, load_host_config(paths))  # exit 6, 8
    name, control = guest.name, paths.control_socket(guest.name)
    try:
        status = protocol.call(control, protocol.MigrateStatusAsk(about=True),
                               protocol.MigrationStatus, timeout=5.0)
    except KvmagentError:
        status = protocol.MigrationStatus(phase="")
    if status.phase == "completed" and status.runstate in PAUSED_BY_MIGRATION:
        return _settle_held(args, target, name, control, status)  # left paused by a move
    running = status.runstate == "running" and status.phase in (
        "none", "completed", "failed", "cancelled")
    machine, cpu = status.machine, status.cpu
    mine = effective_config(guest)
    here = SideFacts(mine, "", running, [], [], "")
    there = _remote_facts(target, name)
    files = None
    if args.copy_config and (there.config is None or differences(mine, there.config)):
        from kvmagent.cli.configcopy import GuestFiles
        files = GuestFiles.read(paths, name)
        there = _remote_facts(target, name, files)  # as if copied: nothing changed there yet
    copies: list[CopyDisk] = []
    more: list[Refusal] = []
    if args.copy_storage:  # kvmagent.cli.nbdcopy: which disks, made there or not
        from kvmagent.cli.nbdcopy import plan
        copies, there, more = plan(target, guest, there, status.pid)
    refusals = preflight(name, str(target), here, there, machine=machine or "none",
                         cpu=cpu or "none", force=args.force) + more
    if refusals:
        for r in refusals[1:]:
            print(f"kvmagent: {r.message}" + (f"\n  hint: {r.hint}" if r.hint else ""),
                  file=sys.stderr)
        raise KvmagentError(refusals[0].message, refusals[0].hint, refusals[0].status)
    if (said := tcg_warning(name, status.kvm, status.qemu)) is not None:
        print(f"kvmagent: {said}", file=sys.stderr, flush=True)
    if files is not None:
        _put_config(target, files)
    enabled = systemctl("is-enabled", service_unit(name)).stdout.strip() == "enabled"
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
            why: str) -> int | None:
    """The migration (and the disks' copy) cancelled: the guest runs on here.
    None: too late, the whole guest went there meanwhile (kvmagent.cli.settle)."""
    try:
        cancelled = protocol.call(control, protocol.CancelAsk(str(target), why),
                                  protocol.Cancelled)
    except KvmagentError as e:
        raise KvmagentError(f"migration of guest {name} to {target} failed ({why}), and "
                            f"cancelling it failed: {e.message}",
                            f"see: systemctl status {service_unit(name)}") from None
    if cancelled.completed:
        return None
    _say(args, "cancelled", f"migration of guest {name} to {target} cancelled: {why}; the "
         "guest runs on here", why=why, resumed=cancelled.resumed)
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
            rc = _cancel(args, target, name, control, why)
            if rc is not None:
                return rc
    ask = protocol.MigrateAsk(str(target), args.max_downtime, bandwidth, copy is not None)
    try:
        started = protocol.call(control, ask, protocol.Started, fds=[ours.fileno()])
    except KvmagentError as e:
        if copy is None or (rc := _cancel(args, target, name, control, e.message)) is None:
            raise
        return rc
    ours.close()  # QEMU holds the stream now
    _say(args, "started", f"migrating guest {name} to {target}", host=str(target),
         transport=args.transport, downtime_limit_ms=started.downtime_limit_ms,
         max_bandwidth=started.max_bandwidth)
    completed_at: float | None = None
    info: dict[str, Any] = {}
    limit_ms = (DEFAULT_DOWNTIME_MS if started.downtime_limit_ms is None
                else started.downtime_limit_ms)
    while True:
        time.sleep(POLL)
        try:
            now = protocol.call(control, protocol.MigrateStatusAsk(), protocol.MigrationStatus,
                                timeout=5.0)
            phase, info = now.phase, now.info
        except KvmagentError:
            phase = "failed"
        if phase == "completed" and completed_at is None:
            completed_at = time.monotonic()
        decision = source_step(phase, lines.last, interrupted=bool(interrupted),
                               completed_for=None if completed_at is None
                               else time.monotonic() - completed_at,
                               dest_gone=lines.ended and lines.last != "running",
                               info=info, limit_ms=limit_ms)
        if decision.step is Step.WAIT:
            _say(args, "progress", progress_line(info), **info)
            continue
        if decision.step in (Step.CANCEL, Step.ASK):
            # cancelled, unless the whole guest went there (meanwhile): then
            # it stays paused here, until the destination's word settles it
            if (rc := _cancel(args, target, name, control, decision.why)) is not None:
                return rc
            if (rc := settle.settle(target, name, control, decision.why,
                                    lambda *a, **f: _say(args, *a, **f), interrupted,
                                    enabled)) is not None:
                return rc
            info = _completed_info(control, info)
        break
    resumed_at = next((e.resumed_at for e in reversed(lines.events)
                       if e.event == "running"), None)
    return _end(args, target, name, control, info, enabled, t0, copy, resumed_at)


def _completed_info(control: Path, info: dict[str, Any]) -> dict[str, Any]:
    """query-migrate's answer once completed: the downtime and total time."""
    try:
        return protocol.call(control, protocol.MigrateStatusAsk(), protocol.MigrationStatus,
                             timeout=5.0).info or info
    except KvmagentError:
        return info


def _settle_held(args: argparse.Namespace, target: ssh.Target, name: str, control: Path,
                 status: protocol.MigrationStatus) -> int:
    """`kvmagent migrate NAME HOST` again, on a guest an earlier move left
    paused here with its state sent: settled as that move would have been."""
    t0 = time.monotonic()
    enabled = systemctl("is-enabled", service_unit(name)).stdout.strip() == "enabled"
    info = status.info
    if (rc := settle.settle(target, name, control, "an earlier move left it paused here",
                            lambda *a, **f: _say(args, *a, **f), [], enabled)) is not None:
        return rc
    return _end(args, target, name, control, info, enabled, t0, None)


def _end(args: argparse.Namespace, target: ssh.Target, name: str, control: Path,
         info: dict[str, Any], enabled: bool, t0: float, copy: Copy | None,
         resumed_at: object = None) -> int:
    """The guest runs on TARGET: its QEMU here quits, the unit ends "migrated".
    RESUMED_AT: when it ran there (TARGET's clock), for paused_ms."""
    downtime = info.get("downtime")
    ended = protocol.call(control, protocol.EndAsk(
        str(target), downtime if isinstance(downtime, int) else None), protocol.Ended)
    paused = paused_ms(ended.paused_at, resumed_at)
    unit = service_unit(name)
    end = time.monotonic() + END_TIMEOUT
    while systemctl("is-active", unit).stdout.strip() in ("active", "deactivating",
                                                          "reloading"):
        if time.monotonic() > end:
            raise KvmagentError(f"guest {name} runs on {target}, but {unit} did not end "
                                f"here within {END_TIMEOUT:g} s", f"systemctl status {unit}")
        time.sleep(0.1)
    if enabled:  # enabled there by migrate-incoming --enable
        systemctl("disable", "--quiet", unit)
    total = time.monotonic() - t0
    if isinstance(info.get("downtime"), int):  # for the record there (kvmagent.cli.arrival)
        trouble = arrival.tell_destination(target, name, socket.gethostname(),
                                           info["downtime"])
        if trouble:
            print(f"kvmagent: {target}: the downtime is not in its record: {trouble}",
                  file=sys.stderr)
    copied = f"; disks copied: {', '.join(c.node for c in copy.copies)}" if copy else ""
    _say(args, "migrated", f"guest {name} migrated to {target}: downtime "
         f"{info.get('downtime', '?')} ms"
         + (f" (paused {paused} ms until it ran there)" if paused is not None else "")
         + f", total {total:.1f} s"
         + ("; enabled there, disabled here" if enabled else "") + copied,
         host=str(target), downtime_ms=info.get("downtime"), paused_ms=paused,
         total_seconds=round(total, 3),
         qemu_total_ms=info.get("total-time"), enabled_there=enabled,
         **({"copied": [c.node for c in copy.copies]} if copy is not None else {}))
    return ExitStatus.OK
