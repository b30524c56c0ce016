"""The test host itself: it boots systemd, runs commands as units, isolates the machine,
and leaves nothing behind.  Every later system test relies on these properties."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from tests.harness import HarnessError, TestHost, rootfs
from tests.harness.sysutil import STATE_ROOT, mounts_under, proc_alive, procs_mentioning, run_cmd
from tests.harness.testhost import PROPAGATE, Record, leftovers

pytestmark = pytest.mark.system

PY = "/usr/bin/python3"
KVM_GET_API_VERSION = 0xAE00
KVM_PROBE = f"""
import fcntl, os
os.close(os.open("/dev/net/tun", os.O_RDWR))   # the unit's device policy allows it
fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
print(fcntl.ioctl(fd, {KVM_GET_API_VERSION:#x}))
"""
NETDEV = """
from pyroute2 import IPRoute
with IPRoute() as ipr:
    ipr.link("add", ifname="ktbr0", kind="bridge")
    ipr.link("add", ifname="kttap0", kind="tuntap", mode="tap")
    br, tap = ipr.link_lookup(ifname="ktbr0")[0], ipr.link_lookup(ifname="kttap0")[0]
    ipr.link("set", index=tap, master=br)
    ipr.link("set", index=br, state="up")
    print(ipr.get_links(tap)[0].get_attr("IFLA_MASTER") == br)
"""
REGISTER_MACHINE = """
import sys, uuid
from pydbus import SystemBus
machined = SystemBus().get("org.freedesktop.machine1")
print(machined.RegisterMachine(sys.argv[1], list(uuid.uuid4().bytes), "kvmagent-test", "vm",
                               int(sys.argv[2]), ""))
"""


def _host_links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def _new_links_of_ours(before: set[str]) -> set[str]:
    """Links on the machine that a test host could have leaked: our names, nspawn's veths.
    (Not plain equality: other test suites may add links on this machine meanwhile.)"""
    return {n for n in _host_links() - before if n.startswith(("kt", "ve-", "vb-"))}


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_boots_systemd_as_pid1(testhost: TestHost) -> None:
    assert testhost.exec(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    state = testhost.run(["systemctl", "is-system-running"], check=False).stdout.strip()
    failed = testhost.run(["systemctl", "--failed", "--no-pager"], check=False).stdout
    assert state in ("running", "degraded"), failed
    assert testhost.exec(["ls", "/src/kvmagent/pyproject.toml"]).returncode == 0


def test_run_executes_inside_a_unit(testhost: TestHost) -> None:
    cgroup = testhost.run(["cat", "/proc/self/cgroup"]).stdout
    assert re.search(r"^0::/system\.slice/run-[\w-]+\.service$", cgroup, re.M), cgroup
    # stdin, stdout and the exit status go through systemd-run --pipe --wait.
    echo = "import sys; sys.stdout.write(sys.stdin.read()); sys.exit(7)"
    r = testhost.run([PY, "-c", echo], input="piped", check=False)
    assert (r.returncode, r.stdout) == (7, "piped")
    with pytest.raises(HarnessError, match="exit code 7"):
        testhost.run([PY, "-c", echo], input="")
    # exec() is plain nsenter: in no unit at all.
    assert "run-" not in testhost.exec(["cat", "/proc/self/cgroup"]).stdout


def test_tun_and_kvm_from_a_unit(testhost: TestHost) -> None:
    assert os.path.exists("/dev/kvm"), "this machine has no /dev/kvm to bind in"
    assert testhost.run([PY, "-c", KVM_PROBE]).stdout.strip() == "12"


def test_bridge_and_tap_stay_inside(testhost: TestHost) -> None:
    before = _host_links()
    try:
        assert testhost.run([PY, "-c", NETDEV]).stdout.strip() == "True"
        inside = testhost.exec(["ip", "-o", "link", "show"]).stdout
        assert "ktbr0" in inside and "kttap0" in inside and "master ktbr0" in inside
        assert not {"ktbr0", "kttap0"} & _host_links()
        assert _new_links_of_ours(before) == set()
    finally:
        for link in ("kttap0", "ktbr0"):
            testhost.run(["ip", "link", "del", link], check=False)


def test_machined_registers_a_unit_process(testhost: TestHost) -> None:
    testhost.run(["systemd-run", "--unit=kt-machine.service", "sleep", "100"])
    try:
        pid = testhost.run(["systemctl", "show", "-P", "MainPID", "kt-machine.service"]).stdout
        testhost.run([PY, "-c", REGISTER_MACHINE, "ktguest", pid.strip()])
        listing = testhost.run(["machinectl", "list", "--no-pager", "--no-legend"]).stdout
        assert re.search(r"^ktguest\s+vm\s+kvmagent-test", listing, re.M), listing
        unit = testhost.run(["machinectl", "show", "--property=Unit", "--value", "ktguest"])
        assert unit.stdout.strip() == "kt-machine.service"
    finally:
        testhost.run(["systemctl", "stop", "kt-machine.service"], check=False)
    # Stopping the unit removes the machine.
    listing = testhost.run(["machinectl", "list", "--no-pager", "--no-legend"]).stdout
    assert "ktguest" not in listing


def test_dpkg_install_stays_inside(testhost: TestHost, tmp_path: Path) -> None:
    pkg = "kvmagent-harness-probe"
    tree = tmp_path / "pkg"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN/control").write_text(
        f"Package: {pkg}\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: kvmagent tests <root@localhost>\nDescription: test host probe\n"
    )
    (tree / f"usr/share/{pkg}").mkdir(parents=True)
    (tree / f"usr/share/{pkg}/marker").write_text("inside\n")
    deb = tmp_path / f"{pkg}.deb"
    run_cmd(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)])
    status_before = _sha256("/var/lib/dpkg/status")
    testhost.copy_in(deb, f"/var/tmp/{pkg}.deb")
    try:
        testhost.run(["dpkg", "-i", f"/var/tmp/{pkg}.deb"])
        assert "Status: install ok installed" in testhost.run(["dpkg", "-s", pkg]).stdout
        assert testhost.exec(["cat", f"/usr/share/{pkg}/marker"]).stdout == "inside\n"
        assert _sha256("/var/lib/dpkg/status") == status_before
        assert not Path(f"/usr/share/{pkg}").exists()
    finally:
        testhost.run(["dpkg", "--purge", pkg], check=False)
    assert _sha256("/var/lib/dpkg/status") == status_before


def test_debian_root_boots_with_python_deps(debian_testhost: TestHost) -> None:
    th = debian_testhost
    assert th.exec(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    assert th.boot_state in ("running", "degraded")
    stamp = json.loads(th.exec(["cat", "/" + rootfs.STAMP]).stdout)
    assert stamp["release"] == th.release in rootfs.RELEASES
    os_release = th.exec(["cat", "/etc/os-release"]).stdout
    assert f'VERSION_ID="{rootfs.RELEASES[th.release]}"' in os_release, os_release
    assert th.exec(["test", "-e", "/root/.pyenv"], check=False).returncode != 0  # not the host
    th.run([PY, "-c", "import pystemd.systemd1, pystemd.daemon, pydbus, pyroute2, systemd.journal"])


def test_offline_repo_installs_without_network(debian_testhost: TestHost) -> None:
    """The repo at /mnt/debs (built by setup) is a valid apt source inside a
    --private-network container: apt reads its Packages/Release and installs from it."""
    th = debian_testhost
    th.write_file("/etc/apt/kt-local.list", "deb [trusted=yes] file:/mnt/debs ./\n")
    th.run(["mkdir", "-p", "/var/tmp/kt-lists/partial"])
    apt_opts = ["-o", "Dir::Etc::SourceList=/etc/apt/kt-local.list", "-o",
                "Dir::Etc::SourceParts=-", "-o", "Dir::State::Lists=/var/tmp/kt-lists"]
    update = th.run(["apt-get", *apt_opts, "update"])
    assert "Err:" not in update.stdout, update.stdout
    policy = th.run(["apt-cache", *apt_opts, "policy", "python3-pyroute2"]).stdout
    assert "file:/mnt/debs" in policy, policy
    th.run(["apt-get", *apt_opts, "install", "-y", "-q", "--reinstall", "--no-install-recommends",
            "python3-pyroute2"], env={"DEBIAN_FRONTEND": "noninteractive"})


@pytest.mark.parametrize("root", ["host", *rootfs.RELEASES])
def test_reboot_keeps_persistent_state(system_ok: None, tmp_path: Path, root: str) -> None:
    state = tmp_path / "state"  # the caller's dir holds the overlay's upper layer
    with TestHost(root=root, persistent=True, persist_dir=state, journal_dir=tmp_path) as th:
        th.write_file("/etc/kvmagent-marker", "persisted\n")
        boot_id = th.exec(["cat", "/proc/sys/kernel/random/boot_id"]).stdout
        th.reboot()
        assert th.exec(["cat", "/proc/sys/kernel/random/boot_id"]).stdout != boot_id
        assert th.exec(["cat", "/etc/kvmagent-marker"]).stdout == "persisted\n"
        state_now = th.run(["systemctl", "is-system-running"], check=False).stdout.strip()
        assert state_now in ("running", "degraded")
    assert (state / "upper/etc/kvmagent-marker").read_text() == "persisted\n"
    assert not Path("/etc/kvmagent-marker").exists()
    assert len(th.boot_seconds) == 2


def _assert_nothing_left(rec: Record, links_before: set[str]) -> None:
    assert leftovers(rec) == []
    assert not proc_alive(rec.nspawn, rec.nspawn_start)
    assert not proc_alive(rec.leader, rec.leader_start)
    assert procs_mentioning(rec.scratch + "/") == []
    assert procs_mentioning(f"--machine={rec.name} ") == []
    assert mounts_under(STATE_ROOT / rec.name) == []
    assert not Path(rec.scratch).exists() and not (PROPAGATE / rec.name).exists()
    assert _new_links_of_ours(links_before) == set()


def test_teardown_leaves_nothing(system_ok: None, tmp_path: Path) -> None:
    links = _host_links()
    with TestHost(root="host", journal_dir=tmp_path) as th:
        rec = dataclasses.replace(th.rec)
        # Things that could leak if the container were not really gone.
        th.run([PY, "-c", NETDEV])
        th.run(["systemd-run", "--unit=kt-sleeper.service", "sleep", "1000"])
    _assert_nothing_left(rec, links)
    assert "kt-sleeper.service" in (tmp_path / f"{th.name}-journal.txt").read_text()


def test_teardown_on_keyboard_interrupt(system_ok: None, tmp_path: Path) -> None:
    links = _host_links()
    th = TestHost(root="host", journal_dir=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with th:
            raise KeyboardInterrupt
    _assert_nothing_left(th.rec, links)


def test_missing_debian_cache_fails_loudly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(rootfs, "ROOTFS_DIR", tmp_path / "nothing")
    with pytest.raises(HarnessError, match="run `make setup`"):
        TestHost(root="debian")
