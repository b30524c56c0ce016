"""tests/unit where systemd is PID 1: inside the test host, as root on the
checkout bound read-only at /src/kvmagent, and as an unprivileged user on a
copy owned by root.  The unit tests once assumed a host without systemd
(a guest's state "unknown"); this keeps that from coming back, and shows
they depend neither on who runs them nor on who owns the checkout.

run_unit_tests() takes any booted TestHost, so a test host of another
release or root can run them the same way."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.harness import TestHost
from tests.harness.install import install_checkout

pytestmark = pytest.mark.system

SRC = "/src/kvmagent"
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def run_unit_tests(th: TestHost, *, user: str = "root", checkout: str = SRC,
                   paths: tuple[str, ...] = ("tests/unit",),
                   timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """`/usr/bin/python3 -m pytest tests/unit` (or paths) in th as a transient
    unit of user, on checkout (read-only: no cache, a writable basetemp and
    Hypothesis database under /var/tmp)."""
    work = f"/var/tmp/unit-tests-{user}"
    th.exec(["install", "-d", "-o", user, "-m", "0700", work])
    argv = ["/usr/bin/python3", "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "--basetemp", f"{work}/basetemp", "-o", "console_output_style=classic", *paths]
    return th.run(argv, cwd=checkout, timeout=timeout, check=False,
                  props=[f"User={user}", "StandardError=journal"],
                  env={"PATH": PATH, "HOME": work, "PYTHONDONTWRITEBYTECODE": "1",
                       "HYPOTHESIS_STORAGE_DIRECTORY": f"{work}/hypothesis"})


def summary(r: subprocess.CompletedProcess[str]) -> dict[str, int]:
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    return {what: int(n) for n, what in re.findall(r"(\d+) (\w+)", last)}


def assert_all_passed(r: subprocess.CompletedProcess[str]) -> dict[str, int]:
    counts = summary(r)
    tail = "\n".join(r.stdout.splitlines()[-60:])
    assert r.returncode == 0, f"exit status {r.returncode}:\n{tail}\n{r.stderr[-3000:]}"
    assert counts.get("passed", 0) >= 400 and not counts.keys() - {"passed", "skipped"}, tail
    return counts


@pytest.mark.parametrize("host", ["testhost"])
def test_unit_tests_pass_as_root_with_systemd_as_pid1(host: str, request) -> None:  # type: ignore[no-untyped-def]
    """On a host where kvmagent is in use, as a contributor's may be: its
    /run/kvmagent/boot-id and the default bridge br-kvm are there (tests once
    took this boot's name and the host's bridges for their own)."""
    th: TestHost = request.getfixturevalue(host)
    assert th.exec(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    assert th.exec(["test", "-d", "/run/systemd/system"], check=False).returncode == 0
    install_checkout(th)
    th.run(["kvmagent", "bridge", "ensure", "br-kvm"])
    assert th.exec(["test", "-s", "/run/kvmagent/boot-id"], check=False).returncode == 0
    counts = assert_all_passed(run_unit_tests(th))
    print(f"tests/unit with systemd as PID 1, as root: {counts}")


@pytest.mark.parametrize("host", ["testhost"])
def test_unit_tests_pass_as_a_user_on_a_checkout_owned_by_root(host: str, request) -> None:  # type: ignore[no-untyped-def]
    th: TestHost = request.getfixturevalue(host)
    copy = "/var/tmp/kvmagent-checkout"
    th.exec(["rm", "-rf", copy])
    th.exec(["cp", "-r", "--no-preserve=ownership,mode", f"{SRC}/.", copy])
    th.exec(["chmod", "-R", "u=rwX,go=rX", copy])
    r = run_unit_tests(th, user="nobody", checkout=copy)
    counts = assert_all_passed(r)
    # what needs root or an openable /dev/kvm said so, and nothing else skipped
    skipped = [ln for ln in r.stdout.splitlines() if ln.startswith("SKIPPED")]
    assert all("NOT RUN: needs" in ln for ln in skipped), skipped
    print(f"tests/unit with systemd as PID 1, as nobody: {counts}")


def test_unit_and_library_tests_pass_on_each_release(debian_testhost: TestHost) -> None:
    """Debian 12's and 13's own root: Python 3.11 and 3.13, pystemd 0.11 and
    0.13, pyroute2 0.7.2 and 0.7.7 (tests/libs reach into them), systemd as PID 1."""
    th = debian_testhost
    counts = assert_all_passed(run_unit_tests(th, paths=("tests/unit", "tests/libs")))
    print(f"tests/unit and tests/libs on {th.release}: {counts}")
