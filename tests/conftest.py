"""Project-wide pytest settings.

Tests are split by what they need: tests/unit (no root, pure logic),
tests/net (root, a throwaway network namespace), tests/qemu (the real
qemu-system-x86_64 under TCG) and tests/system (root, a throwaway systemd
host booted with systemd-nspawn, and the tiny real guest).  Markers select
them.  In CI (CI=true) or with KVMAGENT_STRICT=1 a skipped net/qemu/system
test is turned into a failure: a test that silently skips in CI proves
nothing.
"""

from __future__ import annotations

import os
import signal

import pytest

STRICT = os.environ.get("CI") == "true" or os.environ.get("KVMAGENT_STRICT") == "1"
REAL_MARKERS = ("net", "qemu", "system")

# What these machines cannot exercise at all; covered by unit tests of the
# generated argv and settings only (printed at the end of every run).
NOT_EXERCISED = (
    "KVM acceleration (-accel kvm, -cpu host): /dev/kvm here runs a test vCPU ~1000x "
    "too slowly (nested); guests ran under TCG",
    "vhost-net: /dev/vhost-net is absent here",
    "enforcement of cgroup limits (MemoryMax, CPUWeight, AllowedCPUs, IOWeight, TasksMax): "
    "set and read back, not enforced by this kernel's hybrid cgroup setup",
)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # A time limit or kill sends SIGTERM, which would end pytest without its
    # fixture teardown: network namespaces, test hosts and guests would be
    # left behind.  As an interrupt, the teardown runs.
    signal.signal(signal.SIGTERM, _interrupt)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and any(item.get_closest_marker(m) for m in REAL_MARKERS):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which counts as a failure: {reason}"


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
