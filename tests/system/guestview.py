"""One guest as the tests of two hosts see it (live migration, the
cluster): its console in a host's journal, its unit's state there, QEMU
processes, whether it answers on its console, whether its kernel has said
anything of a fault; and what each of those hosts needs installed."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable

from tests.harness.install import APT_ENV, OFFLINE_APT, RUNTIME_DEPENDS, offline_apt
from tests.harness.testhost import TestHost

# A guest kernel's fault on its console (guest memory that a move lost or
# garbled shows as one)
OOPS = re.compile(r"\b(BUG|Oops|Kernel panic)\b|list_(add|del) corruption|general protection")


def install(th: TestHost) -> None:
    """The package's dependencies from the offline archive, and br-kvm."""
    offline_apt(th)
    th.run(["apt-get", *OFFLINE_APT, "install", "-y", "-q", "--no-install-recommends",
            *RUNTIME_DEPENDS], env=APT_ENV, timeout=600)
    th.run(["kvmagent", "bridge", "ensure", "br-kvm"])


def wait(predicate: Callable[[], object], timeout: float, what: str) -> float:
    """Until PREDICATE holds; how long that took."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.3)
    return time.monotonic() - t0


def qemus(th: TestHost) -> list[str]:
    return th.exec(["pgrep", "-f", "qemu-system-x86_64"], check=False).stdout.split()


def state(th: TestHost, unit: str) -> tuple[str, str]:
    """UNIT's ActiveState and Result there."""
    out = th.exec(["systemctl", "show", unit, "--property=ActiveState,Result"]).stdout
    props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return props.get("ActiveState", "?"), props.get("Result", "?")


class Guest:
    """Guest NAME on whichever test host is asked."""

    def __init__(self, name: str) -> None:
        self.name, self.unit = name, f"kvm@{name}.service"

    def console(self, th: TestHost) -> str:
        """Its serial console as that host's journal has it."""
        return str(th.exec(["journalctl", f"GUEST={self.name}",
                            f"SYSLOG_IDENTIFIER={self.name}-console", "-o", "cat",
                            "--no-pager"], check=False).stdout)

    def state(self, th: TestHost, unit: str | None = None) -> tuple[str, str]:
        return state(th, unit or self.unit)

    def typed(self, th: TestHost, line: str, timeout: int = 1) -> None:
        """LINE typed on its console there."""
        th.exec(["kvmagent", "console", self.name, "--timeout", str(timeout)], input=line,
                check=False, timeout=60)

    def answers(self, th: TestHost, tag: str, timeout: int = 1) -> bool:
        """`echo typed-TAG` typed there comes back in the console's journal."""
        marker = f"typed-{tag}"
        for _ in range(15):
            self.typed(th, f"echo {marker}\n", timeout)
            if re.search(rf"^{marker}\r?$", self.console(th), re.M):
                return True
        return False

    def disk_sum(self, th: TestHost, tag: str, timeout: int = 2) -> str:
        """Its sha256 of its whole first disk (/dev/vda), read from the
        disk (its page cache dropped first), as it says on its console."""
        pattern = re.compile(rf"^sum-{tag} ([0-9a-f]{{64}})", re.M)
        for _ in range(3):
            self.typed(th, f"sync; echo 3 > /proc/sys/vm/drop_caches; "
                       f"echo sum-{tag} $(sha256sum < /dev/vda)\n", timeout)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if m := pattern.search(self.console(th)):
                    return m.group(1)
                time.sleep(0.5)
        raise AssertionError(f"guest {self.name} on {th.name} did not say its disk's sum: "
                             f"{self.console(th)[-2000:]}")

    def busy(self, th: TestHost, tag: str, command: str, timeout: int = 2) -> int:
        """COMMAND started in the background there, and its pid once the
        guest says it still runs a second later (a line typed on the
        console and a move started at once may race the guest's shell)."""
        pattern = re.compile(rf"^busy-{tag} (\d+)\r?$", re.M)
        for _ in range(3):
            self.typed(th, f"{command} & sleep 1; kill -0 $! && echo busy-{tag} $!\n", timeout)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if m := pattern.search(self.console(th)):
                    return int(m.group(1))
                time.sleep(0.5)
        raise AssertionError(f"guest {self.name} on {th.name} did not start {command!r}: "
                             f"{self.console(th)[-2000:]}")

    def booted(self, th: TestHost) -> None:
        """Started there if need be, and up to its shell."""
        if self.state(th)[0] != "active":
            th.exec(["systemctl", "start", self.unit], timeout=180)
        wait(lambda: "GUEST-READY" in self.console(th), 120, f"the guest booted on {th.name}")

    def runs_on(self, th: TestHost) -> None:
        """It runs there, in one QEMU, and its kernel has said nothing of a fault."""
        faults = [line for line in self.console(th).splitlines() if OOPS.search(line)]
        assert not faults, f"the guest's kernel on {th.name}:\n" + "\n".join(faults[:30])
        assert self.state(th) == ("active", "success"), self.state(th)
        status = json.loads(th.exec(["kvmagent", "status", self.name, "--json"]).stdout)
        assert status["state"] == "running", status
        assert len(qemus(th)) == 1
