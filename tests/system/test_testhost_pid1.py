"""The harness on a host where systemd IS PID 1 (a normal Debian 12 server),
which this machine is not: run it inside a test host, where systemd is PID 1,
and boot a test host there (nspawn started in its own delegated scope via
`systemd-run --scope`, harness notes section 8)."""

from __future__ import annotations

import pytest

from tests.harness import TestHost

pytestmark = pytest.mark.system

INNER = """
import sys
sys.path.insert(0, "/src/kvmagent")
from pathlib import Path
from tests.harness import TestHost
from tests.harness.sysutil import systemd_is_pid1
print("PID1", systemd_is_pid1())
with TestHost(root="host", src=Path("/src/kvmagent")) as th:
    print("STATE", th.run(["systemctl", "is-system-running"], check=False).stdout.strip())
    print("UNIT", th.run(["cat", "/proc/self/cgroup"]).stdout.splitlines()[-1])
print("TORN-DOWN")
"""


def test_harness_where_systemd_is_pid1(testhost: TestHost) -> None:
    r = testhost.run(["/usr/bin/python3", "-c", INNER], timeout=240)
    lines = r.stdout.splitlines()
    assert "PID1 True" in lines, r.stdout
    assert any(line in ("STATE running", "STATE degraded") for line in lines), r.stdout
    assert any(line.startswith("UNIT 0::/system.slice/run-") for line in lines), r.stdout
    assert lines[-1] == "TORN-DOWN"
    scopes = testhost.exec(["systemctl", "list-units", "--all", "--no-legend",
                            "kvmagent-test-*"]).stdout
    assert scopes.strip() == "", scopes  # the inner host's scope is gone too
