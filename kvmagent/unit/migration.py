"""Live migration in the supervisor (kvmagent.unit.supervisor): the control
channel's migration requests, and the destination's wait for the stream.

Neither the supervisor nor QEMU may open a network connection (kvm@.service
allows AF_UNIX and AF_NETLINK only, QEMU's -sandbox spawn=deny forbids its
exec: transport): `kvmagent migrate` opens the ssh connection and hands one
end of it in, as a file descriptor on the control channel, and the
supervisor gives it to QEMU (QMP getfd, then migrate or migrate-incoming
with fd:NAME).

Source: "migrate" (with the fd, the destination host, max downtime and
bandwidth), "migrate-status" (query-migrate, the run state, and the QEMU's
own -machine and -cpu), "migrate-cancel" (migrate_cancel, and the guest
resumed if a completed migration left it paused) and "migrate-end" (the
destination runs the guest: QEMU quits, the unit ends as "migrated").
Destination: the supervisor started QEMU with -incoming defer and waits in
receive() for "migrate-incoming" with the stream; kvmagent.render.migration
decides when it is done or failed.  Standard library and light modules
only: this runs in the long-lived supervisor."""

from __future__ import annotations

import select
import signal
import time
from contextlib import ExitStack, suppress
from typing import Any

from kvmagent.host.qmp import QmpError
from kvmagent.host.sdnotify import notify
from kvmagent.lifecycle import MIGRATED
from kvmagent.render.migration import (ARRIVAL_FAILED, PAUSED_BY_MIGRATION, Arrival,
                                       event_time, incoming_step, parameters)
from kvmagent.render.plan import Incoming
from kvmagent.unit import channel, mirror, protocol
from kvmagent.unit.held import Held
from kvmagent.unit.messages import MSG_MIGRATED


FDNAME = "migration"  # QEMU's name of the stream's fd (getfd)
# How far each turn of the destination's wait extends systemd's start
# timeout: the start job lasts as long as the migration does.
EXTEND_USEC = 10_000_000
POLL = 0.25  # seconds between query-migrate while the state comes in
LOCK_WAIT = 10.0  # seconds the destination waits for the source to let go of the disks


class IncomingFailed(Exception):
    """The destination's migration did not complete: nothing ran here."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def machine_and_cpu(sup: Held) -> tuple[str, str]:
    """The running QEMU's own machine type (versioned: "pc" is an alias)
    and -cpu value, which the destination must use as they are."""
    assert sup.qmp is not None and sup.qemu is not None
    kind = str(sup.qmp.execute("qom-get", timeout=5.0, path="/machine", property="type"))
    cpu = ""
    with suppress(OSError):
        with open(f"/proc/{sup.qemu.pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        if b"-cpu" in argv:
            cpu = argv[argv.index(b"-cpu") + 1].decode()
    return kind.removesuffix("-machine"), cpu


def request(sup: Held, req: channel.Request) -> None:
    """A migration request to a running guest's supervisor (the source)."""
    conn, command, fields, fds = req
    try:
        reply = _source(sup, command, fields, fds)
    except QmpError as e:
        reply = protocol.refuse(e.message)
    except ValueError as e:  # a request of another shape
        reply = protocol.refuse(f"{command}: {e}")
    finally:
        channel.close_fds(fds)  # QEMU holds its own copy of the stream
    channel.answer(conn, reply)


def _source(sup: Held, command: str, fields: dict[str, object],
            fds: list[int]) -> dict[str, object]:
    assert sup.qmp is not None
    qmp = sup.qmp
    if command == "migrate-status":
        info = qmp.execute("query-migrate", timeout=5.0)
        if info.get("status") == "pre-switchover" and sup.mirrors:  # the event not seen yet
            mirror.switchover(sup)
            info = qmp.execute("query-migrate", timeout=5.0)
        runstate = qmp.execute("query-status", timeout=5.0).get("status")
        machine, cpu = machine_and_cpu(sup)
        status = protocol.MigrationStatus(
            phase=str(info.get("status", "none")), info=info, runstate=runstate,
            machine=machine, cpu=cpu, resumed_at=sup.resumed_at, migrated_to=sup.migrated_to,
            jobs=mirror.jobs(sup) if sup.mirrors else [])
        if protocol.read(protocol.MigrateStatusAsk, fields).about:  # asked once, before a move
            version = qmp.execute("query-version", timeout=5.0).get("qemu", {})
            status = status._replace(
                pid=sup.qemu.pid if sup.qemu else None,
                kvm=bool(qmp.execute("query-kvm", timeout=5.0).get("enabled")),
                qemu=[int(version.get(k, 0)) for k in ("major", "minor", "micro")])
        return protocol.reply(status)
    if command == "migrate-copy":  # --copy-storage: one disk's mirror (kvmagent.unit.mirror)
        return mirror.start(sup, protocol.read(protocol.CopyAsk, fields), fds)
    if command == "migrate":
        ask = protocol.read(protocol.MigrateAsk, fields)
        if len(fds) != 1:
            return protocol.refuse("migrate needs the stream's file descriptor")
        if sup.stop.stopping or sup.thaw_at is not None or sup.migrated_to:
            return protocol.refuse("the guest is stopping, paused or migrated")
        state = qmp.execute("query-status", timeout=5.0).get("status")
        if state != "running":
            return protocol.refuse(f"the guest is {state}, not running")
        # every time, defaults included: QEMU keeps what the last one set
        qmp.execute("migrate-set-parameters", timeout=5.0,
                    **parameters(ask.downtime_ms, ask.bandwidth))
        now = qmp.execute("query-migrate-parameters", timeout=5.0)
        if ask.copy_storage != bool(sup.mirrors):
            return protocol.refuse("--copy-storage: the disks' copies are not running"
                                   if sup.mirrors == [] else "the disks are being copied")
        # With disks copied, QEMU waits before the switch (the guest
        # paused) for the supervisor to complete the copies
        # (kvmagent.unit.mirror.switchover, on the MIGRATION event).
        copying = bool(sup.mirrors)
        qmp.execute("migrate-set-capabilities", timeout=5.0, capabilities=[
            {"capability": "events", "state": copying},
            {"capability": "pause-before-switchover", "state": copying}])
        qmp.execute("getfd", timeout=5.0, fds=fds, fdname=FDNAME)
        qmp.execute("migrate", timeout=10.0, uri=f"fd:{FDNAME}")
        sup.log(f"guest {sup.name}: migrating to {ask.host}", 5)
        return protocol.reply(protocol.Started(now.get("downtime-limit"),
                                               now.get("max-bandwidth")))
    if command == "migrate-cancel":
        cancel = protocol.read(protocol.CancelAsk, fields)
        host, why = cancel.host, cancel.why
        status = qmp.execute("query-migrate", timeout=5.0).get("status")
        if status not in (None, "completed", "failed", "cancelled", "none"):
            qmp.execute("migrate_cancel", timeout=5.0)
        deadline = time.monotonic() + 10
        while (qmp.execute("query-migrate", timeout=5.0).get("status") in
               ("cancelling", "device", "pre-switchover") and time.monotonic() < deadline):
            time.sleep(0.05)
        if (qmp.execute("query-migrate", timeout=5.0).get("status") == "completed"
                and not cancel.resume):
            # The whole guest went there, and may run there: never resumed
            # here unless kvmagent migrate learnt that it does not
            # (kvmagent.render.migration.settle_step).
            sup.log(f"guest {sup.name}: migration to {host} not confirmed ({why}); its "
                    f"state was sent, so the guest stays paused here", 4)
            sup.held = (f"paused: its state went to {host}, which did not confirm that it "
                        f"runs there (kvmagent migrate {sup.name} {host} settles it)")
            notify(f"STATUS={sup.held}")
            return protocol.reply(protocol.Cancelled(resumed=False, completed=True))
        sup.held = None
        mirror.abort(sup)
        resumed = False
        if qmp.execute("query-status", timeout=5.0).get("status") in PAUSED_BY_MIGRATION:
            qmp.execute("cont", timeout=10.0)
            resumed = True
        sup.log(f"guest {sup.name}: migration to {host} cancelled ({why}); the guest runs "
                f"on here" + (" (resumed)" if resumed else ""), 4)
        return protocol.reply(protocol.Cancelled(resumed=resumed))
    if command != "migrate-end":
        return protocol.refuse(f"{command}: the guest runs here already")
    # migrate-end: the destination said that the guest runs there
    end = protocol.read(protocol.EndAsk, fields)
    status = qmp.execute("query-migrate", timeout=5.0).get("status")
    if status != "completed":
        return protocol.refuse(f"the migration is {status}, not completed")
    host, downtime = end.host, end.downtime_ms
    sup.migrated_to = host + (f", downtime {downtime} ms" if downtime is not None else "")
    notify("STOPPING=1", f"STATUS=migrated to {host}")
    sup.record("stopping", MIGRATED, f"to {sup.migrated_to}")
    sup.record.flush(linger=True)
    for event in qmp.events:  # a STOP read with a reply, not yet the main loop's
        if event.get("event") == "STOP":
            sup.paused_at = event_time(event)
    paused_at = sup.paused_at
    with suppress(QmpError, OSError):
        qmp.execute("quit", timeout=5.0)
    return protocol.reply(protocol.Ended(paused_at))


def migrated(sup: Held, rc: int) -> int:
    """The source's end: QEMU quit after the guest moved."""
    sup.log(f"guest {sup.name} migrated to {sup.migrated_to}; its QEMU here ended",
            5, MSG_MIGRATED)
    sup.record("stopped", MIGRATED, f"to {sup.migrated_to}")
    return 0


def arrive(sup: Held, stack: ExitStack, incoming: Incoming) -> None:
    """The destination's start, once QEMU waits (paused, -incoming defer):
    signals and the control channel served, then receive()."""
    sup.catch_signals()
    sup.channel = channel.listen(sup.paths.control_socket(sup.name))
    stack.callback(sup.channel.close)
    receive(sup, incoming)


def receive(sup: Held, incoming: Incoming) -> None:
    """The destination: QEMU (-incoming defer, paused) waits until
    `kvmagent migrate-incoming` hands in the stream, then receives the
    guest; resumed here once complete.  IncomingFailed otherwise: a stop,
    QEMU's death, a stream that ends or never comes."""
    assert sup.qmp is not None and sup.qemu is not None and sup.channel is not None
    qmp, since = sup.qmp, time.monotonic()
    status: str | None = None
    notify(f"EXTEND_TIMEOUT_USEC={EXTEND_USEC}",
           f"STATUS=waiting for the migration from {incoming.source}")
    while True:
        watch: list[Any] = [sup.wake_r, sup.channel] + ([qmp] if not qmp.closed else [])
        ready, _, _ = select.select(watch, [], [], POLL)
        if sup.wake_r in ready:
            for signum in sup.wake_r.recv(64):
                if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                    raise IncomingFailed("stopped while the guest was arriving")
        if (rc := sup.qemu.poll()) is not None:
            raise IncomingFailed(f"QEMU exited (status {rc}) while the guest was arriving")
        if qmp in ready:
            qmp.poll()  # MIGRATION, RESUME...: what counts is query-migrate
        if sup.channel in ready and (req := channel.receive(sup.channel)) is not None:
            status = _incoming_request(sup, req, status)
            if sup.serving and status is None:  # the disks are copied: as long as it takes,
                since = time.monotonic()  # while kvmagent migrate-incoming asks
        if status is not None:
            try:
                status = str(qmp.execute("query-migrate", timeout=5.0).get("status"))
            except QmpError as e:
                raise IncomingFailed(f"QEMU does not answer: {e.message}") from None
        step, why = incoming_step(status, time.monotonic() - since)
        if step is Arrival.DONE:
            break
        if step is Arrival.FAIL:
            raise IncomingFailed(why)
        notify(f"EXTEND_TIMEOUT_USEC={EXTEND_USEC}",
               f"STATUS=receiving the guest from {incoming.source} ({status or 'waiting'})")
    resume(sup, incoming)
    sup.resumed_at = time.time()
    state = qmp.execute("query-status", timeout=5.0).get("status")
    if state != "running":
        raise IncomingFailed(f"the guest arrived but is {state}, not running")
    with suppress(FileNotFoundError):
        sup.paths.incoming_request(sup.name).unlink()


def resume(sup: Held, incoming: Incoming) -> None:
    """cont (-S: paused until now, as the source was).  Its disks' image locks
    are taken now: the source QEMU let go of them when it sent the last of
    the state, and if that comes late, cont is tried again a while."""
    assert sup.qmp is not None
    try:
        mirror.stop_serving(sup)
    except QmpError as e:
        raise IncomingFailed(f"the NBD server of the disks' copy did not stop: {e.message}") \
            from None
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            sup.qmp.execute("cont", timeout=10.0)
            return
        except QmpError as e:
            if "lock" not in e.message or time.monotonic() > deadline:
                raise IncomingFailed(e.message) from None
        notify(f"STATUS=waiting for {incoming.source} to let go of the disks' locks")
        time.sleep(0.05)


def incoming_failed(sup: Held, e: IncomingFailed) -> int:
    """Nothing ran here: the unit ends successfully, never restarted (a
    restart would boot a second copy of the guest, which runs on at its
    source).  Ready, then done: a Type=notify service that exits before
    READY=1 is a failure to systemd, whatever its status."""
    with suppress(FileNotFoundError):
        sup.paths.incoming_request(sup.name).unlink()
    sup.log(f"guest {sup.name}: the live migration to this host failed, the guest runs on "
            f"where it was: {e.message}", 4)
    sup.record("stopped", MIGRATED, f"{ARRIVAL_FAILED}: {e.message}")
    notify("READY=1", f"STATUS=incoming migration failed: {e.message}")
    return 0


def _incoming_request(sup: Held, req: channel.Request, status: str | None) -> str | None:
    conn, command, fields, fds = req
    assert sup.qmp is not None
    try:
        if command == "migrate-status":
            channel.answer(conn, protocol.reply(protocol.MigrationStatus(
                phase="incoming", incoming=status or "waiting")))
        elif command == "migrate-serve" and status is None:  # --copy-storage
            try:
                channel.answer(conn, mirror.serve(sup, protocol.read(protocol.ServeAsk, fields),
                                                  fds))
            except QmpError as e:
                channel.answer(conn, protocol.refuse(e.message))
            except ValueError as e:
                channel.answer(conn, protocol.refuse(f"{command}: {e}"))
        elif command == "migrate-incoming" and status is None and len(fds) == 1:
            try:
                sup.qmp.execute("getfd", timeout=5.0, fds=fds, fdname=FDNAME)
                # MIGRATION events wake receive() the moment the state is in:
                # the guest resumes at once, not at the next look (POLL)
                sup.qmp.execute("migrate-set-capabilities", timeout=5.0, capabilities=[
                    {"capability": "events", "state": True}])
                sup.qmp.execute("migrate-incoming", timeout=10.0, uri=f"fd:{FDNAME}")
            except QmpError as e:
                channel.answer(conn, protocol.refuse(e.message))
                raise IncomingFailed(e.message) from None
            channel.answer(conn, protocol.reply(protocol.Done()))
            return "setup"
        else:
            channel.answer(conn, protocol.refuse(
                f"guest {sup.name} is arriving by live migration"
                + (" (the stream is in)" if status else "")))
    finally:
        channel.close_fds(fds)
    return status
