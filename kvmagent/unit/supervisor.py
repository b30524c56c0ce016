"""`kvmagent run NAME`: the supervisor, ExecStart= of kvm@NAME.service.

It lives as long as its guest, so it holds only the standard library and
kvmagent's pure modules.  Heavy, once-only work runs in short-lived forked
children (kvmagent.unit.forkcall): opening and enslaving the taps (pyroute2),
creating QEMU's scope and registering the machine (pystemd, pydbus).

Start: load and validate (exit 6 on a bad config), wait a bounded time for
bridges and disks (exit 5), open taps, start QEMU paused (-S) with QMP and
the serial console on socketpairs, move QEMU into kvm-NAME.scope, register
with machined, `cont`, READY=1.  Run: the console goes to the journal;
WATCHDOG=1 only while QMP answers.  Stop (SIGTERM): the ACPI power button,
pressed again every few seconds (an early press is lost), until the guest's
stop timeout, extending systemd's stop timeout as it goes; then `quit`, then
SIGKILL.  SIGUSR1 (`kvmagent stop --force`): QEMU is killed at once, no
ACPI.  Exit 0 when the guest powered itself off or was stopped, 1 when QEMU
died otherwise (systemd restarts it).  kvmagent.unit.stoppolicy decides each step
of a stop and the exit; this module carries them out.  kvmagent.unit.launch
starts QEMU; kvmagent.unit.takeover takes a running guest over, answers the
control channel and reloads."""

from __future__ import annotations

import os
import select
import signal
import time
from contextlib import ExitStack, suppress
from typing import Any

from kvmagent import __version__
from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.host import tundev
from kvmagent.host.qmp import Qmp, QmpError
from kvmagent.host.sdnotify import notify, store_fd
from kvmagent.lifecycle import ADMIN, ARRIVED_FROM, CONFIG, CRASHED, FAILED, MIGRATED, POWEROFF
from kvmagent.names import valid_guest_name
from kvmagent.paths import Paths
from kvmagent.render.migration import event_time
from kvmagent.render.plan import Plan, Running
from kvmagent.unit import adopt, channel, forkcall, migration, mirror, takeover, testhook
from kvmagent.unit.adopt import AdoptedQemu
from kvmagent.unit.consolelog import ConsoleLog
from kvmagent.unit.held import Held
from kvmagent.unit.launch import launch, remove_pid_file, systemd_booted, write_pid_file
from kvmagent.unit.messages import (MSG_CONSOLE_DROPPED, MSG_CRASHED, MSG_FAILED_QEMU_KEPT,
                                    MSG_MIGRATED_IN, MSG_PANIC, MSG_POWERDOWN, MSG_POWEREDOFF,
                                    MSG_RUNNING, MSG_START_FAILED, MSG_STARTING, MSG_STOPPED,
                                    MSG_WATCHDOG)
from kvmagent.unit.stoppolicy import (Action, ForceStop, Kill, Outcome, Press, Quit, Stopping,
                                      StopPolicy)
from kvmagent.unit.viewers import ConsoleHub

# Kept to the standard library and kvmagent's light modules: the heavy
# start-up steps (kvmagent.unit.startup, kvmagent.unit.attach) and the writes to the
# state database (kvmagent.unit.recorder) run in forked children.
# While the plan waits for devices: how often the start timeout is extended
# (by three times this), so that no TimeoutStartSec= cuts device_timeout short.
PLAN_PATIENCE = 2.0


# -- the supervisor ----------------------------------------------------------

class StoppedWhileStarting(Exception):
    """kvmagent stop --force before the guest ran."""


def _stopped_while_starting(signum: int, frame: Any) -> None:
    raise StoppedWhileStarting


class Supervisor(Held):
    """Starts and runs a guest, or carries on with one taken over (Held:
    what it holds)."""

    # -- start --------------------------------------------------------------
    def start(self, stack: ExitStack, planner: forkcall.Child) -> None:
        """planner: the child making the guest's plan (kvmagent.unit.run).
        `kvmagent stop --force` (SIGUSR1) meanwhile ends the start at once,
        even while the guest waits for its bridge or disks: StoppedWhileStarting.
        (SIGTERM's default action is right then: systemd is stopping the unit.)"""
        signal.signal(signal.SIGUSR1, _stopped_while_starting)
        stack.callback(planner.close)
        if valid_guest_name(self.name):  # else the plan fails, saying why: no path made of it
            write_pid_file(self.paths, self.name)  # for kvmagent stop --force
            stack.callback(remove_pid_file, self.paths, self.name)
        # The helpers' imports (pystemd and pydbus ~50 ms, pyroute2 ~250 ms)
        # overlap with the plan: niced, they take only CPU time the planner
        # leaves, and get their full share once it is done.  (The netlink
        # child may not be needed at all: no bridged NIC.)
        sysd = (forkcall.Child(preload=("kvmagent.unit.attach", "kvmagent.host.systemd",
                                        "kvmagent.host.machined"), nice=10)
                if systemd_booted() else None)
        if sysd is not None:
            stack.callback(sysd.close)
        net = forkcall.Child(preload=("kvmagent.unit.attach", "kvmagent.host.netdev"), nice=10)
        stack.callback(net.close)
        # The plan may wait up to device_timeout (up to an hour) for bridges
        # and disks that come late at boot; the planner cannot extend the
        # start's timeout itself (NotifyAccess=main), so the supervisor does.
        while not planner.done(PLAN_PATIENCE):
            notify(f"EXTEND_TIMEOUT_USEC={int(PLAN_PATIENCE * 3e6)}",
                   "STATUS=waiting for the guest's bridges and disks")
        plan, _ = planner.result(timeout=0)
        if not isinstance(plan, Plan):  # typed across the fork: a planner of other code
            raise KvmagentError(f"the planner of guest {self.name} sent {type(plan).__name__}, "
                                "not a plan")
        self.stop = StopPolicy(plan.stop_timeout, plan.keep, plan.reboot_stops)
        self.incoming = plan.incoming.source if plan.incoming is not None else None
        self.booted = plan.incoming.booted if plan.incoming is not None else None
        if sysd is not None:
            sysd.full_speed()
        self.log(f"starting guest {self.name} ({plan.cpus} vCPU, "
                 f"{plan.memory_mib} MiB; kvmagent {__version__})", 6, MSG_STARTING)
        configure_taps = False
        if plan.taps:
            net.full_speed()  # needed after all
            try:
                # Made here at once; put on their bridges over netlink while
                # QEMU initialises (see kvmagent.host.tundev).
                taps, tap_fds = tundev.open_taps(
                    plan.taps, plan.vhost,
                    lambda tap, bridge, queues: tundev.create_tap(tap, queues))
                configure_taps = True
            except tundev.TapTaken:  # stale or foreign: netlink sorts it out
                taps, tap_fds = net.call("kvmagent.unit.attach:open_taps", plan.taps,
                                         plan.vhost)
        else:
            net.close()
            taps, tap_fds = {}, []
        qemu, qmp_ours, con_ours = launch(plan, taps, tap_fds)
        stack.callback(qmp_ours.close)
        stack.callback(con_ours.close)
        self.qemu = qemu
        stack.callback(self.reap)
        self.started = time.monotonic()
        write_pid_file(self.paths, self.name, self.qemu.pid)
        # While QEMU initialises (paused): taps onto their bridges, QEMU into
        # its scope and registered with machined, each in its own child.
        if configure_taps:
            net.submit("kvmagent.unit.attach:configure_taps", plan.taps)
        if sysd is not None:
            sysd.submit("kvmagent.unit.attach:make_scope", plan, self.qemu.pid)
        self.qmp = Qmp(qmp_ours, timeout=30)
        self.console = con_ours if plan.serial else None
        self.console_log = ConsoleLog(plan.console_burst, plan.console_interval)
        if self.console is not None:
            self.hub = ConsoleHub(self.paths.console_socket(self.name), self.console,
                                  plan.escape, self.paths.console_key(self.name))
            stack.callback(self.hub.close)

        if configure_taps:
            net.result()
        if sysd is not None:
            sysd.result()
        else:
            self.log("not booted with systemd: QEMU stays in this process's cgroup, "
                     "no machined registration", 4)
        if plan.incoming is not None:  # kvmagent migrate: the guest arrives, running
            migration.arrive(self, stack, plan.incoming)
        else:
            if testhook.ACTIVE:
                testhook.point(str(self.paths.guest_runtime(self.name)), "before-cont")
            self.qmp.execute("cont")
            status = self.qmp.execute("query-status")
            if status.get("status") != "running":
                raise KvmagentError("QEMU did not start the guest: status "
                                    f"{status.get('status')}")
            if testhook.ACTIVE:
                testhook.point(str(self.paths.guest_runtime(self.name)), "after-cont")
            self.catch_signals()  # from here on the main loop handles them
            self.channel = channel.listen(self.paths.control_socket(self.name))
            stack.callback(self.channel.close)
        # For the supervisor that takes over if this one dies: QEMU's ends
        # of QMP and the console stay open in systemd's fd store (QEMU sees
        # no EOF), and the record says which QEMU it is.
        assert self.channel is not None
        self.kept = {adopt.QMP_FDNAME: qmp_ours, adopt.CONSOLE_FDNAME: con_ours,
                     channel.CONTROL_FDNAME: self.channel}
        for fdname, sock in self.kept.items():
            store_fd(sock.fileno(), fdname)
        self.running = Running.from_plan(plan, self.qemu.pid, time.time(), __version__)
        adopt.write_running(self.paths, self.running)
        notify("READY=1", f"STATUS=running, QEMU pid {self.qemu.pid}")
        if plan.incoming is not None:
            self.log(f"guest {self.name} arrived from {plan.incoming.source} and runs here, "
                     f"QEMU pid {self.qemu.pid}", 5, MSG_MIGRATED_IN)
        else:
            self.log(f"guest {self.name} running, QEMU pid {self.qemu.pid}", 6, MSG_RUNNING)

    def abandon(self) -> None:
        """An unexpected exception (a bug) once QEMU's ends of QMP and the
        console are in systemd's fd store: QEMU is left running, the
        traceback goes to the journal, and the supervisor exits 1 (run()):
        systemd starts the next one, which takes the guest over, as after a
        kill -9.  A stop under way when it failed is ended by stop-post."""
        import traceback
        self.abandoned = True
        pid = self.qemu.pid if self.qemu is not None else "?"
        self.log(f"the supervisor of guest {self.name} failed; its QEMU (pid {pid}) is left "
                 f"running for the next supervisor to take over:\n{traceback.format_exc()}",
                 3, MSG_FAILED_QEMU_KEPT)
        notify(f"STATUS=supervisor failed; QEMU pid {pid} left running")

    # -- run ------------------------------------------------------------------
    def _console_data(self) -> None:
        assert self.console is not None
        try:
            data = self.console.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.console = None
            return
        if self.hub is not None:
            self.hub.broadcast(data)
        self._console_log(*self.console_log.feed(data, time.monotonic()))

    def _console_log(self, lines: list[bytes], dropped: int) -> None:
        for line in lines:
            self.journal.send(line, 6, GUEST=self.name,
                              SYSLOG_IDENTIFIER=f"{self.name}-console")
        if dropped:
            self.log(f"{dropped} console lines of guest {self.name} not logged "
                     f"(more than {self.console_log.burst} in "
                     f"{self.console_log.interval:g} s)", 4, MSG_CONSOLE_DROPPED)

    def _events(self) -> None:
        assert self.qmp is not None
        for event in self.qmp.poll():
            kind, data = event.get("event"), event.get("data", {})
            if kind == "SHUTDOWN" and data.get("guest"):
                reason = data.get("reason", "")
                kept = self.stop.shutdown(reason)
                if kept is not None:
                    self.log(f"guest {self.name} powered off" +
                             (" at its reboot (on_reboot = stop)" if reason == "guest-reset"
                              else "") + ("; QEMU kept (on_poweroff = keep)" if kept else ""),
                             6, MSG_POWEREDOFF)
            elif kind == "STOP":  # for a live migration's paused_ms
                self.paused_at = event_time(event)
            elif kind == "RESET":
                self.log(f"guest {self.name} reset ({data.get('reason', '?')})", 6)
            elif kind == "GUEST_PANICKED":
                self.log(f"guest {self.name} kernel panic", 3, MSG_PANIC)
            elif kind == "MIGRATION" and data.get("status") == "pre-switchover":
                mirror.switchover(self)  # migrate --copy-storage: the guest is paused

    def _watchdog(self) -> None:
        assert self.qmp is not None
        try:
            self.qmp.execute("query-status", timeout=2.0)
        except QmpError as e:
            self.log(f"QEMU does not answer on QMP ({e.message}); no watchdog ping", 4,
                     MSG_WATCHDOG)
            return
        uptime = int(time.monotonic() - self.started)
        if self.held is not None:  # kvmagent.unit.migration: the guest paused, unconfirmed
            notify("WATCHDOG=1", f"STATUS={self.held}")
            return
        notify("WATCHDOG=1", f"STATUS=running, QEMU pid {self.qemu.pid if self.qemu else '?'}, "
                             f"up {uptime // 86400}d {uptime % 86400 // 3600}h "
                             f"{uptime % 3600 // 60}min")

    def run(self) -> int:
        assert self.qemu is not None and self.qmp is not None
        wake_r, wake_w = self.wake_r, self.wake_w
        watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if os.environ.get("WATCHDOG_PID") not in (None, str(os.getpid())):
            watchdog_usec = 0
        ping_every = watchdog_usec / 3e6 if watchdog_usec else None
        next_ping = time.monotonic()
        while self.qemu.poll() is None:
            now = time.monotonic()
            # While stopping there are no pings (their time, long past, would
            # make this a busy loop until QEMU is gone); the stop's own next
            # step is never in the past once it has been taken.
            timers = [t for t in (next_ping if ping_every and not self.stop.stopping else None,
                                  self.stop.wakeup(), self.thaw_at,
                                  self.console_log.deadline()) if t is not None]
            timeout = max(0.0, min(timers) - now) if timers else None
            if self.qmp.events:  # kept while a command waited for its reply
                timeout = 0.0
            watch: list[Any] = [wake_r]
            watch += [self.qemu] if isinstance(self.qemu, AdoptedQemu) else []
            watch += [self.channel] if self.channel is not None else []
            watch += [self.qmp] if not self.qmp.closed else []
            watch += [self.console] if self.console else []
            watch += self.hub.sockets() if self.hub else []
            # The console is watched for room while viewers' input waits for
            # it, the journal while messages wait for journald.
            room: list[Any] = ([self.console] if self.console and self.hub and self.hub.pending
                               else [])
            room += [self.journal] if self.journal.backlog else []
            ready, _, _ = select.select(watch, room, [],
                                        min(timeout, 1.0) if timeout is not None else 1.0)
            if lost := self.journal.flush():
                self.log(f"{lost} messages of guest {self.name} lost: journald did not "
                         "take them", 4, MSG_CONSOLE_DROPPED)
            if wake_r in ready:
                self.record.wait(block=False)  # a SIGCHLD may be the event writer's
                for signum in wake_r.recv(64):
                    if signum == signal.SIGUSR1:  # kvmagent stop --force
                        self._carry_out(self.stop.sigusr1(time.monotonic()))
                    elif signum in (signal.SIGTERM, signal.SIGINT):
                        self._carry_out(self.stop.sigterm(time.monotonic()))
            if self.console is not None and self.console in ready:
                self._console_data()
            if self.hub is not None:
                self.hub.handle(ready)
            if (t := self.console_log.deadline()) is not None and time.monotonic() >= t:
                self._console_log(*self.console_log.tick(time.monotonic()))
            if self.qmp in ready or self.qmp.events:
                self._events()
            if self.channel is not None and self.channel in ready:
                takeover.control(self)
            now = time.monotonic()
            if self.thaw_at is not None and now >= self.thaw_at:
                takeover.thaw(self, "its time for the snapshot is up "
                              "(the client did not resume it)")
            if ping_every and now >= next_ping and not self.stop.stopping:
                self._watchdog()
                next_ping = now + ping_every
            self._carry_out(self.stop.tick(now))
            if testhook.ACTIVE:
                testhook.point(str(self.paths.guest_runtime(self.name)), "running")
        if self.console is not None:
            while self.console is not None and select.select([self.console], [], [], 0)[0]:
                self._console_data()  # what the guest said last
        self._console_log(*self.console_log.flush(time.monotonic()))
        with suppress(KvmagentError, OSError, ValueError):
            self._events()
        # The wake-up socket goes with this frame: no signal may write to it now
        # (SIGCHLD of the last event's writer would, and Python complains).
        signal.set_wakeup_fd(-1)
        wake_r.close()
        wake_w.close()
        with suppress(FileNotFoundError):
            self.paths.running_record(self.name).unlink()
        return self._verdict(self.qemu.wait())

    def _carry_out(self, actions: list[Action]) -> None:
        """What kvmagent.unit.stoppolicy decided."""
        assert self.qemu is not None and self.qmp is not None
        for action in actions:
            if isinstance(action, Stopping):  # SIGTERM
                notify("STOPPING=1")
                if testhook.ACTIVE:
                    testhook.point(str(self.paths.guest_runtime(self.name)), "stopping")
                if self.thaw_at is not None:  # a paused guest cannot power off
                    takeover.thaw(self, "the guest is stopping")
                # admin or host shutdown: the event writer tells them apart
                self.record("stopping", ADMIN)
                self.record.flush(linger=True)  # while the guest powers off
            elif isinstance(action, ForceStop):  # kvmagent stop --force
                # systemd did not ask for this stop: tell it, so that the
                # unit is stopping (no watchdog while QEMU dies, no restart)
                notify("STOPPING=1", "STATUS=stopping QEMU (stop --force)")
                self.record("stopping", ADMIN, "stop --force")
                self.log(f"stopping QEMU of guest {self.name} without ACPI "
                         "(stop --force)", 5)
                self.qemu.kill()
                self.record.flush(linger=True)  # while QEMU dies
            elif isinstance(action, Press):
                notify(f"EXTEND_TIMEOUT_USEC={action.extend_usec}",
                       f"STATUS=powering off, {int(action.left)} s left")
                self._press_power_button()
            elif isinstance(action, Quit):
                if action.powered_off:
                    self.log(f"guest {self.name} is powered off; stopping QEMU", 6)
                else:
                    self.log(f"guest {self.name} did not power off within "
                             f"{self.stop.stop_timeout:g} s; stopping QEMU", 4)
                with suppress(KvmagentError, OSError):
                    self.qmp.execute("quit", timeout=2.0)
            elif isinstance(action, Kill):
                self.qemu.kill()

    def _press_power_button(self) -> None:
        assert self.qmp is not None
        try:
            self.qmp.execute("system_powerdown", timeout=2.0)
            self.log(f"ACPI power button pressed for guest {self.name}", 6, MSG_POWERDOWN)
        except QmpError:
            pass  # QEMU is exiting

    def _verdict(self, rc: int) -> int:
        if self.migrated_to is not None:
            return migration.migrated(self, rc)
        outcome = self.stop.outcome(rc)
        if outcome is Outcome.STOPPED:
            self.log(f"guest {self.name} stopped", 6, MSG_STOPPED)
            self.record("stopped", ADMIN)
            return ExitStatus.OK
        if outcome is Outcome.POWERED_OFF:
            self.record("stopped", POWEROFF)
            return ExitStatus.OK
        how = (f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
               if not isinstance(self.qemu, AdoptedQemu) else "ended (taken over from another "
               "supervisor: its exit status is not known)")
        self.log(f"QEMU of guest {self.name} {how}", 3, MSG_CRASHED)
        self.record("stopped", CRASHED, f"QEMU {how}")
        return ExitStatus.FAILURE


def run(name: str, paths: Paths, unit: str, planner: forkcall.Child) -> int:
    """Supervise guest NAME until it stops, in UNIT (kvm@NAME.service or
    kvm-oneoff@NAME.service); planner: kvmagent.unit.run's child making its
    plan.  The exit status is the unit's."""
    sup = Supervisor(name, paths, unit)
    with ExitStack() as stack:
        stack.callback(sup.journal.drain, 2.0)  # last: what journald has not taken yet
        stack.callback(sup.record.finish)  # the last event is written before we exit
        try:
            return _supervise(sup, stack, planner)
        except Exception:
            if not sup.kept:  # QEMU, if any, goes with the stack: a start that failed
                raise
            sup.abandon()
            return ExitStatus.FAILURE
    # Not reached: an ExitStack passes on every exception its callbacks do
    # not raise themselves, which a type checker cannot know.
    raise AssertionError("unreachable")


def _supervise(sup: Supervisor, stack: ExitStack, planner: forkcall.Child) -> int:
    name, paths = sup.name, sup.paths
    stack.callback(planner.close)
    try:
        sup.lock = adopt.lock(paths, name)  # released by the kernel at exit
        if takeover.take_over(sup, stack, planner):
            # The guest's start was recorded by its first supervisor; this
            # one's takeover or reload is written now.
            sup.record.flush()
            return sup.run()
    except KvmagentError as e:
        sup.log(str(e), 3, MSG_START_FAILED)
        notify(f"STATUS={e.message}")
        return int(e.status)
    # an arrival by live migration is no restart (kvmagent.host.state)
    sup.record("starting", MIGRATED if paths.incoming_request(name).exists() else None)
    try:
        sup.start(stack, planner)
    except StoppedWhileStarting:  # QEMU, if it was started, and the helpers go with the stack
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # once is enough
        sup.log(f"guest {name} stopped while starting (stop --force)", 5)
        sup.record("stopped", ADMIN, "stop --force")
        # A Type=notify main process that exits before READY=1 is a failure
        # to systemd (result "protocol": restarted), whatever its status:
        # ready, then done.
        notify("READY=1", "STATUS=stopped while starting (stop --force)")
        return ExitStatus.OK
    except migration.IncomingFailed as e:  # QEMU, if any, goes with the stack
        return migration.incoming_failed(sup, e)
    except KvmagentError as e:
        if sup.incoming is not None:  # never restarted: see migration.incoming_failed
            return migration.incoming_failed(sup, migration.IncomingFailed(e.message))
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # exiting anyway
        sup.log(str(e), 3, MSG_START_FAILED)
        notify(f"STATUS={e.message}")
        bad = e.status in (ExitStatus.CONFIG, ExitStatus.UNKNOWN_GUEST)
        sup.record("stopped", CONFIG if bad else FAILED, e.message)
        return int(e.status)
    assert sup.qemu is not None
    sup.record("running", None, sup.incoming and f"{ARRIVED_FROM}{sup.incoming}", sup.qemu.pid,
               booted=sup.booted)
    sup.record.flush()
    return sup.run()
