"""Waiting for a systemd job (kvmagent.host.systemd._Manager.wait_job):
sd-bus reads many messages at once and process() dispatches one; wait()
blocks for new data on the socket, not for messages read already.  So the
queue is emptied before each wait: a `kvmagent stop` whose JobRemoved came
behind other signals waited a second for each of them (3.4 s measured for
a 0.4 s stop, bench/bench_lifecycle.py)."""

from __future__ import annotations

import time

import pytest

from kvmagent.host import systemd

JOB = b"/org/freedesktop/systemd1/job/42"


class QueuedBus:
    """sd-bus as wait_job sees it: messages already read, in a queue."""

    def __init__(self, manager: systemd._Manager, queued: list[bytes | None]) -> None:
        self.manager, self.queued, self.waits = manager, queued, 0

    def process(self) -> None:
        if self.queued:
            job = self.queued.pop(0)
            if job is not None:  # a JobRemoved signal; None: any other signal
                self.manager.removed[job] = b"done"

    def wait(self, usec: int) -> None:
        assert not self.queued, "wait() with messages queued blocks (up to 1 s each)"
        self.waits += 1
        self.queued.append(JOB)  # what the socket brings next


def manager(queued: list[bytes | None]) -> tuple[systemd._Manager, QueuedBus]:
    m = object.__new__(systemd._Manager)
    m.removed = {}
    bus = QueuedBus(m, queued)
    m.bus = bus  # type: ignore[assignment]
    return m, bus


@pytest.mark.parametrize("before", [0, 1, 5, systemd.DRAIN - 1])
def test_a_job_removed_behind_other_signals_is_seen_without_waiting(before: int) -> None:
    m, bus = manager([None] * before + [JOB])
    assert m.wait_job(JOB, "kvm@g.service", time.monotonic() + 5) == "done"
    assert bus.waits == 0


def test_an_empty_queue_is_waited_on() -> None:
    m, bus = manager([None, None])
    assert m.wait_job(JOB, "kvm@g.service", time.monotonic() + 5) == "done"
    assert bus.waits == 1
