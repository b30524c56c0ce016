"""What `kvmagent migrate` shows a person at a terminal, and a `cpu = "host"`
guest's move, between two real Debian 12 test hosts (the pair of
tests/system/test_migrate.py, its tiny guest on the shared storage).

The progress line: the command runs on a pseudo-terminal (Python's pty, as
an ssh session or a console gives one), slowed with --bandwidth so that
QEMU's figures are there to show: one line rewritten in place (carriage
return and erase to the end of the line) with RAM sent and left, the rate,
the dirty-page rate and the expected downtime, then a line of its own with
the measured downtime.

`cpu = "host"` (host passthrough under KVM, `-cpu max` under TCG here): the
guest's CPU is its host's, which the other host's may not be, so migrate
refuses it before anything moves (exit 1, nothing started there) unless
--force says both hosts have the same CPU; forced, it moves and runs on."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from tests.harness.hostpair import HostPair
from tests.harness.testhost import TestHost
from tests.system.test_migrate import NAME, UNIT, console, hosts, qemus, state, wait

pytestmark = pytest.mark.system
PTY = ("import os, pty, sys\n"
       "status = pty.spawn(sys.argv[1:])\n"
       "sys.exit(os.waitstatus_to_exitcode(status))\n")
ERASE = "\r\x1b[K"  # what rewrites the progress line in place


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory,
         guest_image) -> Iterator[HostPair]:  # type: ignore[no-untyped-def]
    yield from hosts(tmp_path_factory, guest_image, ("bookworm", "bookworm"))


def on_a_terminal(th: TestHost, argv: list[str]) -> tuple[int, str]:
    r = th.exec(["python3", "-c", PTY, *argv], check=False, timeout=300, text=False)
    return r.returncode, r.stdout.decode()  # bytes: a carriage return kept as it came


def test_progress_line_on_a_terminal(pair: HostPair) -> None:
    a, b = pair
    a.exec(["systemctl", "start", UNIT], timeout=180)
    wait(lambda: "GUEST-READY" in console(a), 120, "the guest booted on host 0")
    rc, out = on_a_terminal(a, ["kvmagent", "migrate", NAME, "host1", "--bandwidth", "8M"])
    print(f"\nwhat the terminal got:\n{out!r}")
    assert rc == 0, (out, b.journal(UNIT)[-3000:])
    # first, on stderr: Debian 12's QEMU 7.2, the guest under TCG
    tcg = f"kvmagent: warning: guest {NAME} runs without KVM (TCG) on QEMU 7.2."
    assert out.startswith(tcg), out
    out = out.split("\r\n", 1)[1]
    assert out.startswith(f"{ERASE}migrating guest {NAME} to host1\r\n"), out
    progress = [p for p in out.split(ERASE) if p.startswith("active, ")]
    assert len(progress) >= 2, out  # rewritten in place, more than once
    line = progress[-1]
    assert "\n" not in line, line  # a progress line ends no line of its own
    assert re.fullmatch(r"active, RAM [\d.]+ \w+ sent, [\d.]+ \w+ left, [\d.]+ Mbit/s, "
                        r"(\d+ dirty pages/s, )?expected downtime \d+ ms, [\d.]+ s", line), line
    done = out.split(ERASE)[-1]
    assert re.fullmatch(rf"guest {NAME} migrated to host1: downtime \d+ ms.*\r\n", done,
                        re.S), done
    assert state(a)[0] == "inactive" and state(b) == ("active", "success")
    b.exec(["systemctl", "stop", UNIT], timeout=120)


def test_cpu_host_needs_force(pair: HostPair) -> None:
    a, b = pair
    toml = a.exec(["cat", f"/etc/kvmagent/guests/{NAME}.toml"]).stdout
    for th in pair:
        th.write_file("/etc/kvmagent/guests/hcpu.toml",
                      'cpu = "host"\n' + toml.split("[[disk]]")[0])
    a.exec(["systemctl", "start", "kvm@hcpu.service"], timeout=180)
    argv = a.exec(["cat", "/proc/" + qemus(a)[0] + "/cmdline"]).stdout.split("\0")
    assert argv[argv.index("-cpu") + 1] == "max", argv  # TCG: host passthrough is max
    r = a.exec(["kvmagent", "migrate", "hcpu", "host1"], check=False, timeout=120)
    assert r.returncode == 1, r
    assert "guest hcpu runs with -cpu max" in r.stderr and "--force" in r.stderr, r.stderr
    assert state(a, "kvm@hcpu.service") == ("active", "success")
    assert state(b, "kvm@hcpu.service")[0] == "inactive" and qemus(b) == []
    r = a.exec(["kvmagent", "migrate", "hcpu", "host1", "--force", "--json"], check=False,
               timeout=300)
    assert r.returncode == 0, (r.stdout, r.stderr, b.journal("kvm@hcpu.service")[-3000:])
    assert json.loads(r.stdout.splitlines()[-1])["event"] == "migrated", r.stdout
    assert state(a, "kvm@hcpu.service")[0] == "inactive" and qemus(a) == []
    assert state(b, "kvm@hcpu.service") == ("active", "success")
    b.exec(["systemctl", "stop", "kvm@hcpu.service"], timeout=120)
