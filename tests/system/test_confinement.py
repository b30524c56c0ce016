"""What the hardening of kvm@.service and QEMU amounts to, read back from
the running processes in the systemd test host (capabilities, user,
no_new_privs, seccomp, file access) and systemd-analyze's exposure score.
Cgroup device and resource limits are set but not enforced in the test host
(harness notes, section 8): those are asserted as properties elsewhere."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.harness import TestHost
from tests.harness.install import define_guest, guest_toml, install_checkout
from tests.system.test_kvm_service import qemu_pid, show, wait_for

pytestmark = pytest.mark.system

# CAP_KILL 5, CAP_SETGID 6, CAP_SETUID 7, CAP_NET_ADMIN 12, CAP_SYS_NICE 23
SUPERVISOR_CAPS = (1 << 5) | (1 << 6) | (1 << 7) | (1 << 12) | (1 << 23)


@pytest.fixture(scope="module")
def host(testhost: TestHost, guest_image) -> Iterator[TestHost]:  # type: ignore[no-untyped-def]
    install_checkout(testhost)
    testhost.exec(["mkdir", "-p", "/var/lib/kvmagent/images"])
    testhost.exec(["truncate", "-s", "16M", "/var/lib/kvmagent/images/conf.img"])
    testhost.exec(["chmod", "600", "/var/lib/kvmagent/images/conf.img"])
    define_guest(testhost, "conf", guest_toml(
        guest_image, nics=0, extra='[[disk]]\npath = "/var/lib/kvmagent/images/conf.img"\n'))
    testhost.exec(["systemctl", "start", "kvm@conf"], timeout=120)
    wait_for(testhost, "kvm@conf.service", r"GUEST-READY")
    yield testhost
    testhost.exec(["systemctl", "stop", "kvm@conf"], timeout=120)


def status(th: TestHost, pid: int | str) -> dict[str, str]:
    text = th.exec(["cat", f"/proc/{pid}/status"]).stdout
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def test_qemu_is_unprivileged_and_has_its_disk_only_as_an_fd(host: TestHost) -> None:
    pid = qemu_pid(host, "conf")
    st = status(host, pid)
    uid = host.exec(["id", "-u", "kvmagent-qemu"]).stdout.strip()
    assert st["Uid"].split() == [uid] * 4 and st["Gid"].split()[0] != "0"
    assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0
    assert st["NoNewPrivs"].strip() == "1" and st["Seccomp"].strip() == "2"  # filtering
    # the disk (0600 root) reached QEMU as an fd; QEMU itself cannot open it
    assert "disks=vda" in host.journal("kvm@conf.service")
    fds = host.exec(["ls", "-l", f"/proc/{pid}/fd"]).stdout
    assert "/var/lib/kvmagent/images/conf.img" in fds
    r = host.exec(["setpriv", f"--reuid={uid}", "--regid=65534", "--clear-groups",
                   "cat", "/var/lib/kvmagent/images/conf.img"], check=False)
    assert r.returncode != 0 and "Permission denied" in r.stderr


def test_supervisor_keeps_only_the_capabilities_it_needs(host: TestHost) -> None:
    main = show(host, "kvm@conf.service", "MainPID")["MainPID"]
    st = status(host, main)
    assert st["Uid"].split()[0] == "0"
    assert int(st["CapBnd"], 16) == SUPERVISOR_CAPS, st["CapBnd"]
    assert int(st["CapEff"], 16) == SUPERVISOR_CAPS
    assert st["NoNewPrivs"].strip() == "1" and st["Seccomp"].strip() == "2"
    # its mount namespace: the system read-only, home directories gone
    mounts = host.exec(["cat", f"/proc/{main}/mountinfo"]).stdout
    assert re.search(r" /usr ro[, ]", mounts) or re.search(r" / ro[, ]", mounts), mounts[:2000]
    # ProtectHome=yes: what the host has in /root and /home is not there
    in_unit = ["nsenter", "-t", str(main), "-m", "--"]
    for home in ("/root", "/home"):
        host.exec(["mkdir", "-p", home])
        host.write_file(f"{home}/kvmagent-canary", "x")
        assert host.exec(["test", "-e", f"{home}/kvmagent-canary"], check=False).returncode == 0
        assert host.exec([*in_unit, "test", "-e", f"{home}/kvmagent-canary"],
                         check=False).returncode == 1, home
        assert host.exec([*in_unit, "find", home, "-mindepth", "1"], check=False).stdout == ""


def test_exposure_score_is_ok_and_below_nspawns(host: TestHost) -> None:
    def score(unit: str) -> float:
        out = host.exec(["systemd-analyze", "security", "--no-pager", unit], check=False).stdout
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
        assert m, out[-1000:]
        return float(m.group(1))
    ours, nspawn = score("kvm@conf.service"), score("systemd-nspawn@x.service")
    print(f"systemd-analyze security: kvm@conf.service {ours}, systemd-nspawn@.service {nspawn}")
    assert ours <= 4.0 and ours < nspawn
