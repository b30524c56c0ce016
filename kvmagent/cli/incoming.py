"""`kvmagent migrate-incoming NAME` (internal, run over ssh by kvmagent
migrate on HOST): the destination's half of a live migration.

It starts kvm@NAME.service in incoming mode (a request file its supervisor
reads), hands the supervisor the stream (its own standard input, the ssh
session's, or a TCP connection: kvmagent.cli.tcpstream), and reports on its
standard output, one JSON object a line: "listening", "incoming" (with
QEMU's status), "running" or "failed".  --facts: what this host says of the
guest, before anything moves; --where: what runs of it here, for a source
that lost the last word (kvmagent.cli.settle); --arrived: the move's
downtime for the record (kvmagent.cli.arrival)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from kvmagent.cli import arrival, configcopy, settle, tcpstream
from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.names import service_unit
from kvmagent.paths import Paths
from kvmagent.render.migration import CPU_RE, MACHINE_RE, Said, SideFacts, stalled
from kvmagent.render.plan import Incoming
from kvmagent.render.transport import TCP, parse_transport
from kvmagent.unit import protocol

if TYPE_CHECKING:
    from kvmagent.cli.nbdcopy import Arrival

SYSTEMCTL_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
# for the destination's QEMU to wait for the stream (and the source for it)
LISTEN_TIMEOUT = 120.0
POLL = 0.1  # seconds between looks at the arrival


def systemctl(*args: str) -> subprocess.CompletedProcess[str]:
    """systemctl ARGS, its output captured (kvmagent migrate's too)."""
    return subprocess.run(["systemctl", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=SYSTEMCTL_ENV, timeout=60)


def _emit(event: str, **fields: Any) -> None:
    """A line to the source (over ssh): the destination's progress."""
    try:
        print(Said(event, **fields).line(), flush=True)
    except BrokenPipeError:
        pass  # the source is gone; the stream's end says it to QEMU too


def side_facts(name: str, paths: Paths, files: configcopy.GuestFiles | None = None) -> SideFacts:
    """What this host says about guest NAME (migrate-incoming --facts); with
    FILES (--config-in), what it would say with them as the guest's files."""
    from kvmagent.config.guests import load_guest, load_host_config
    from kvmagent.host import systemd
    from kvmagent.host.hostcheck import check_host
    from kvmagent.host.qemucaps import capabilities
    from kvmagent.render.show import effective_config
    running = systemd.active_state(service_unit(name)) in systemd.RUNNING_STATES
    try:
        host = load_host_config(paths)
        guest = (load_guest(paths, name, host) if files is None
                 else configcopy.staged(files, host))
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
        files = configcopy.read_input(args.name) if args.config_in else None
        print(json.dumps(side_facts(args.name, paths, files)._asdict()))
        return ExitStatus.OK
    if args.put_config:  # kvmagent migrate --copy-config, once nothing refused the move
        return _put_config(args.name, paths)
    if args.where:  # the source lost our word after it sent the guest (kvmagent.cli.settle)
        there = settle.where(args.name, paths)
        if args.enable and there.runstate == "running" and not there.arriving:
            systemctl("enable", "--quiet", service_unit(args.name))
        print(json.dumps(there._asdict()))
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
        systemctl("reset-failed", unit)
        request.unlink(missing_ok=True)
        if copy is not None:  # the disks it made, once QEMU let go of them
            copy.remove()
        return ExitStatus.FAILURE
    if copy is not None:
        copy.arrived()
    if args.enable:
        systemctl("enable", "--quiet", unit)
    return ExitStatus.OK


def _put_config(name: str, paths: Paths) -> int:
    """The guest's files from the source installed here, if this host would
    run the very guest with them and does not run it now."""
    from kvmagent.host import systemd
    from kvmagent.render.migration import differences
    files = configcopy.read_input(name)
    if systemd.active_state(service_unit(name)) in systemd.RUNNING_STATES:
        raise KvmagentError(f"guest {name} is running here ({service_unit(name)}): its "
                            "files are not replaced", "two copies of a guest must never run",
                            ExitStatus.FAILURE)
    facts = side_facts(name, paths, files)
    if facts.config is None:
        raise KvmagentError(facts.error, None, ExitStatus.CONFIG)
    kept = configcopy.install(paths, files)
    systemctl("daemon-reload")  # kvmagent-generator: the drop-ins the new file asks for
    now = side_facts(name, paths)
    if now.config is None or differences(now.config, facts.config):
        raise KvmagentError(f"guest {name}'s files were installed, but do not load as "
                            "they did staged", now.error or None, ExitStatus.FAILURE)
    print(configcopy.Installed(kept).to_json())
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
                protocol.call(control, protocol.IncomingAsk(), protocol.Done, timeout=5.0,
                              fds=[stream])
            elif (refused := copy.serve(control)) is not None:
                _emit("failed", error=refused)
                return False
            break
        except KvmagentError as e:
            state = systemd.active_state(unit)
            if time.monotonic() > deadline or (state not in ("activating", "active")
                                               and not systemd.job_pending(unit)):
                _emit("failed", error=f"{unit} is {state}: {e.message}")
                return False
            time.sleep(0.1)
    if copy is not None:  # the disks are copied, then the state comes
        _emit("serving")
        if (why := copy.wait_for_go(control, stopped, stream)) is not None:
            _emit("failed", error=why)
            return False
        protocol.call(control, protocol.IncomingAsk(), protocol.Done, timeout=5.0, fds=[stream])
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
            now = protocol.call(control, protocol.MigrateStatusAsk(), protocol.MigrationStatus,
                                timeout=10.0)
        except KvmagentError as e:
            _emit("failed", error=f"the supervisor ended: {e.message}")
            return False
        if now.phase != "incoming" and now.runstate == "running":
            _emit("running", resumed_at=now.resumed_at)
            return True
        status = now.incoming or now.runstate or "?"
        if status != said:
            _emit("incoming", state=status)
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
