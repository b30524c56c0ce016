"""`kvmagent -H` between two real test hosts (tests/harness/hostpair.py): a
Debian 12 host and a Debian 13 host on a private link, each with the package
installed with apt and sshd, root's keys made by the test.

Each host's kvmagent drives the other's: list across both and an address
nobody answers; start, status, console (without a terminal, and on one
through `ssh -t`, left with the console's own Ctrl-]) and stop of the tiny
guest on the other host."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import HarnessError, rootfs
from tests.harness.hostpair import ADDRESSES, UNREACHABLE, HostPair
from tests.harness.install import build_deb, copy_guest, guest_toml
from tests.harness.testhost import TestHost
from tests.system.conftest import require_system

pytestmark = pytest.mark.system
REPO = Path(__file__).resolve().parents[2]

# Run inside a host: `kvmagent console -H OTHER NAME` on a terminal (a pty),
# a command typed, its answer read, then the console's own escape key.
ON_A_TERMINAL = r"""
import os, pty, select, sys, time
pid, fd = pty.fork()
if pid == 0:
    os.execvp("kvmagent", ["kvmagent", "console", "-H", sys.argv[1], sys.argv[2]])
seen, deadline, typed = b"", time.monotonic() + 40, 0
while time.monotonic() < deadline and b"pty-42" not in seen:
    if typed < time.monotonic() - 2:  # until the guest's shell answers
        os.write(fd, b"echo pty-$((6*7))\r")
        typed = time.monotonic()
    if select.select([fd], [], [], 0.2)[0]:
        try:
            seen += os.read(fd, 4096)
        except OSError:
            break
os.write(fd, b"\x1d")  # Ctrl-]: the console's escape, through ssh -e none
_, status = os.waitpid(pid, 0)
print(repr(seen[-300:]))
print("answered" if b"pty-42" in seen else "no answer", os.waitstatus_to_exitcode(status))
"""


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory,
         guest_image) -> Iterator[HostPair]:  # type: ignore[no-untyped-def]
    require_system()
    work = tmp_path_factory.mktemp("remote")
    try:
        deb = build_deb(work, release="bookworm")
        with HostPair(("bookworm", "trixie"), deb=deb, shared=work / "shared",
                      journal_dir=work / "journal") as hosts:
            for th in hosts:
                image = copy_guest(th, guest_image)
                th.write_file("/etc/kvmagent/guests/tiny.toml", guest_toml(image, nics=0))
                th.write_file(f"/etc/kvmagent/guests/only-{rootfs.RELEASES[th.release]}.toml",
                              guest_toml(image, nics=0))
            yield hosts
    except HarnessError as e:
        pytest.fail(str(e), pytrace=False)


def kvmagent(th: TestHost, *args: str, timeout: float = 90,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
    return th.exec(["kvmagent", *args], check=False, timeout=timeout, input=input)


def test_the_hosts_are_debian_12_and_13(pair: HostPair) -> None:
    assert [th.release for th in pair] == ["bookworm", "trixie"]
    for th in pair:
        assert "kvmagent" in th.exec(["dpkg-query", "-W", "kvmagent"]).stdout
        assert th.exec(["findmnt", "-n", "-o", "TARGET", "/srv/shared"]).stdout.strip()
    pair[0].exec(["sh", "-c", "echo from-0 > /srv/shared/marker"])
    assert pair[1].exec(["cat", "/srv/shared/marker"]).stdout == "from-0\n"


@pytest.mark.parametrize("me", [0, 1])
def test_list_across_hosts_and_one_unreachable(pair: HostPair, me: int) -> None:
    th = pair[me]
    t0 = time.monotonic()
    r = kvmagent(th, "list", "-H", "host0", "-H", ADDRESSES[1], "-H", UNREACHABLE)
    took = time.monotonic() - t0
    assert r.returncode == 255, r
    rows = [line.split()[:3] for line in r.stdout.splitlines()]
    assert rows[0] == ["HOST", "NAME", "STATE"]
    assert sorted(rows[1:]) == [["10.79.20.2", "only-13", "stopped"],
                                ["10.79.20.2", "tiny", "stopped"],
                                ["host0", "only-12", "stopped"],
                                ["host0", "tiny", "stopped"]]
    assert f"kvmagent: {UNREACHABLE}: cannot reach it over ssh (exit status 255): ssh: " \
        in r.stderr, r.stderr
    assert took < 15, f"an unreachable host held the listing up for {took:.1f} s"
    r = kvmagent(th, "list", "--json", "-H", "host1", "-H", "host0")
    assert r.returncode == 0 and r.stderr == ""
    found = {(g["host"], g["name"]) for g in json.loads(r.stdout)}
    assert found == {("host1", "tiny"), ("host1", "only-13"), ("host0", "tiny"),
                     ("host0", "only-12")}


@pytest.mark.parametrize("me", [0, 1])
def test_drive_a_guest_on_the_other_host(pair: HostPair, me: int) -> None:
    th, other, name = pair[me], f"host{1 - me}", "tiny"
    there = pair[1 - me]
    r = kvmagent(th, "-H", other, "start", name, timeout=180)
    assert r.returncode == 0, r
    assert there.exec(["systemctl", "is-active", f"kvm@{name}"], check=False
                      ).stdout.strip() == "active"
    r = kvmagent(th, "status", "-H", other, name, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "running", r
    # the console without a terminal: stdin typed, output printed for --timeout seconds
    out = ""
    for _ in range(20):  # until the guest's shell is up
        out = kvmagent(th, "console", "-H", other, name, "--timeout", "2",
                       input="echo hi-$((6*7))\n").stdout
        if "hi-42" in out:
            break
    assert "hi-42" in out
    # on a terminal: ssh -t, and Ctrl-] leaves the console (ssh's own escapes are off)
    r = th.exec(["python3", "-c", ON_A_TERMINAL, other, name], check=False, timeout=90)
    assert r.stdout.splitlines()[-1] == "answered 0", r
    r = kvmagent(th, "-H", other, "stop", name, timeout=180)
    assert r.returncode == 0, r
    r = kvmagent(th, "-H", other, "status", name)
    assert there.exec(["systemctl", "is-active", f"kvm@{name}"], check=False
                      ).stdout.strip() == "inactive"
    assert r.returncode == 0 and "stopped" in r.stdout, r
    r = kvmagent(th, "-H", other, "stop", "nosuchguest")  # the remote's own exit status
    assert r.returncode == 8 and "unknown guest 'nosuchguest'" in r.stderr, r


def test_refused_on_a_real_host(pair: HostPair) -> None:
    r = kvmagent(pair[0], "-H", "host1", "start", "--transient", "/etc/kvmagent/guests/tiny.toml")
    assert r.returncode == 2 and "a file named here" in r.stderr
    r = kvmagent(pair[0], "-H", "host1", "-H", "host0", "status", "tiny")
    assert r.returncode == 2
    r = kvmagent(pair[0], "-H", UNREACHABLE, "status", "tiny")
    assert r.returncode == 255 and f"kvmagent: {UNREACHABLE}: ssh could not reach it" in r.stderr
