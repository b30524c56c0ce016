"""Transient guest services on a real systemd host with the tiny guest (TCG):
kvm@NAME.service made by `kvmagent start` where the kvm@.service template is
not installed, and one-off guests from a file (`kvmagent start --transient
FILE`, kvm-oneoff@NAME.service) that leave no unit behind."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from tests.harness import TestHost
from tests.harness.install import REPO, define_guest, guest_toml, install_checkout
from tests.system.test_kvm_service import qemu_pid, show, wait_for, wait_restarts, wait_state

pytestmark = pytest.mark.system

TEMPLATE = "/etc/systemd/system/kvm@.service"  # where install_checkout puts it


@pytest.fixture(scope="module")
def host(testhost: TestHost, image) -> Iterator[TestHost]:
    install_checkout(testhost)
    testhost.run(["kvmagent", "bridge", "ensure", "br-kvm", "--address", "10.77.0.1/24"])
    yield testhost
    set_template(testhost, True)  # as the other test modules expect it


def set_template(th: TestHost, installed: bool) -> None:
    if installed:
        th.copy_in(REPO / "units" / "kvm@.service", TEMPLATE, 0o644)
    else:
        th.exec(["rm", "-f", TEMPLATE])
    th.exec(["systemctl", "daemon-reload"])


def leftovers(th: TestHost, name: str) -> str:
    """Units and unit files of guest NAME's services and scope that are still around."""
    units = th.exec(["systemctl", "list-units", "--all", "--no-legend", "--plain",
                     f"kvm@{name}.service", f"kvm-oneoff@{name}.service",
                     f"kvm-{name}.scope"]).stdout
    files = th.exec(["find", "/run/systemd/transient", "/run/systemd/system",
                     "/etc/systemd/system", "-name", f"*{name}*"], check=False).stdout
    return (units + files).strip()


def test_start_without_the_template_makes_kvm_service_transient(host: TestHost, image) -> None:
    set_template(host, False)
    define_guest(host, "tless", guest_toml(image, nics=1))
    r = host.run(["kvmagent", "start", "tless"], timeout=120)
    assert r.stdout == "kvm@tless.service: started\n"
    s = show(host, "kvm@tless.service", "Transient", "FragmentPath", "Type", "NotifyAccess",
             "KillMode", "Restart", "RestartUSec", "WatchdogUSec", "TimeoutStopUSec", "Slice",
             "RuntimeDirectory", "TasksMax", "DevicePolicy", "RestartPreventExitStatus",
             "ExecStart", "Environment", "PartOf", "StartLimitBurst")
    assert s["Transient"] == "yes"
    assert s["FragmentPath"] == "/run/systemd/transient/kvm@tless.service"
    assert (s["Type"], s["NotifyAccess"], s["KillMode"], s["Restart"]) == (
        "notify", "main", "mixed", "on-failure")
    assert (s["RestartUSec"], s["WatchdogUSec"], s["TimeoutStopUSec"]) == ("0", "30s", "1min 30s")
    assert s["Slice"] == "machine.slice" and s["RuntimeDirectory"] == "kvmagent/tless"
    assert s["TasksMax"] == "1024" and s["DevicePolicy"] == "closed"
    assert s["RestartPreventExitStatus"] == "6 8" and s["StartLimitBurst"] == "5"
    assert s["PartOf"] == "machines.target"
    # this checkout's kvmagent, run by this interpreter
    assert "argv[]=/usr/bin/python3 -m kvmagent run tless" in s["ExecStart"]
    assert s["Environment"] == "PYTHONPATH=/src/kvmagent"
    wait_for(host, "kvm@tless.service", r"GUEST-READY")
    assert re.search(r"^tless\s+vm\s+kvmagent", host.exec(["machinectl", "list", "--no-legend"])
                     .stdout, re.M)
    assert show(host, "kvm-tless.scope", "PartOf")["PartOf"] == "kvm@tless.service"


def test_transient_kvm_service_is_restarted_after_a_crash(host: TestHost) -> None:
    """Restart=on-failure works on the transient unit: between the crash and
    the restart it is "activating (auto-restart)", not inactive, so systemd
    does not collect it."""
    first = qemu_pid(host, "tless")
    host.exec(["kill", "-9", str(first)])
    wait_restarts(host, "kvm@tless.service", 1)
    assert show(host, "kvm@tless.service", "Transient")["Transient"] == "yes"
    assert qemu_pid(host, "tless") != first
    assert "was killed by signal 9" in host.journal("kvm@tless.service")


def test_stop_of_the_transient_kvm_service_leaves_nothing(host: TestHost) -> None:
    wait_for(host, "kvm@tless.service", r"GUEST-READY")
    r = host.run(["kvmagent", "stop", "tless"], timeout=120)
    assert r.stdout == "kvm@tless.service: stopped\n"
    assert "GUEST-POWEROFF" in host.journal("kvm@tless.service")
    assert leftovers(host, "tless") == ""
    assert "tless" not in host.exec(["machinectl", "list", "--no-legend"]).stdout
    # stopping it again is not an error, as with the template
    assert host.run(["kvmagent", "stop", "tless"]).stdout == "kvm@tless.service: stopped\n"


def test_failed_transient_kvm_service_stays_until_started_again(host: TestHost, image) -> None:
    """Without CollectMode= a failed transient kvm@NAME stays for systemctl
    status; `kvmagent start` resets it and makes it afresh."""
    set_template(host, False)
    define_guest(host, "flaky", guest_toml(image, nics=0))
    host.run(["kvmagent", "start", "flaky"], timeout=120)
    wait_for(host, "kvm@flaky.service", r"GUEST-INIT")
    define_guest(host, "flaky", guest_toml(image, nics=0, top='cpus = "two"'))
    host.exec(["kill", "-9", str(qemu_pid(host, "flaky"))])
    s = wait_state(host, "kvm@flaky.service", ("failed",))  # the restart exits 6: no more
    assert (s["ExecMainStatus"], s["NRestarts"]) == ("6", "1")
    assert show(host, "kvm@flaky.service", "Transient")["Transient"] == "yes"
    define_guest(host, "flaky", guest_toml(image, nics=0))
    r = host.run(["kvmagent", "start", "flaky"], timeout=120)
    assert r.stdout == "kvm@flaky.service: started\n"
    s = show(host, "kvm@flaky.service", "ActiveState", "NRestarts")
    assert s == {"ActiveState": "active", "NRestarts": "0"}  # a new unit
    r = host.run(["kvmagent", "stop", "--force", "flaky"], timeout=120)
    assert r.stdout == "kvm@flaky.service: stopped (QEMU killed)\n"
    # QEMU and the supervisor are gone; ExecStopPost= may still be running
    deadline = time.monotonic() + 30
    while leftovers(host, "flaky") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftovers(host, "flaky") == ""


def test_oneoff_guest_runs_visibly_and_leaves_nothing(host: TestHost, image) -> None:
    set_template(host, True)
    host.write_file("/root/quick.toml", guest_toml(image, nics=1, description="quick and dirty"))
    r = host.run(["kvmagent", "start", "--transient", "/root/quick.toml"], timeout=120)
    assert r.stdout == "kvm-oneoff@quick.service: started\n"
    units = host.exec(["systemctl", "list-units", "--no-legend", "--plain",
                       "kvm-oneoff@*"]).stdout
    assert re.search(r"^kvm-oneoff@quick\.service\s+loaded\s+active\s+running\s+"
                     r"KVM guest quick \(one-off, /root/quick\.toml\)", units, re.M), units
    s = show(host, "kvm-oneoff@quick.service", "Transient", "CollectMode", "Conflicts",
             "ExecStart", "Restart")
    assert (s["Transient"], s["CollectMode"], s["Restart"]) == (
        "yes", "inactive-or-failed", "on-failure")
    assert "kvm@quick.service" in s["Conflicts"].split()  # beside shutdown.target
    assert "run --file /root/quick.toml quick" in s["ExecStart"]
    wait_for(host, "kvm-oneoff@quick.service", r"GUEST-READY")
    assert re.search(r"^quick\s+vm\s+kvmagent", host.exec(["machinectl", "list", "--no-legend"])
                     .stdout, re.M)
    assert show(host, "kvm-quick.scope", "PartOf")["PartOf"] == "kvm-oneoff@quick.service"
    assert "kvm-quick-0" in host.exec(["ip", "-o", "link"]).stdout
    # its console, though it has no guests/quick.toml
    wait_for(host, "kvm-oneoff@quick.service", r"Enter 'help'")
    r = host.run(["kvmagent", "console", "quick", "--timeout", "3"], input="echo ONE-$((2+2))\n")
    assert "ONE-4" in r.stdout.replace("ONE-$((2+2))", ""), (r.stdout, r.stderr)

    # one guest name, one running guest: a defined "quick" is refused, so is a second one-off
    define_guest(host, "quick", guest_toml(image, nics=0))
    r = host.run(["kvmagent", "start", "quick"], check=False)
    assert r.returncode == 1
    assert "guest quick is already running as a one-off guest (kvm-oneoff@quick.service)" \
        in r.stderr
    assert show(host, "kvm@quick.service", "ActiveState")["ActiveState"] == "inactive"
    r = host.run(["kvmagent", "start", "--transient", "/root/quick.toml"], check=False)
    assert r.returncode == 1 and "already running as a one-off guest" in r.stderr

    r = host.run(["kvmagent", "stop", "quick"], timeout=120)
    assert r.stdout == "kvm-oneoff@quick.service: stopped\n"
    journal = host.journal("kvm-oneoff@quick.service")  # the journal keeps it all
    assert "GUEST-READY" in journal and "GUEST-POWEROFF" in journal
    assert leftovers(host, "quick") == ""
    assert host.exec(["ls", "/run/systemd/transient"]).stdout.count("quick") == 0
    assert "quick" not in host.exec(["machinectl", "list", "--no-legend"]).stdout
    assert "kvm-quick-0" not in host.exec(["ip", "-o", "link"]).stdout
    host.exec(["rm", "/etc/kvmagent/guests/quick.toml"])


def test_oneoff_bad_file_creates_nothing(host: TestHost, image) -> None:
    host.write_file("/root/bad.toml", guest_toml(image, nics=0, top='cpus = "two"'))
    r = host.run(["kvmagent", "start", "--transient", "/root/bad.toml"], check=False)
    assert r.returncode == 6
    assert '/root/bad.toml: cpus = "two": expected an integer' in r.stderr
    assert leftovers(host, "bad") == ""
    r = host.run(["kvmagent", "start", "--transient", "/root/missing.toml"], check=False)
    assert r.returncode == 6 and "/root/missing.toml: no such file" in r.stderr


def test_oneoff_is_refused_while_the_defined_guest_runs(host: TestHost, image) -> None:
    define_guest(host, "dup", guest_toml(image, nics=0))
    host.run(["kvmagent", "start", "dup"], timeout=120)
    host.write_file("/root/dup.toml", guest_toml(image, nics=0))
    r = host.run(["kvmagent", "start", "--transient", "/root/dup.toml"], check=False)
    assert r.returncode == 1
    assert "guest dup is already running as a defined guest (kvm@dup.service)" in r.stderr
    assert "hint: stop it first: kvmagent stop dup" in r.stderr
    assert show(host, "kvm-oneoff@dup.service", "LoadState")["LoadState"] == "not-found"
    host.run(["kvmagent", "stop", "dup"], timeout=120)


def test_systemctl_start_of_the_defined_guest_stops_the_oneoff_first(host: TestHost,
                                                                       image) -> None:
    """Conflicts=kvm@NAME.service: the two never run the same name at once."""
    host.write_file("/root/swap.toml", guest_toml(image, nics=1))
    host.run(["kvmagent", "start", "--transient", "/root/swap.toml"], timeout=120)
    wait_for(host, "kvm-oneoff@swap.service", r"GUEST-READY")
    define_guest(host, "swap", guest_toml(image, nics=1))
    host.exec(["systemctl", "start", "kvm@swap"], timeout=120)
    wait_for(host, "kvm@swap.service", r"GUEST-READY")
    assert "GUEST-POWEROFF" in host.journal("kvm-oneoff@swap.service")
    assert show(host, "kvm-oneoff@swap.service", "LoadState")["LoadState"] == "not-found"
    assert show(host, "kvm-swap.scope", "PartOf")["PartOf"] == "kvm@swap.service"
    host.run(["kvmagent", "stop", "swap"], timeout=120)


def test_transient_kvm_service_is_refused_where_the_template_exists(host: TestHost) -> None:
    code = ("import sys\nfrom kvmagent.host import systemd\nfrom kvmagent.errors import KvmagentError\n"
            "from kvmagent.render.service import service_settings\n"
            "try:\n    systemd.start_service('kvm@nope.service', service_settings('nope'))\n"
            "except KvmagentError as e:\n    print(e.message)\n    sys.exit(int(e.status))\n")
    r = host.run(["/usr/bin/python3", "-c", code], check=False, env={"PYTHONPATH": "/src/kvmagent"})
    assert r.returncode == 1, r
    assert r.stdout.startswith("cannot start kvm@nope.service as a transient unit: systemd has "
                               "a unit file"), r.stdout
    assert show(host, "kvm@nope.service", "ActiveState")["ActiveState"] == "inactive"


def test_oneoff_mac_clash_with_a_running_oneoff_is_refused(host: TestHost, image) -> None:
    nic = '[[nic]]\nmac = "52:54:00:77:00:01"\n'
    host.write_file("/root/mac1.toml", guest_toml(image, nics=0, extra=nic))
    host.write_file("/root/mac2.toml", guest_toml(image, nics=0, extra=nic))
    host.run(["kvmagent", "start", "--transient", "/root/mac1.toml"], timeout=120)
    r = host.run(["kvmagent", "start", "--transient", "/root/mac2.toml"], check=False)
    assert r.returncode == 6
    assert ('/root/mac2.toml: nic[0].mac = "52:54:00:77:00:01" is also a MAC of guest mac1 '
            "(/root/mac1.toml)") in r.stderr
    assert leftovers(host, "mac2") == ""
    host.run(["kvmagent", "stop", "mac1"], timeout=120)
    assert leftovers(host, "mac1") == ""
