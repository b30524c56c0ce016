"""A test host of a release's root set up for a benchmark of the checkout
(bound read-only at /src/kvmagent): its Python's bytecode of kvmagent
compiled once, as the package's install does (py3compile), so that no
command measured compiles it again.  Debian 13's Python (3.13) cannot
write the checkout's __pycache__: the bytecode goes to PYCACHE, given to
systemd's manager (every unit it starts: kvm@.service, ExecStopPost=) and
to the commands the benchmark runs (ENV)."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from tests.harness import TestHost

PYCACHE = "/var/cache/kvmagent-bench-pycache"
ENV = {"PYTHONPYCACHEPREFIX": PYCACHE}


def compile_checkout(th: TestHost) -> None:
    th.exec(["systemctl", "set-environment", f"PYTHONPYCACHEPREFIX={PYCACHE}"])
    th.run(["/usr/bin/python3", "-m", "compileall", "-q", "/src/kvmagent/kvmagent",
            "/src/kvmagent/bench"], env=ENV)
