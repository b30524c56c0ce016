"""The control commands through the command line on the real test host:
`kvmagent restart` on each of its three paths (a guest of the kvm@.service
template, kvm@NAME.service made without the template, a one-off guest),
`--no-block` for start, stop and restart with its "queued" answer, `status
-n/--lines` with the journal lines and the console socket it prints, and
exit status 4 (insufficient privileges) for the commands that need root."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from tests.harness import TestHost
from tests.harness.install import define_guest, guest_toml, install_checkout
from tests.system.test_kvm_service import show, wait_for, wait_state
from tests.system.test_transient import set_template

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def host(testhost: TestHost, image) -> Iterator[TestHost]:  # type: ignore[no-untyped-def]
    install_checkout(testhost)
    yield testhost
    set_template(testhost, True)


def invocation(th: TestHost, unit: str) -> str:
    return show(th, unit, "InvocationID")["InvocationID"]


def wait_new_run(th: TestHost, unit: str, before: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while invocation(th, unit) in ("", before):
        assert time.monotonic() < deadline, f"{unit}: no new run ({before})"
        time.sleep(0.3)
    wait_state(th, unit, ("active",), timeout=timeout)


def kvmagent(th: TestHost, *args: str, **kw) -> str:  # type: ignore[no-untyped-def]
    r = th.run(["kvmagent", *args], timeout=240, check=False, **kw)
    assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.returncode, r.stderr)
    return r.stdout


def test_restart_and_no_block_with_the_template(host: TestHost, image) -> None:  # type: ignore[no-untyped-def]
    unit = "kvm@rt.service"
    define_guest(host, "rt", guest_toml(image, nics=0))
    assert kvmagent(host, "start", "rt") == f"{unit}: started\n"
    wait_for(host, unit, "GUEST-READY")
    first = invocation(host, unit)
    assert kvmagent(host, "restart", "rt") == f"{unit}: restarted\n"
    assert invocation(host, unit) != first and show(host, unit, "ActiveState")["ActiveState"] \
        == "active"
    assert show(host, unit, "FragmentPath")["FragmentPath"] == "/etc/systemd/system/kvm@.service"
    second = invocation(host, unit)
    # --no-block: the job is queued, the command returns; the job then runs
    assert kvmagent(host, "restart", "rt", "--no-block") == f"{unit}: restart queued\n"
    wait_new_run(host, unit, second)
    assert kvmagent(host, "stop", "rt", "--no-block") == f"{unit}: stop queued\n"
    wait_state(host, unit, ("inactive",), timeout=120)
    assert kvmagent(host, "start", "rt", "--no-block") == f"{unit}: start queued\n"
    wait_state(host, unit, ("active",), timeout=120)
    assert kvmagent(host, "stop", "rt") == f"{unit}: stopped\n"


def test_restart_without_the_template(host: TestHost, image) -> None:  # type: ignore[no-untyped-def]
    unit = "kvm@rtl.service"
    set_template(host, False)
    try:
        define_guest(host, "rtl", guest_toml(image, nics=0))
        # not running: restart makes and starts the transient service
        assert kvmagent(host, "restart", "rtl") == f"{unit}: restarted\n"
        assert show(host, unit, "Transient")["Transient"] == "yes"
        first = invocation(host, unit)
        # running: the same transient unit, restarted
        assert kvmagent(host, "restart", "rtl") == f"{unit}: restarted\n"
        assert invocation(host, unit) != first
        assert show(host, unit, "Transient", "ActiveState") == {"Transient": "yes",
                                                                "ActiveState": "active"}
        assert kvmagent(host, "stop", "rtl") == f"{unit}: stopped\n"
    finally:
        set_template(host, True)


def test_restart_a_one_off_guest(host: TestHost, image) -> None:  # type: ignore[no-untyped-def]
    unit = "kvm-oneoff@rto.service"
    host.write_file("/root/rto.toml", guest_toml(image, nics=0))
    out = kvmagent(host, "start", "--transient", "/root/rto.toml")
    assert out == f"{unit}: started\n", out
    first = invocation(host, unit)
    assert kvmagent(host, "restart", "rto") == f"{unit}: restarted\n"
    assert invocation(host, unit) != first
    assert show(host, unit, "ActiveState")["ActiveState"] == "active"
    assert show(host, "kvm@rto.service", "LoadState")["LoadState"] != "loaded" or \
        show(host, "kvm@rto.service", "ActiveState")["ActiveState"] == "inactive"
    kvmagent(host, "stop", "rto")
    wait_state(host, unit, ("inactive",), timeout=120)


def test_status_prints_journal_lines_and_the_console_socket(host: TestHost, image) -> None:  # type: ignore[no-untyped-def]
    unit = "kvm@st.service"
    define_guest(host, "st", guest_toml(image, nics=0))
    kvmagent(host, "start", "st")
    wait_for(host, unit, "GUEST-READY")
    try:
        def newest() -> str:
            return str(host.exec(["journalctl", "-u", unit, "-n", "1", "-o", "cat",
                                  "--no-pager"]).stdout.strip())

        for args, n in ((["-n", "3"], 3), (["--lines", "1"], 1), ([], 10)):
            # the guest may still be writing (its prompt comes a moment after
            # GUEST-READY): compare with a journal that did not change meanwhile
            for _ in range(20):
                last = newest()
                out = kvmagent(host, "status", "st", *args)
                if newest() == last:
                    break
                time.sleep(0.5)
            head, sep, tail = out.partition("\n\n")
            assert sep, out
            assert "   Console: /run/kvmagent/st/console.sock (kvmagent console st)" in head, head
            assert host.exec(["test", "-S", "/run/kvmagent/st/console.sock"]).returncode == 0
            lines = tail.rstrip("\n").splitlines()
            assert len(lines) == n, (args, lines)
            # the guest's last journal lines, the newest last
            assert lines[-1].rstrip().endswith(last), (lines[-1], last)
        out = kvmagent(host, "status", "st", "-n", "0")
        assert "\n\n" not in out.rstrip("\n")
    finally:
        kvmagent(host, "stop", "st")


@pytest.mark.parametrize("args", [
    ["start", "np"], ["stop", "np"], ["restart", "np"], ["start", "np", "--no-block"],
    ["stop", "np", "--force"], ["console", "np"], ["reset-counters", "np"],
    ["bridge", "ensure", "br-np"],
])
def test_commands_that_need_root_exit_4_for_a_user(host: TestHost, image, args) -> None:  # type: ignore[no-untyped-def]
    define_guest(host, "np", guest_toml(image, nics=0))
    if args[0] in ("stop", "console"):
        kvmagent(host, "start", "np")  # something to be refused
    try:
        r = host.run(["kvmagent", *args], timeout=120, check=False, props=["User=nobody"],
                     input="")
        assert r.returncode == 4, (r.returncode, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.startswith("kvmagent: "), r.stderr
        assert re.search(r"root|permission|denied|not permitted", r.stderr, re.I), r.stderr
    finally:
        host.exec(["systemctl", "stop", "kvm@np"], timeout=120, check=False)
