"""What the supervisor (kvmagent.unit.supervisor) does besides starting and
running its guest: taking over a running QEMU whose supervisor died or
reloaded (take_over; kvmagent.unit.adopt checks that it is this guest's),
the requests of its control channel (kvmagent.unit.channel: status, reload,
freeze and thaw for a snapshot), and the reload itself: the installed
kvmagent executed in the same process (reexec).  Standard library and light
modules only: this runs in the long-lived supervisor."""

from __future__ import annotations

import os
import socket
import sys
import time
from contextlib import ExitStack, suppress
from typing import NoReturn

from kvmagent import __version__
from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.host.qmp import Qmp, QmpError
from kvmagent.host.sdnotify import listen_fds, notify, store_fd
from kvmagent.lifecycle import RELOADED, TAKEN_OVER, WATCHDOG
from kvmagent.names import valid_guest_name
from kvmagent.unit import adopt, channel, forkcall, migration, protocol
from kvmagent.unit.adopt import AdoptedQemu
from kvmagent.unit.consolelog import ConsoleLog
from kvmagent.unit.launch import read_pid_file, remove_pid_file, write_pid_file
from kvmagent.unit.held import Held
from kvmagent.unit.messages import MSG_ADOPTED, MSG_RELOADED, MSG_WATCHDOG
from kvmagent.unit.stoppolicy import StopPolicy
from kvmagent.unit.viewers import ConsoleHub


# Set for the code a reload executes: the version it replaces.
RELOAD_ENV = "KVMAGENT_RELOADED_FROM"


def take_over(sup: Held, stack: ExitStack, planner: forkcall.Child) -> bool:
    """If systemd gave back a dead supervisor's QMP and console (its fd
    store) and that supervisor's QEMU still runs: supervise it (True).
    False: no QEMU to take over; the fds are closed and a normal start
    follows."""
    fds = listen_fds()
    if adopt.QMP_FDNAME not in fds or not valid_guest_name(sup.name):
        for fd in fds.values():
            os.close(fd)
        return False
    socks = {name: socket.socket(fileno=fd) for name, fd in fds.items()}
    for sock in socks.values():
        stack.callback(sock.close)
    running = adopt.read_running(sup.paths, sup.name)
    qemu = AdoptedQemu.find(running) if running is not None else None
    if running is None or qemu is None:
        sup.log(f"guest {sup.name}: the QEMU of the last run is gone; starting it", 5)
        for sock in socks.values():
            sock.close()
        return False
    planner.close()  # the configuration applies at the guest's next start
    stack.callback(qemu.close)
    sup.qemu = qemu
    stack.callback(sup.reap)
    last_supervisor = read_pid_file(sup.paths, sup.name)
    write_pid_file(sup.paths, sup.name, qemu.pid)
    stack.callback(remove_pid_file, sup.paths, sup.name)
    sup.started = time.monotonic() - max(0.0, time.time() - running.since)
    sup.stop = StopPolicy(running.stop_timeout, running.keep, running.reboot_stops)
    sup.qmp = Qmp(socks[adopt.QMP_FDNAME], timeout=10, adopted=True)
    console = socks.get(adopt.CONSOLE_FDNAME)
    sup.console = console if running.serial else None
    sup.console_log = ConsoleLog(running.console_burst, running.console_interval)
    if sup.console is not None:
        sup.hub = ConsoleHub(sup.paths.console_socket(sup.name), sup.console,
                             running.escape, sup.paths.console_key(sup.name))
        stack.callback(sup.hub.close)
    try:
        status = sup.qmp.execute("query-status")
    except QmpError as e:  # a hung guest, as the watchdog would find it
        sup.log(f"QEMU of guest {sup.name} (pid {qemu.pid}) does not answer on QMP "
                f"({e.message}): killing it", 3, MSG_WATCHDOG)
        qemu.kill()
        qemu.wait(10.0)
        sup.record("stopped", WATCHDOG, "QEMU did not answer when taken over")
        raise KvmagentError(f"guest {sup.name}'s QEMU did not answer; it was killed and "
                            "starts again", None, ExitStatus.FAILURE) from None
    if status.get("status") == "paused":
        # kvmagent pauses a running guest only for a snapshot (freeze),
        # and resumes it: a supervisor that died meanwhile left it so
        with suppress(QmpError):
            sup.qmp.execute("cont")
            sup.log(f"guest {sup.name} was paused (a snapshot's freeze, or a start, "
                    "that its last supervisor did not finish): resumed", 4)
    sup.catch_signals()
    if channel.CONTROL_FDNAME in socks:
        sup.channel = socks[channel.CONTROL_FDNAME]
        sup.channel.setblocking(False)
    else:  # taken over from a supervisor of a kvmagent without one
        sup.channel = channel.listen(sup.paths.control_socket(sup.name))
        stack.callback(sup.channel.close)
        socks[channel.CONTROL_FDNAME] = sup.channel
    sup.kept = socks
    for fdname, sock in socks.items():  # stored again: systemd keeps one copy of each
        store_fd(sock.fileno(), fdname)
    sup.running = running._replace(takeovers=running.takeovers + 1)
    adopt.write_running(sup.paths, sup.running)
    reloaded = os.environ.pop(RELOAD_ENV, None)
    notify("READY=1", f"STATUS=running, QEMU pid {qemu.pid} (taken over)")
    # In the record as events of the run (neither a stop nor a start):
    # the guest's uptime goes on, no restart is counted.
    if reloaded is not None:
        sup.record(RELOADED, detail=f"kvmagent {reloaded} -> {__version__}, supervisor "
                   f"pid {os.getpid()}", pid=qemu.pid)
    else:
        sup.record(TAKEN_OVER, detail=f"supervisor pid {last_supervisor or '?'} ended; "
                   f"pid {os.getpid()} took over (kvmagent {__version__})", pid=qemu.pid)
    if reloaded is not None:
        sup.log(f"guest {sup.name}: supervisor reloaded, kvmagent {reloaded} -> "
                f"{__version__}; QEMU pid {qemu.pid} ({status.get('status')}) "
                f"untouched", 5, MSG_RELOADED)
    else:
        sup.log(f"guest {sup.name} taken over: QEMU pid {qemu.pid} "
                f"({status.get('status')}), started by kvmagent {running.version}; "
                f"this supervisor: kvmagent {__version__}", 5, MSG_ADOPTED)
    return True


def control(sup: Held) -> None:
    assert sup.channel is not None and sup.qemu is not None
    request = channel.receive(sup.channel)
    if request is None:
        return
    if request.command.startswith("migrate"):
        migration.request(sup, request)
        return
    conn, command, fields, fds = request
    channel.close_fds(fds)  # none of these requests keeps one
    if command in ("freeze", "thaw"):
        freeze(sup, conn, command, fields)
        return
    if command == "status" or sup.running is None:
        running = sup.running
        channel.answer(conn, protocol.reply(protocol.Status(
            sup.name, __version__, os.getpid(), sup.since, sup.qemu.pid,
            running.since if running else sup.since,
            running.version if running else __version__,
            running.takeovers if running else 0)))
        return
    if sup.stop.stopping:
        channel.answer(conn, protocol.refuse("the guest is stopping"))
        return
    if sup.thaw_at is not None:
        channel.answer(conn, protocol.refuse("the guest is paused for a snapshot"))
        return
    # reload: systemd's unit is "reloading" until the new code says READY=1
    now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notify("RELOADING=1", f"MONOTONIC_USEC={now_usec}", "STATUS=reloading the supervisor")
    channel.answer(conn, protocol.reply(protocol.Done()))
    reexec(sup)


def freeze(sup: Held, conn: socket.socket, command: str,
           fields: dict[str, object]) -> None:
    """freeze: pause the guest (QEMU's "stop" drains its disk I/O) for at
    most the request's seconds, so that a snapshot of its disks is
    crash-consistent; thaw: resume it.  The supervisor resumes it by
    itself at the limit (thaw() from the supervisor's loop): a client that dies
    never leaves the guest paused."""
    assert sup.qmp is not None
    if command == "thaw":
        was = sup.thaw_at is not None
        if was:
            thaw(sup, "the snapshot is taken")
        channel.answer(conn, protocol.reply(protocol.Thawed(was)))
        return
    seconds = protocol.freeze_seconds(fields)
    if isinstance(seconds, str):
        channel.answer(conn, protocol.refuse(seconds))
        return
    if sup.stop.stopping or sup.thaw_at is not None:
        channel.answer(conn, protocol.refuse("the guest is stopping" if sup.stop.stopping
                                             else "the guest is paused already"))
        return
    try:
        state = sup.qmp.execute("query-status", timeout=2.0).get("status")
        if state != "running":
            channel.answer(conn, protocol.refuse(f"the guest is {state}, not running"))
            return
        sup.qmp.execute("stop", timeout=5.0)
    except QmpError as e:
        channel.answer(conn, protocol.refuse(e.message))
        return
    sup.thaw_at = time.monotonic() + seconds
    sup.log(f"guest {sup.name} paused for a snapshot of its disks (at most "
            f"{seconds:g} s)", 5)
    channel.answer(conn, protocol.reply(protocol.Frozen(seconds)))


def thaw(sup: Held, why: str) -> None:
    assert sup.qmp is not None
    sup.thaw_at = None
    try:
        sup.qmp.execute("cont", timeout=5.0)
    except QmpError as e:
        sup.log(f"guest {sup.name}: cannot resume it after the snapshot: {e.message}", 3)
        return
    sup.log(f"guest {sup.name} resumed: {why}", 5)


def reexec(sup: Held) -> NoReturn:
    """Run the installed kvmagent in this process (same pid: systemd sees
    nothing but RELOADING=1 and READY=1), handing it QMP, the console and
    the control channel as systemd's fd store would; it takes the guest
    over.  Never returns: if the exec fails, exiting hands the guest over
    through systemd's fd store instead."""
    sup.log(f"guest {sup.name}: reloading the supervisor (kvmagent {__version__})", 6)
    sup.record.flush()
    sup.record.wait()
    sup.journal.drain(2.0)
    import fcntl
    names = list(sup.kept)
    high = [fcntl.fcntl(sup.kept[n].fileno(), fcntl.F_DUPFD_CLOEXEC, 100) for n in names]
    env = dict(os.environ)
    env.update({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": str(len(names)),
                "LISTEN_FDNAMES": ":".join(names), RELOAD_ENV: __version__})
    adopt.pass_lock(sup.lock, env)
    try:
        for i, fd in enumerate(high):  # SD_LISTEN_FDS_START: 3
            os.dup2(fd, 3 + i, inheritable=True)
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError as e:
        sup.log(f"cannot reload the supervisor of guest {sup.name}: {e}", 3)
    os._exit(ExitStatus.FAILURE)
