"""Project-wide pytest settings.

Tests are split by what they need: tests/unit (no root, pure logic),
tests/net (root, a throwaway network namespace), tests/qemu (the real
qemu-system-x86_64 under TCG) and tests/system (root, a throwaway systemd
host booted with systemd-nspawn, and the tiny real guest).  Markers select
them.  A test that needs a property of the machine says so with a marker
(`root`, `kvm`) and is skipped, with the reason, where the property is
missing.  In CI (CI=true) or with KVMAGENT_STRICT=1 every skip, at
collection or in a test, is turned into a failure: a test that silently
skips in CI proves nothing.  A machine that lacks a property deselects the
tests that need it by name (`-m "not kvm"`), in plain sight.

Every test has a time limit (TIME_LIMITS); going over it fails the test
with a message, and its fixtures are still torn down.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Iterator

import pytest

STRICT = os.environ.get("CI") == "true" or os.environ.get("KVMAGENT_STRICT") == "1"

# Machine properties a test can need: marker -> (check, what is missing).
MACHINE_MARKERS = {
    "root": (lambda: os.geteuid() == 0, "needs root"),
    "kvm": (lambda: _can_open("/dev/kvm"), "needs /dev/kvm that this user can open read-write"),
}

# Seconds a test may take for its setup plus call, by marker (the first that
# applies), on a busy 2-core machine running TCG guests; a test can set its
# own with @pytest.mark.timeout(SECONDS).  Teardown has its own limit.
# KVMAGENT_TIME_SCALE multiplies them all (a slower machine).
TIME_LIMITS = (("system", 900.0), ("qemu", 600.0), ("net", 600.0))
DEFAULT_TIME_LIMIT = 120.0
TEARDOWN_TIME_LIMIT = 300.0
TIME_SCALE = float(os.environ.get("KVMAGENT_TIME_SCALE") or 1)
TIMEOUT_SIGNAL = signal.SIGUSR2  # nothing in kvmagent or the tests uses it
REPEAT_AFTER = 30.0  # a test that swallows the first interruption gets another

# What these machines cannot exercise at all; covered by unit tests of the
# generated argv and settings only (printed at the end of every run).
NOT_EXERCISED = (
    "KVM acceleration (-accel kvm, with -cpu Westmere, the default, or -cpu host): "
    "/dev/kvm here runs a test vCPU ~1000x too slowly (nested); guests ran under TCG, "
    "with -cpu Westmere as well",
    "vhost-net: /dev/vhost-net is absent here",
    "enforcement of cgroup limits (MemoryMax, CPUWeight, AllowedCPUs, IOWeight, TasksMax): "
    "set and read back, not enforced by this kernel's hybrid cgroup setup",
    "LVM volumes (kvmagent clone --snapshot SIZE, --copy of an LV): this kernel has no "
    "device-mapper, so no LV can be made, not even in a throwaway volume group on a loop "
    "device; the plan (lvcreate/lvremove/dd argv) is unit-tested, and the supervisor's "
    "pause for those snapshots (freeze/thaw) runs in tests/system/test_clone_boots.py",
    "block devices under migrate --copy-storage as LVM and SANs have them: an LV as such "
    "(no device-mapper here: the copy runs from a block device onto one of the same size "
    "the admin made, loop devices, one on each test host, in "
    "tests/system/test_migrate_block.py, and with image files in "
    "tests/system/test_migrate_copy.py), and a shared VG's LV or a SAN disk refused by its "
    "identity, device-mapper UUID or WWID (no shared block device here); that refusal, the "
    "identity read from a sysfs tree and the destination's check of an LV of its own are "
    "unit-tested; and the device policy: the test hosts here enforce none (DevicePolicy="
    "closed lets a unit open any device node in them), so kvm@.service's "
    "DeviceAllow=block-loop is not put to the test, and the QEMU scope's DeviceAllow= of the "
    "disk is only read back",
)


def _can_open(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return False
    return True


_PYTEST_PID = os.getpid()


def _interrupt(signum: int, frame: object) -> None:
    if os.getpid() != _PYTEST_PID:
        # A process a test forked (a multiprocessing worker, a forkcall child)
        # inherits this handler: it must die of SIGTERM as it would anywhere
        # else (a pool worker that raised instead hung in its exit handlers,
        # and Pool.terminate() waited for it forever).
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # A time limit or kill sends SIGTERM, which would end pytest without its
    # fixture teardown: network namespaces, test hosts and guests would be
    # left behind.  As an interrupt, the teardown runs.
    signal.signal(signal.SIGTERM, _interrupt)
    config.addinivalue_line("markers", "root: needs root (skipped, with the reason, without)")
    config.addinivalue_line("markers", "kvm: needs a /dev/kvm this user can open")
    config.addinivalue_line("markers", "timeout(seconds): this test's own time limit "
                            "(setup and call)")


# -- time limits ------------------------------------------------------------------------

def time_limit(item: pytest.Item) -> float:
    own = item.get_closest_marker("timeout")
    if own is not None:
        return float(own.args[0]) * TIME_SCALE
    for marker, seconds in TIME_LIMITS:
        if item.get_closest_marker(marker):
            return seconds * TIME_SCALE
    return DEFAULT_TIME_LIMIT * TIME_SCALE


class Watchdog:
    """Signals this process when a time limit runs out.  A process, forked
    at start-up while pytest is single-threaded, not a thread: a thread
    would make every fork() the tests and kvmagent make a fork of a
    multi-threaded process (unsafe; Python 3.12+ warns on each one).

    The parent writes "ARM SECONDS\n" or "OFF\n" down a pipe; once armed
    time has run out, the watchdog sends TIMEOUT_SIGNAL, and again every
    REPEAT_AFTER seconds until it is told OFF.  It ends when the pipe
    closes (pytest exited)."""

    def __init__(self) -> None:
        r, w = os.pipe()
        self.parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the watchdog itself
            os.close(w)
            try:
                for sig in (signal.SIGINT, signal.SIGTERM, TIMEOUT_SIGNAL):
                    signal.signal(sig, signal.SIG_IGN)
                self._watch(r)
            finally:
                os._exit(0)
        os.close(r)
        self.pipe, self.pid = w, pid

    def _watch(self, r: int) -> None:
        deadline: float | None = None
        buf = b""
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([r], [], [], wait)
            if not ready:
                try:
                    os.kill(self.parent, TIMEOUT_SIGNAL)
                except ProcessLookupError:
                    return
                deadline = time.monotonic() + REPEAT_AFTER
                continue
            data = os.read(r, 4096)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                word, _, arg = line.decode().partition(" ")
                deadline = time.monotonic() + float(arg) if word == "ARM" else None

    def send(self, line: str) -> None:
        os.write(self.pipe, line.encode() + b"\n")


_watchdog: list[Watchdog] = []  # the one of this pytest process, made on first use
_armed: list[str] = []  # what is being timed now, for the signal handler


def _expired(signum: int, frame: object) -> None:
    if _armed:
        what, seconds = _armed[-1].rsplit("\0", 1)
        pytest.fail(f"TIME LIMIT: {what} took longer than {float(seconds):.0f} s "
                    "(a hang, or a machine slower than the limit allows: "
                    "KVMAGENT_TIME_SCALE)", pytrace=True)


@contextlib.contextmanager
def limited(seconds: float, what: str) -> Iterator[None]:
    """Fail (pytest.fail, which is no Exception: `except Exception` does not
    swallow it) what runs if it takes longer than seconds.  The signal
    interrupts a blocking call (read, wait, select, sleep) and the handler
    raises there, so the traceback shows where the test waited.  Not
    SIGALRM: tests use alarm(2)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if not _watchdog or _watchdog[0].parent != os.getpid():
        _watchdog[:] = [Watchdog()]
    old = signal.signal(TIMEOUT_SIGNAL, _expired)
    _armed.append(f"{what}\0{seconds}")
    _watchdog[0].send(f"ARM {seconds}")
    try:
        yield
    finally:
        _armed.clear()  # first: a signal already on its way finds nothing armed
        _watchdog[0].send("OFF")
        signal.signal(TIMEOUT_SIGNAL, old)


def _missing(item: pytest.Item) -> list[str]:
    return [f"{missing} (marker {marker!r})" for marker, (have, missing)
            in MACHINE_MARKERS.items() if item.get_closest_marker(marker) and not have()]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item):  # type: ignore[no-untyped-def]
    missing = _missing(item)
    if missing:
        pytest.skip("NOT RUN: " + "; ".join(missing))
    with limited(time_limit(item), f"{item.nodeid} (setup)"):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):  # type: ignore[no-untyped-def]
    with limited(time_limit(item), item.nodeid):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item):  # type: ignore[no-untyped-def]
    # Fixture teardown bounds its own waits (test hosts, netns); this catches a
    # hang there, at the price of what the interrupted teardown leaves behind
    # (make clean-tests removes it).
    with limited(TEARDOWN_TIME_LIMIT * TIME_SCALE, f"{item.nodeid} (teardown)"):
        yield


# -- skips in CI ------------------------------------------------------------------------

def _strict_failure(report) -> None:  # type: ignore[no-untyped-def]
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
    reason = str(reason).removeprefix("Skipped: ")
    report.outcome = "failed"
    report.longrepr = f"skipped in CI, which counts as a failure: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped:
        _strict_failure(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):  # type: ignore[no-untyped-def]
    """A module-level pytest.skip() or importorskip() skips at collection."""
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped:
        _strict_failure(report)


def pytest_terminal_summary(terminalreporter):  # type: ignore[no-untyped-def]
    terminalreporter.section("not exercised on this machine")
    for line in NOT_EXERCISED:
        terminalreporter.write_line(f"- {line}")


@pytest.fixture(scope="session")
def guest_image():  # type: ignore[no-untyped-def]
    """The tiny test guest (built by `make setup`) for tests that run QEMU."""
    from tests.guest.build import GuestBuildError, find_guest
    from tests.guest.qemu_helpers import qemu_available
    if not qemu_available():
        pytest.skip("qemu-system-x86_64 is not installed: run `make setup`")
    try:
        return find_guest()
    except GuestBuildError as e:
        pytest.skip(str(e))
