"""kvm@NAME.service on a real systemd host (the nspawn test host) with the
tiny real guest under TCG: start, ACPI stop, crash restart, watchdog, bad
config, machined, the QEMU scope.  The test host sets cgroup limits but
does not enforce them (harness notes, section 8): properties and placement
are asserted, not enforcement."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator

import pytest

from tests.harness import TestHost
from tests.harness.install import define_guest, guest_toml, install_checkout

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def host(testhost: TestHost, image) -> Iterator[TestHost]:
    install_checkout(testhost)
    testhost.run(["kvmagent", "bridge", "ensure", "br-kvm", "--address", "10.77.0.1/24"])
    yield testhost


def show(th: TestHost, unit: str, *props: str) -> dict[str, str]:
    out = th.exec(["systemctl", "show", unit, *(f"--property={p}" for p in props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_for(th: TestHost, unit: str, pattern: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = th.journal(unit)
        if re.search(pattern, text):
            return text
        time.sleep(0.5)
    raise AssertionError(f"{pattern!r} not in the journal of {unit} within {timeout} s:\n"
                         + th.journal(unit)[-4000:])


def wait_state(th: TestHost, unit: str, states: tuple[str, ...], timeout: float = 60) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        s = show(th, unit, "ActiveState", "SubState", "Result", "NRestarts", "MainPID",
                 "ExecMainStatus")
        if s["ActiveState"] in states or time.monotonic() > deadline:
            assert s["ActiveState"] in states, (s, th.journal(unit)[-3000:])
            return s
        time.sleep(0.2)


def wait_restarts(th: TestHost, unit: str, n: int, timeout: float = 60) -> dict[str, str]:
    """Wait until systemd has restarted UNIT N times and it is active again.
    The supervisor logs QEMU's death before it exits, so "active" alone may
    still be the unit's first run."""
    deadline = time.monotonic() + timeout
    while show(th, unit, "NRestarts")["NRestarts"] != str(n):
        assert time.monotonic() < deadline, th.journal(unit)[-3000:]
        time.sleep(0.3)
    return wait_state(th, unit, ("active",))


def qemu_pid(th: TestHost, name: str) -> int:
    pids = th.exec(["systemctl", "show", f"kvm-{name}.scope", "--property=ControlGroup",
                    "--value"]).stdout.strip()
    out = th.exec(["cat", f"/sys/fs/cgroup/unified{pids}/cgroup.procs"], check=False).stdout
    if not out.strip():
        out = th.exec(["cat", f"/sys/fs/cgroup/systemd{pids}/cgroup.procs"]).stdout
    (pid,) = out.split()
    return int(pid)


def test_start_runs_guest_in_its_scope_and_registers_it(host: TestHost, image) -> None:
    define_guest(host, "alpha", guest_toml(
        image, cmdline="guest.ip=10.77.0.2/24 guest.ping=10.77.0.1",
        extra="[resources]\ncpu_weight = 50\n"))
    t0 = time.monotonic()
    host.exec(["systemctl", "start", "kvm@alpha"], timeout=120)
    started = time.monotonic() - t0
    s = wait_state(host, "kvm@alpha.service", ("active",))
    journal = wait_for(host, "kvm@alpha.service", r"GUEST-PING-OK 10\.77\.0\.1")
    assert "guest alpha running, QEMU pid" in journal
    pid = qemu_pid(host, "alpha")
    cgroup = host.exec(["cat", f"/proc/{pid}/cgroup"]).stdout
    assert "/machine.slice/kvm-alpha.scope" in cgroup
    # the supervisor: in the guest's service, in machine.slice (Slice= of the template)
    sup = show(host, "kvm@alpha.service", "Slice", "ControlGroup")
    assert sup == {"Slice": "machine.slice", "ControlGroup": "/machine.slice/kvm@alpha.service"}
    sup_cgroup = host.exec(["cat", f"/proc/{s['MainPID']}/cgroup"]).stdout
    assert "0::/machine.slice/kvm@alpha.service\n" in sup_cgroup, sup_cgroup
    scope = show(host, "kvm-alpha.scope", "MemoryMax", "CPUWeight", "BindsTo", "PartOf", "Before", "Slice",
                 "DevicePolicy", "DeviceAllow")
    assert scope["DevicePolicy"] == "closed" and scope["DeviceAllow"] == "/dev/kvm rw"
    assert scope["MemoryMax"] == str((256 + 256) << 20)
    assert scope["CPUWeight"] == "50" and scope["Slice"] == "machine.slice"
    assert scope["BindsTo"] == "" and scope["PartOf"] == "kvm@alpha.service"
    assert "kvm@alpha.service" in scope["Before"]
    machines = host.exec(["machinectl", "list", "--no-legend"]).stdout
    assert re.search(r"^alpha\s+vm\s+kvmagent", machines, re.M), machines
    unit = host.exec(["machinectl", "show", "alpha", "--property=Unit", "--value"]).stdout
    assert unit.strip() == "kvm-alpha.scope"
    ports = host.run(["kvmagent", "bridge", "show"]).stdout
    assert re.search(r"kvm-alpha-0\s+guest alpha", ports), ports
    print(f"systemctl start kvm@alpha returned after {started:.2f} s")


def test_stop_powers_the_guest_off_over_acpi(host: TestHost) -> None:
    wait_for(host, "kvm@alpha.service", r"GUEST-READY")
    host.exec(["systemctl", "stop", "kvm@alpha"], timeout=120)
    s = show(host, "kvm@alpha.service", "ActiveState", "Result")
    assert s == {"ActiveState": "inactive", "Result": "success"}
    journal = host.journal("kvm@alpha.service")
    assert "ACPI power button pressed" in journal and "GUEST-POWEROFF" in journal
    assert "did not power off" not in journal
    assert show(host, "kvm-alpha.scope", "ActiveState")["ActiveState"] == "inactive"
    assert "alpha" not in host.exec(["machinectl", "list", "--no-legend"]).stdout
    assert "kvm-alpha-0" not in host.exec(["ip", "-o", "link"]).stdout


def test_qemu_killed_is_restarted_and_counted(host: TestHost, image) -> None:
    define_guest(host, "beta", guest_toml(image, nics=0))
    host.exec(["systemctl", "start", "kvm@beta"], timeout=120)
    wait_for(host, "kvm@beta.service", r"GUEST-READY")
    first = qemu_pid(host, "beta")
    host.exec(["kill", "-9", str(first)])
    wait_restarts(host, "kvm@beta.service", 1)
    assert qemu_pid(host, "beta") != first
    assert "was killed by signal 9" in host.journal("kvm@beta.service")
    host.exec(["systemctl", "stop", "kvm@beta"], timeout=120)


def test_hung_qemu_is_caught_by_the_watchdog(host: TestHost, image) -> None:
    define_guest(host, "gamma", guest_toml(image, nics=0), "[Service]\nWatchdogSec=3s\n")
    host.exec(["systemctl", "start", "kvm@gamma"], timeout=120)
    wait_for(host, "kvm@gamma.service", r"GUEST-READY")
    host.exec(["kill", "-STOP", str(qemu_pid(host, "gamma"))])
    deadline = time.monotonic() + 60
    while show(host, "kvm@gamma.service", "NRestarts")["NRestarts"] != "1":
        assert time.monotonic() < deadline, host.journal("kvm@gamma.service")[-3000:]
        time.sleep(0.3)
    # systemd's words, not the supervisor's own ("no watchdog ping"), and the
    # reason kvmagent recorded for the run
    journal = host.journal("kvm@gamma.service")
    assert re.search(r"kvm@gamma\.service: Watchdog timeout \(limit 3s\)", journal), journal[-3000:]
    assert "kvm@gamma.service: Failed with result 'watchdog'" in journal, journal[-3000:]
    wait_state(host, "kvm@gamma.service", ("active",))
    history = json.loads(host.run(["kvmagent", "history", "gamma", "--json"]).stdout)
    assert history["last_failure"]["reason"] == "watchdog", history
    assert history["restarts"] == 1, history
    host.exec(["systemctl", "stop", "kvm@gamma"], timeout=120)


def test_bad_config_fails_once_and_is_not_restarted(host: TestHost, image) -> None:
    define_guest(host, "delta", guest_toml(image, nics=0, top='cpus = "two"'))
    host.exec(["systemctl", "start", "kvm@delta"], check=False, timeout=60)
    time.sleep(3)  # RestartSec=2s: a restart would have happened by now
    s = show(host, "kvm@delta.service", "ActiveState", "Result", "NRestarts", "ExecMainStatus")
    assert s == {"ActiveState": "failed", "Result": "exit-code", "NRestarts": "0",
                 "ExecMainStatus": "6"}
    assert 'delta.toml: cpus = "two": expected an integer' in host.journal("kvm@delta.service")
    assert show(host, "kvm-delta.scope", "ActiveState")["ActiveState"] == "inactive"


def test_a_machine_type_this_qemu_lacks_fails_at_once(host: TestHost, image) -> None:
    """QEMU 7.2 and 10.0 have no "pc-1.0": a host error (exit 5) naming the
    file, key and value, at once (device_timeout is not waited for), with
    no QEMU started and no tap left; the answer QEMU gave is cached in the
    state directory, which the service's sandbox can write."""
    host.write_file("/etc/kvmagent/kvmagent.toml", 'accel = "tcg"\ndevice_timeout = "60s"\n')
    try:
        define_guest(host, "kappa", guest_toml(image, nics=1, top='machine = "pc-1.0"'))
        t0 = time.monotonic()
        host.exec(["systemctl", "start", "kvm@kappa"], check=False, timeout=60)
        assert time.monotonic() - t0 < 30
        # exit 5 is a failure systemd restarts at once (a host may get what it
        # lacks); StartLimitBurst= ends that
        deadline = time.monotonic() + 30
        while (s := show(host, "kvm@kappa.service", "ActiveState", "SubState", "ExecMainStatus",
                         "NRestarts"))["ActiveState"] != "failed":
            assert time.monotonic() < deadline, s
            time.sleep(0.3)
        assert s["ExecMainStatus"] == "5" and s["NRestarts"] == "5", s  # the 6th start refused
        host.exec(["systemctl", "stop", "kvm@kappa"], check=False, timeout=60)
        journal = host.journal("kvm@kappa.service")
        assert re.search(r'kappa\.toml: machine = "pc-1\.0": QEMU \d+\.\d+\.\d+ \(/usr/bin/'
                         r'qemu-system-x86_64, .*\) has no such machine type', journal), journal
        assert "waits up to" not in journal
        assert show(host, "kvm-kappa.scope", "ActiveState")["ActiveState"] == "inactive"
        assert host.exec(["ip", "link", "show", "kvm-kappa-0"], check=False).returncode != 0
        assert host.exec(["sh", "-c", "ls /var/lib/kvmagent/qemu-caps-*.json"]).stdout.strip()
        r = host.run(["kvmagent", "validate", "--host", "kappa"], check=False, timeout=60)
        assert r.returncode == 5 and 'machine = "pc-1.0"' in r.stderr
    finally:
        host.write_file("/etc/kvmagent/kvmagent.toml", 'accel = "tcg"\n')


def test_unknown_guest_is_not_restarted(host: TestHost) -> None:
    host.exec(["systemctl", "start", "kvm@nosuch"], check=False, timeout=60)
    time.sleep(3)
    s = show(host, "kvm@nosuch.service", "ActiveState", "NRestarts", "ExecMainStatus")
    assert s == {"ActiveState": "failed", "NRestarts": "0", "ExecMainStatus": "8"}


def test_kvmagent_start_and_stop(host: TestHost, image) -> None:
    define_guest(host, "eps", guest_toml(image, nics=0))
    r = host.run(["kvmagent", "start", "eps"], timeout=120)
    assert r.stdout == "kvm@eps.service: started\n"
    assert show(host, "kvm@eps.service", "ActiveState")["ActiveState"] == "active"
    wait_for(host, "kvm@eps.service", r"GUEST-READY")
    r = host.run(["kvmagent", "stop", "eps"], timeout=120)
    assert r.stdout == "kvm@eps.service: stopped\n"
    assert "GUEST-POWEROFF" in host.journal("kvm@eps.service")


def test_kvmagent_start_refuses_bad_config_without_touching_systemd(host: TestHost, image) -> None:
    define_guest(host, "zeta", guest_toml(image, nics=0, extra="[stop]\ntimeout = \"soon\"\n"))
    r = host.run(["kvmagent", "start", "zeta"], check=False, timeout=60)
    assert r.returncode == 6
    assert 'zeta.toml: stop.timeout = "soon": expected a duration' in r.stderr
    s = show(host, "kvm@zeta.service", "ActiveState", "InvocationID")
    assert s["ActiveState"] == "inactive" and s["InvocationID"] == ""
    r = host.run(["kvmagent", "start", "nosuch"], check=False, timeout=60)
    assert r.returncode == 8


HOSTILE = {  # guest file -> what the refusal names (issue: hostile input)
    'memory = "-1G"\n': 'memory = "-1G"',
    'description = "a\\nb"\n': "description",
    '[[nic]]\nmac = "52:54:00:00:00:01,id=x"\n': "nic[0].mac",
    'cpus = 10000\n[[nic]]\n': "cpus = 10000",
    'a = 1\na = 2\n': "a",
}


# rows of a guest in the state database (none if there is no database)
STATE_ROWS = ("import os, sqlite3, sys; db = '/var/lib/kvmagent/state.db'; "
              "print(sqlite3.connect(db).execute('SELECT count(*) FROM events WHERE guest = ?', "
              "(sys.argv[1],)).fetchone()[0] if os.path.exists(db) else 0)")


@pytest.mark.parametrize("toml", list(HOSTILE))
def test_refused_input_leaves_nothing_behind(host: TestHost, image, toml: str) -> None:
    """kvmagent start with hostile input: exit 6, and no unit, no tap, no
    socket, no runtime directory, no state row for the guest."""
    define_guest(host, "omega", toml)
    before = host.exec(["ip", "-o", "link"]).stdout
    r = host.run(["kvmagent", "start", "omega"], check=False, timeout=60)
    assert r.returncode == 6 and HOSTILE[toml] in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert show(host, "kvm@omega.service", "InvocationID")["InvocationID"] == ""
    assert host.exec(["ip", "-o", "link"]).stdout == before
    assert host.exec(["test", "-e", "/run/kvmagent/omega"], check=False).returncode == 1
    rows = host.exec(["/usr/bin/python3", "-c", STATE_ROWS, "omega"]).stdout
    assert rows == "0\n", rows


def test_kvmagent_stop_force_pulls_the_cord(host: TestHost, image) -> None:
    define_guest(host, "eta", guest_toml(image, nics=0))
    host.run(["kvmagent", "start", "eta"], timeout=120)
    wait_for(host, "kvm@eta.service", r"GUEST-READY")
    assert host.exec(["cat", "/run/kvmagent/eta/supervisor.pid"]).stdout.split() == \
        [show(host, "kvm@eta.service", "MainPID")["MainPID"], str(qemu_pid(host, "eta"))]
    # the fast way: SIGUSR1 to the supervisor found by its pid file
    r = host.run(["kvmagent", "stop", "--force", "eta"], timeout=60)
    assert r.stdout == "kvm@eta.service: stopped (QEMU killed)\n"
    s = wait_state(host, "kvm@eta.service", ("inactive", "failed"))
    assert (s["ActiveState"], s["Result"], s["NRestarts"]) == ("inactive", "success", "0")
    journal = host.journal("kvm@eta.service")
    assert "without ACPI (stop --force)" in journal and "GUEST-POWEROFF" not in journal
    # stop --force, then start at once: the guest really starts again (the
    # command returned only once the supervisor was gone, not just QEMU)
    first = show(host, "kvm@eta.service", "InvocationID")["InvocationID"]
    host.run(["kvmagent", "start", "eta"], timeout=120)
    host.run(["kvmagent", "stop", "--force", "eta"], timeout=60)
    host.run(["kvmagent", "start", "eta"], timeout=120)
    s = show(host, "kvm@eta.service", "ActiveState", "InvocationID", "MainPID")
    assert s["ActiveState"] == "active" and s["InvocationID"] != first, s
    assert qemu_pid(host, "eta") > 0
    # without the pid file: the same signal through systemd, then the stop job
    host.exec(["rm", "/run/kvmagent/eta/supervisor.pid"])
    # and with its configuration gone bad meanwhile: stopping needs none
    define_guest(host, "eta", 'cpus = "two"\n')
    r = host.run(["kvmagent", "stop", "--force", "eta"], timeout=60)
    assert r.stdout == "kvm@eta.service: stopped\n"
    s = show(host, "kvm@eta.service", "ActiveState", "Result", "NRestarts")
    assert s == {"ActiveState": "inactive", "Result": "success", "NRestarts": "0"}
    assert host.journal("kvm@eta.service").count("without ACPI (stop --force)") == 3


def test_stop_force_while_the_guest_waits_for_its_bridge(host: TestHost, image) -> None:
    """The power cord pulled during the start: the unit ends at once,
    successfully, and systemd does not start it again."""
    host.write_file("/etc/kvmagent/kvmagent.toml", 'accel = "tcg"\ndevice_timeout = "60s"\n')
    try:
        define_guest(host, "theta", guest_toml(image, nics=1, extra='bridge = "br-late"\n'))
        host.exec(["systemctl", "start", "--no-block", "kvm@theta"])
        wait_for(host, "kvm@theta.service", r"waits up to 60 s for: .*br-late")
        t0 = time.monotonic()
        host.run(["kvmagent", "stop", "--force", "theta"], timeout=60)
        assert time.monotonic() - t0 < 10
        time.sleep(3)  # RestartSec=2s: a restart would have happened by now
        s = show(host, "kvm@theta.service", "ActiveState", "Result", "NRestarts")
        assert s == {"ActiveState": "inactive", "Result": "success", "NRestarts": "0"}
        assert "stopped while starting (stop --force)" in host.journal("kvm@theta.service")
    finally:
        host.write_file("/etc/kvmagent/kvmagent.toml", 'accel = "tcg"\n')


def test_a_device_wait_longer_than_the_start_timeout(host: TestHost, image) -> None:
    """device_timeout may be longer than TimeoutStartSec= (up to an hour, vs
    5 min): the supervisor extends the start while its planner waits."""
    host.write_file("/etc/kvmagent/kvmagent.toml", 'accel = "tcg"\ndevice_timeout = "60s"\n')
    try:
        define_guest(host, "iota2", guest_toml(image, nics=1, extra='bridge = "br-later"\n'),
                     unit_dropin="[Service]\nTimeoutStartSec=4s\n")
        host.exec(["systemctl", "start", "--no-block", "kvm@iota2"])
        wait_for(host, "kvm@iota2.service", r"waits up to 60 s for: .*br-later")
        time.sleep(8)  # twice TimeoutStartSec=
        host.run(["kvmagent", "bridge", "ensure", "br-later"])
        s = wait_state(host, "kvm@iota2.service", ("active", "failed"), timeout=60)
        assert s["ActiveState"] == "active" and s["NRestarts"] == "0", \
            (s, host.journal("kvm@iota2.service")[-3000:])
        host.run(["kvmagent", "stop", "--force", "iota2"], timeout=60)
    finally:
        host.write_file("/etc/kvmagent/kvmagent.toml", 'accel = "tcg"\n')


def test_guest_poweroff_ends_the_unit_without_restart(host: TestHost, image) -> None:
    define_guest(host, "theta", guest_toml(image, nics=0, cmdline="guest.then=poweroff"))
    host.exec(["systemctl", "start", "kvm@theta"], timeout=120)
    wait_for(host, "kvm@theta.service", r"guest theta powered off")
    s = wait_state(host, "kvm@theta.service", ("inactive", "failed"))
    time.sleep(3)  # RestartSec=2s: a restart would have happened by now
    s = show(host, "kvm@theta.service", "ActiveState", "Result", "NRestarts")
    assert s == {"ActiveState": "inactive", "Result": "success", "NRestarts": "0"}


def test_on_poweroff_keep_leaves_qemu_with_the_guest_stopped(host: TestHost, image) -> None:
    define_guest(host, "iota", guest_toml(image, nics=0, cmdline="guest.then=poweroff",
                                          top='on_poweroff = "keep"'))
    host.exec(["systemctl", "start", "kvm@iota"], timeout=120)
    wait_for(host, "kvm@iota.service", r"powered off; QEMU kept \(on_poweroff = keep\)")
    time.sleep(1)
    assert show(host, "kvm@iota.service", "ActiveState")["ActiveState"] == "active"
    assert qemu_pid(host, "iota") > 0
    t0 = time.monotonic()
    host.exec(["systemctl", "stop", "kvm@iota"], timeout=120)
    assert time.monotonic() - t0 < 10, "a powered-off guest needs no ACPI stop timeout"
    assert show(host, "kvm@iota.service", "Result")["Result"] == "success"
    assert "guest iota is powered off; stopping QEMU" in host.journal("kvm@iota.service")


def _cpu_seconds_until_gone(host: TestHost, pid: str, timeout: float = 60) -> float:
    """CPU time (user + system) of process PID, sampled until it exits."""
    ticks = os.sysconf("SC_CLK_TCK")
    seen = 0.0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = host.exec(["cat", f"/proc/{pid}/stat"], check=False)
        if r.returncode != 0:
            return seen
        fields = r.stdout.rpartition(")")[2].split()
        seen = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        time.sleep(0.2)
    raise AssertionError(f"process {pid} still there after {timeout} s")


def test_a_guest_that_ignores_the_power_button_is_stopped_without_spinning(
        host: TestHost, image) -> None:
    """acpi=off: the power button does nothing, so the supervisor presses it
    every few seconds until [stop] timeout, then quits QEMU; meanwhile it
    must sleep (it once looped without waiting for as long as a stop took,
    its watchdog ping time being long past)."""
    define_guest(host, "kappa", guest_toml(image, nics=0, cmdline="acpi=off",
                                           extra='[stop]\ntimeout = "14s"\n'))
    host.exec(["systemctl", "start", "kvm@kappa"], timeout=120)
    wait_for(host, "kvm@kappa.service", r"GUEST-READY")
    pid = show(host, "kvm@kappa.service", "MainPID")["MainPID"]
    t0 = time.monotonic()
    host.exec(["systemctl", "stop", "--no-block", "kvm@kappa"])
    cpu = _cpu_seconds_until_gone(host, pid)
    took = time.monotonic() - t0
    assert 14 <= took < 40, took
    assert cpu < 1.5, f"the supervisor used {cpu:.1f} s of CPU in a {took:.1f} s stop"
    wait_state(host, "kvm@kappa.service", ("inactive",))
    journal = host.journal("kvm@kappa.service")
    assert "did not power off within 14 s; stopping QEMU" in journal, journal[-2000:]


def test_on_poweroff_keep_guest_stopped_while_running_needs_no_stop_timeout(
        host: TestHost, image) -> None:
    """The power button turns the guest off and QEMU stays (-no-shutdown):
    QEMU is stopped then, not when [stop] timeout has passed."""
    define_guest(host, "lambda", guest_toml(image, nics=0, top='on_poweroff = "keep"',
                                            extra='[stop]\ntimeout = "60s"\n'))
    host.exec(["systemctl", "start", "kvm@lambda"], timeout=120)
    wait_for(host, "kvm@lambda.service", r"GUEST-READY")
    t0 = time.monotonic()
    host.exec(["systemctl", "stop", "kvm@lambda"], timeout=120)
    took = time.monotonic() - t0
    journal = host.journal("kvm@lambda.service")
    assert "GUEST-POWEROFF" in journal and "is powered off; stopping QEMU" in journal
    assert took < 15, f"{took:.1f} s: the stop waited for the stop timeout"
    assert show(host, "kvm@lambda.service", "Result")["Result"] == "success"


FLOOD = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.setblocking(False)
sent, end = 0, time.monotonic() + 5
while time.monotonic() < end:
    try:
        sent += s.send(b"x" * 65536)
    except BlockingIOError:
        time.sleep(0.05)
print(sent)
"""


def test_console_input_the_guest_does_not_read_never_blocks_the_supervisor(
        host: TestHost, image) -> None:
    """The guest never opens its serial port (its console is tty0), so QEMU
    stops taking input; a viewer pastes megabytes.  The supervisor must go
    on (it once blocked writing that input: no watchdog pings, no stop)."""
    define_guest(host, "mu", guest_toml(image, nics=0, cmdline="console=tty0 guest.shell=0"))
    host.exec(["systemctl", "start", "kvm@mu"], timeout=120)
    time.sleep(3)
    pid = show(host, "kvm@mu.service", "MainPID")["MainPID"]
    sent = int(host.exec(["/usr/bin/python3", "-c", FLOOD,
                          "/run/kvmagent/mu/console.sock"], timeout=60).stdout)
    assert sent > 1 << 16  # the supervisor took what it has room for
    t0 = time.monotonic()
    host.exec(["systemctl", "stop", "kvm@mu"], timeout=150)
    took = time.monotonic() - t0
    s = show(host, "kvm@mu.service", "Result", "NRestarts", "MainPID")
    assert took < 20, f"{took:.1f} s to stop: the supervisor was blocked"
    assert s["Result"] == "success" and s["NRestarts"] == "0", s
    assert pid != "0"


def test_guest_kernel_panic_is_a_failure(host: TestHost, image) -> None:
    define_guest(host, "kappa", guest_toml(image, nics=0, cmdline="guest.then=panic"))
    host.exec(["systemctl", "start", "kvm@kappa"], timeout=120)
    journal = wait_for(host, "kvm@kappa.service", r"QEMU of guest kappa exited with status 1")
    assert "guest kappa kernel panic" in journal
    deadline = time.monotonic() + 30
    while show(host, "kvm@kappa.service", "NRestarts")["NRestarts"] == "0":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    host.exec(["systemctl", "stop", "kvm@kappa"], timeout=120)


@pytest.mark.parametrize("unit", ["kvm@demo.service", "kvmagent-bridges.service"])
def test_units_verify_clean(host: TestHost, unit: str) -> None:
    # --man=no: the man pages named in Documentation= come with the package.
    r = host.exec(["systemd-analyze", "verify", "--man=no", unit], check=False)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_console_round_trip_is_in_the_journal(host: TestHost, image) -> None:
    define_guest(host, "lam", guest_toml(image, nics=0))
    host.exec(["systemctl", "start", "kvm@lam"], timeout=120)
    wait_for(host, "kvm@lam.service", r"Enter 'help'")
    mode = host.exec(["stat", "-c", "%a %U", "/run/kvmagent/lam/console.sock"]).stdout
    assert mode == "600 root\n"
    r = host.run(["kvmagent", "console", "lam", "--timeout", "3"],
                 input="echo ANSWER-$((6*7))\n")
    assert "ANSWER-42" in r.stdout.replace("ANSWER-$((6*7))", "")
    wait_for(host, "kvm@lam.service", r"lam-console\[\d+\]: ANSWER-42")
    by_field = host.exec(["journalctl", "GUEST=lam", "-o", "cat", "--no-pager"]).stdout
    assert "ANSWER-42" in by_field and "GUEST-READY" in by_field
    # the catalog explains the lifecycle messages (journalctl -x)
    explained = host.exec(["journalctl", "-x", "-u", "kvm@lam", "--no-pager"]).stdout
    assert "Subject: Guest lam is running" in explained, explained[-3000:]
    assert "attach to it with: kvmagent console lam" in explained
    host.exec(["systemctl", "stop", "kvm@lam"], timeout=120)
    r = host.run(["kvmagent", "console", "lam"], check=False, input="")
    assert r.returncode == 7 and "guest lam is not running" in r.stderr


def test_ip_sockets_only_for_guests_that_need_them(host: TestHost, image) -> None:
    """A guest with VNC on TCP gets AF_INET through kvmagent-generator's
    drop-in after a daemon-reload; before that its start is refused with
    the fix; other guests' units allow no IP sockets at all."""
    define_guest(host, "vnc", guest_toml(image, nics=0, extra='[display]\nvnc = "127.0.0.1:7"\n'))
    r = host.run(["kvmagent", "start", "vnc"], check=False, timeout=120)
    assert r.returncode == 1  # the unit failed: exit 6, not restarted
    s = wait_state(host, "kvm@vnc.service", ("failed",))
    assert s["ExecMainStatus"] == "6"
    assert "needs IP sockets" in host.journal("kvm@vnc.service")
    assert "systemctl daemon-reload" in host.journal("kvm@vnc.service")
    host.exec(["systemctl", "daemon-reload"])
    host.exec(["systemctl", "reset-failed", "kvm@vnc"])
    host.run(["kvmagent", "start", "vnc"], timeout=120)
    families = show(host, "kvm@vnc.service", "RestrictAddressFamilies")["RestrictAddressFamilies"]
    assert "AF_INET" in families.split() and "AF_INET6" in families.split()
    listening = host.exec(["ss", "-Hltn", "sport = :5907"]).stdout
    assert "127.0.0.1:5907" in listening, listening
    host.run(["kvmagent", "stop", "vnc"], timeout=120)
    plain = show(host, "kvm@alpha.service", "RestrictAddressFamilies")["RestrictAddressFamilies"]
    assert sorted(plain.split()) == ["AF_NETLINK", "AF_UNIX"], plain
