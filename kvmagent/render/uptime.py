"""A guest's uptime, runs and restarts, derived from its lifecycle events
in the state database (kvmagent.host.state keeps them).  Pure: the clock
is passed in (Now).

Counting restarts: a restart is a `starting` event that follows, for the
same guest and in the same boot, a `stopped` event whose reason is one
systemd restarts after (Restart=on-failure): crashed, watchdog, killed, oom,
timeout, failed.  A bad configuration (exit 6) is never restarted by
systemd, so a start after it is not counted.  A start after a failure
counts even when an admin, not systemd, started the guest (after systemd
gave up at StartLimitBurst=): it is a restart after a failure all the same.
Only `kvmagent reset-counters NAME` sets the count back to zero.

A guest that arrived by live migration (kvmagent migrate) did not boot
here: its `starting` has the reason `migrated` (never a restart, whatever
stopped before it on this host) and its `running` the wall clock of its
boot on the host it came from (`booted`); its uptime is the time it had
run there, by the wall clocks of both hosts, and its time here, by
CLOCK_BOOTTIME (run_uptime).  Cumulative uptime counts the time on this
host only: a guest that moves back and forth is not counted twice.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from kvmagent.lifecycle import FAILURES, MIGRATED, RESTARTED


class Event(NamedTuple):
    # A NamedTuple, not a dataclass: the supervisor's recorder imports this
    # module (through kvmagent.host.state), and no more than it needs.
    id: int
    guest: str
    event: str
    reason: str | None
    detail: str | None
    realtime: float
    boottime: float
    boot_id: str
    invocation: str | None
    pid: int | None
    source: str
    booted: float | None = None  # arrived by migration: its boot elsewhere (wall clock)


class Now(NamedTuple):
    realtime: float
    boottime: float
    boot_id: str


class Summary(NamedTuple):
    guest: str
    running_since: Event | None  # the `running` event of the open run of this boot
    uptime: float | None  # of that run, seconds
    cumulative: float  # all runs, the open one included
    longest: float
    runs: int
    restarts: int
    last_failure: Event | None
    last_event: Event | None
    counted_since: float | None  # realtime of the last reset-counters


def _span(start: Event, end: Event) -> float:
    if start.boot_id == end.boot_id:
        return max(0.0, end.boottime - start.boottime)
    return max(0.0, end.realtime - start.realtime)


def carried(run: Event) -> float:
    """What a run that arrived by live migration had run before it came
    (from its boot elsewhere to its `running` here, by the wall clocks of
    both hosts); 0 for a run that booted here."""
    return 0.0 if run.booted is None else max(0.0, run.realtime - run.booted)


def run_uptime(run: Event, at: Now) -> float:
    """The uptime of RUN, a `running` of this boot still open at AT: since
    the guest booted, here or, before a live migration, elsewhere."""
    return max(0.0, at.boottime - run.boottime) + carried(run)


def booted_at(run: Event) -> float:
    """The wall clock of RUN's guest's boot (here, or where it came from)."""
    return run.realtime if run.booted is None else run.booted


def derive(guest: str, rows: Iterable[Event], at: Now, reset_after: int = 0,
           reset_realtime: float | None = None) -> Summary:
    """The figures of one guest from its events (oldest first).  Pure.

    A run lasts from `running` to the `stopped` that follows (or, when the
    supervisor died without a trace and ExecStopPost did not run either, to
    the last event seen of that run).  A run that arrived by live
    migration counts from its boot elsewhere in its uptime and the longest,
    from its arrival in the cumulative uptime.  A run still open in this boot is
    counted up to now; one left open in an earlier boot (a host crash) ends
    at its last event.  `taken-over` and `reloaded` (a new supervisor, the
    same QEMU) neither end the run nor start one: the uptime goes on across
    them, and they only show that the run lasted at least until then."""
    open_run: Event | None = None
    last_of_run: Event | None = None
    cumulative = longest = 0.0
    runs = restarts = 0
    previous_stop: Event | None = None
    last_failure: Event | None = None
    last: Event | None = None

    def close(end: Event) -> None:
        nonlocal open_run, cumulative, longest, runs
        if open_run is not None:
            span = _span(open_run, end)
            cumulative += span
            longest = max(longest, span + carried(open_run))
            runs += 1
        open_run = None

    for ev in rows:
        last = ev
        if ev.event == "starting":
            if open_run is not None and last_of_run is not None:
                close(last_of_run)
            if (previous_stop is not None and previous_stop.reason in RESTARTED
                    and previous_stop.boot_id == ev.boot_id and ev.id > reset_after
                    and ev.reason != MIGRATED):
                restarts += 1
            previous_stop = None
        elif ev.event == "running":
            if open_run is not None and last_of_run is not None:
                close(last_of_run)
            open_run = ev
        elif ev.event == "stopped":
            close(ev)
            previous_stop = ev
            if ev.reason in FAILURES:
                last_failure = ev
        last_of_run = ev

    uptime = None
    running_since = None
    if open_run is not None:
        if open_run.boot_id == at.boot_id:
            uptime = run_uptime(open_run, at)
            running_since = open_run
            cumulative += max(0.0, at.boottime - open_run.boottime)
            longest = max(longest, uptime)
            runs += 1
        elif last_of_run is not None:
            close(last_of_run)
    return Summary(guest, running_since, uptime, cumulative, longest, runs, restarts,
                   last_failure, last, reset_realtime)
