"""Fixtures for system tests: throwaway systemd hosts booted with systemd-nspawn.

`testhost` boots the host's own / under an overlay (nothing to build, ~3 s);
`debian_testhost` boots the cached debootstrap root of each release, Debian 12 and 13
(`make setup` builds them; a missing cache is a failure, never a silent skip).  Both bind this checkout read-only at
/src/kvmagent and save the container's journal into the pytest tmp dir on teardown.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import HarnessError, TestHost, rootfs
from tests.harness.sysutil import CLEAN_ENV

REPO = Path(__file__).resolve().parents[2]
_hosts: list[TestHost] = []  # for the summary: where the journals are, how long boots took


def require_system() -> None:
    """Skip (loudly) only when this machine cannot boot a test host at all."""
    if os.geteuid() != 0:
        pytest.skip("SYSTEM TEST NOT RUN: needs root (systemd-nspawn, mounts, nsenter)")
    if shutil.which("systemd-nspawn", path=CLEAN_ENV["PATH"]) is None:
        pytest.skip("SYSTEM TEST NOT RUN: systemd-nspawn is missing "
                    "(apt-get install systemd-container)")


@pytest.fixture
def system_ok() -> None:
    """For tests that boot their own TestHost."""
    require_system()


def _boot(th: TestHost) -> Iterator[TestHost]:
    _hosts.append(th)
    with th:
        yield th


@pytest.fixture(scope="session")
def testhost(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestHost]:
    require_system()
    yield from _boot(TestHost(root="host", src=REPO,
                              journal_dir=tmp_path_factory.mktemp("testhost-journal")))


@pytest.fixture(scope="session", params=list(rootfs.RELEASES))
def debian_testhost(request: pytest.FixtureRequest,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestHost]:
    """The debootstrap root of each release (Debian 12, Debian 13), with the offline
    repo of kvmagent's runtime deps at /mnt/debs."""
    require_system()
    release = request.param
    try:
        rootfs.cached_root(release)  # that it is there: TestHost finds it by release
        debs = rootfs.cached_debs(release)
    except HarnessError as exc:
        missing = str(exc)
    else:
        missing = ""
    if missing:  # outside the except: one clear message, no chained traceback
        pytest.fail(missing, pytrace=False)
    yield from _boot(TestHost(root=release, src=REPO, bind_ro=[(debs, "/mnt/debs")],
                              journal_dir=tmp_path_factory.mktemp(f"{release}-testhost-journal")))


def pytest_terminal_summary(terminalreporter):  # type: ignore[no-untyped-def]
    if not _hosts:
        return
    terminalreporter.section("test hosts (systemd-nspawn)")
    for th in _hosts:
        boots = ", ".join(f"{s:.1f} s" for s in th.boot_seconds) or "not booted"
        terminalreporter.write_line(
            f"{th.name} ({th.root_dir}): boot {boots}, teardown {th.stop_seconds:.1f} s, "
            f"journal in {th.journal_dir}"
        )


@pytest.fixture(scope="module")
def image(guest_image):  # type: ignore[no-untyped-def]
    """The tiny test guest (tests/conftest.py: built by make setup; a skip fails in CI)."""
    return guest_image
