"""The Debian package on a clean Debian 12: built from this tree, installed
with apt into a fresh systemd test host on the debootstrap root whose only
package source is the offline repository of Debian packages made by `make
setup` (the container has no network).  The runtime dependencies are
purged first, so apt must bring every one of them in through Depends."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.harness import HarnessError, TestHost, rootfs
from tests.harness.install import BUILD_PATH, REPO, build_deb, guest_toml
from tests.system.test_kvm_service import qemu_pid, show, wait_for

pytestmark = pytest.mark.system
APT = ["-o", "Dir::Etc::SourceList=/etc/apt/offline.list", "-o", "Dir::Etc::SourceParts=-",
       "-o", "Dir::State::Lists=/var/tmp/offline-lists"]
RUNTIME = ["python3-pystemd", "python3-pydbus", "python3-pyroute2", "qemu-system-x86",
           "systemd-container"]


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("dpkg-buildpackage", path=BUILD_PATH) is None:
        pytest.fail("dpkg-buildpackage is missing: run `make setup`", pytrace=False)
    work = tmp_path_factory.mktemp("deb")
    return build_deb(work, "0.1.0"), build_deb(work, "0.1.0+upgrade1")


def main_pid(th: TestHost, unit: str) -> str:
    return show(th, unit, "MainPID")["MainPID"]


def test_install_upgrade_and_purge_on_clean_debian(system_ok: None, debs: tuple[Path, Path],
                                                   guest_image, tmp_path: Path) -> None:
    deb, upgrade = debs
    try:
        debs = rootfs.cached_debs()
    except HarnessError as e:
        pytest.fail(str(e), pytrace=False)
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    with TestHost(root="debian", bind_ro=[(debs, "/mnt/debs")], journal_dir=tmp_path) as th:
        th.run(["apt-get", "purge", "-y", "-q", *RUNTIME], env=env)
        th.run(["apt-get", "autoremove", "--purge", "-y", "-q"], env=env)
        assert th.exec(["test", "-e", "/usr/lib/python3/dist-packages/pyroute2"],
                       check=False).returncode == 1
        th.write_file("/etc/apt/offline.list", "deb [trusted=yes] file:/mnt/debs ./\n")
        th.exec(["mkdir", "-p", "/var/tmp/offline-lists/partial"])
        th.run(["apt-get", *APT, "update", "-q"])
        th.copy_in(deb, f"/var/tmp/{deb.name}")
        install = th.run(["apt-get", *APT, "install", "-y", "-q", "--no-install-recommends",
                          f"/var/tmp/{deb.name}"], env=env, timeout=600)
        for dep in RUNTIME:
            assert f"Setting up {dep} " in install.stdout, dep
        assert not th.exec(["systemctl", "list-units", "--no-legend", "kvm@*"]).stdout.strip()
        assert th.exec(["systemctl", "is-enabled", "kvmagent-bridges.service"],
                       check=False).stdout.strip() == "enabled"
        assert "/usr/share/man/man5/kvmagent.toml.5.gz" in th.exec(["dpkg", "-L", "kvmagent"]).stdout
        # postinst ran systemd-tmpfiles: the boot's ID for the uptime record
        boot = th.exec(["cat", "/run/kvmagent/boot-id"]).stdout.strip()
        assert boot == th.exec(["cat", "/proc/sys/kernel/random/boot_id"]).stdout.strip().replace("-", "")
        # systemd's dpkg trigger compiled the message catalog (journalctl -x)
        assert "kvmagent: Guest @GUEST@ is running" in th.exec(
            ["journalctl", "--list-catalog", "4c2e3a0c6d0b4f0e9b7e3f2a1d5c6b02"]).stdout
        # a guest, with nothing else installed by hand
        th.copy_in(guest_image.kernel, "/var/lib/guests/vmlinuz", 0o644)
        th.copy_in(guest_image.initrd, "/var/lib/guests/initrd.gz", 0o644)
        th.write_file("/etc/kvmagent/kvmagent.toml.d/50-test.toml", 'accel = "tcg"\n')
        toml = guest_toml(guest_image, nics=0).replace(str(guest_image.kernel),
                                                       "/var/lib/guests/vmlinuz")
        th.write_file("/etc/kvmagent/guests/demo.toml",
                      toml.replace(str(guest_image.initrd), "/var/lib/guests/initrd.gz"))
        assert th.run(["kvmagent", "validate", "--host"]).stdout == "demo: ok\n"
        for name in ("g1", "g2", "g3"):
            th.exec(["cp", "/etc/kvmagent/guests/demo.toml", f"/etc/kvmagent/guests/{name}.toml"])
        for name in ("demo", "g1"):
            th.exec(["systemctl", "start", f"kvm@{name}"], timeout=120)
            wait_for(th, f"kvm@{name}.service", "GUEST-READY")
        assert "demo" in th.exec(["machinectl", "list", "--no-legend"]).stdout
        before = {n: main_pid(th, f"kvm@{n}.service") for n in ("demo", "g1")}
        qemus = {n: qemu_pid(th, n) for n in ("demo", "g1")}

        # upgrade under two running guests: they keep their supervisor and QEMU.
        # As from a kvmagent before /run/kvmagent/boot-id: postinst names this
        # boot as that version did (its guests' events say so), tmpfiles does not
        th.exec(["rm", "/run/kvmagent/boot-id"])
        th.copy_in(upgrade, f"/var/tmp/{upgrade.name}")
        th.run(["apt-get", *APT, "install", "-y", "-q", f"/var/tmp/{upgrade.name}"], env=env)
        assert th.run(["kvmagent", "--version"]).stdout == "kvmagent 0.1.0+upgrade1\n"
        old_name = th.exec(["python3", "-c", "from kvmagent.state import kernel_boot_id; "
                            "print(kernel_boot_id())"]).stdout.strip()
        assert th.exec(["cat", "/run/kvmagent/boot-id"]).stdout.strip() == old_name != boot
        for name, pid in before.items():
            assert main_pid(th, f"kvm@{name}.service") == pid, name
            assert qemu_pid(th, name) == qemus[name], name
            assert th.exec(["systemctl", "is-active", f"kvm@{name}"]).stdout == "active\n"
        # postinst reloaded systemd (dh_installsystemd does not for templates)
        assert th.exec(["systemctl", "show", "-p", "NeedDaemonReload",
                        "kvm@demo.service"]).stdout == "NeedDaemonReload=no\n"
        th.exec(["systemctl", "start", "kvm@g2"], timeout=120)
        assert "kvmagent 0.1.0+upgrade1)" in wait_for(th, "kvm@g2.service", "GUEST-READY")
        assert "kvmagent 0.1.0)" in th.journal("kvm@demo.service")
        # the old supervisors, their files replaced, still stop their guests over ACPI
        th.exec(["systemctl", "stop", "kvm@demo", "kvm@g1"], timeout=120)
        for name in ("demo", "g1"):
            journal = th.journal(f"kvm@{name}.service")
            assert "GUEST-POWEROFF" in journal and f"guest {name} stopped" in journal, name

        # the autopkgtest, and bash completion of guest names
        th.copy_in(REPO / "debian" / "tests" / "smoke", "/var/tmp/smoke", 0o755)
        assert th.run(["/var/tmp/smoke"]).stdout.endswith("smoke: ok\n")
        words = th.exec(["bash", "-c", "source /usr/share/bash-completion/completions/kvmagent; "
                         "COMP_WORDS=(kvmagent stop g); COMP_CWORD=2; _kvmagent; "
                         'echo "${COMPREPLY[@]}"']).stdout.split()
        assert words == ["g1", "g2", "g3"]

        # remove leaves a running guest running; reinstall; it still stops cleanly
        pid = main_pid(th, "kvm@g2.service")
        th.run(["apt-get", *APT, "remove", "-y", "-q", "kvmagent"], env=env)
        assert th.exec(["test", "-e", "/usr/bin/kvmagent"], check=False).returncode == 1
        assert main_pid(th, "kvm@g2.service") == pid
        th.run(["apt-get", *APT, "install", "-y", "-q", f"/var/tmp/{upgrade.name}"], env=env)
        th.exec(["systemctl", "stop", "kvm@g2"], timeout=120)
        assert "guest g2 stopped" in th.journal("kvm@g2.service")

        # purge: kvmagent's state and conffiles go, the admin's guest file stays
        th.exec(["mkdir", "-p", "/var/lib/kvmagent"])
        th.run(["dpkg", "--purge", "kvmagent"], env=env)
        assert th.exec(["test", "-e", "/var/lib/kvmagent"], check=False).returncode == 1
        assert th.exec(["test", "-e", "/etc/kvmagent/kvmagent.toml"], check=False).returncode == 1
        assert th.exec(["test", "-e", "/etc/kvmagent/guests/demo.toml"]).returncode == 0
        assert th.exec(["test", "-e", "/var/lib/guests/vmlinuz"]).returncode == 0
