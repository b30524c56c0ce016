"""The Debian package on a clean Debian 12 and a clean Debian 13.

Built as Debian's builders build it, in a clean build root of each release
(tests/harness/buildroot.py: only build-essential and the Build-Depends, as
a user who is not root, no network), with its build-time tests, and
lintian --pedantic of that release on the result.  Then installed with apt
into a fresh systemd test host on that release's debootstrap root, whose
only package source is the offline repository of Debian packages made by
`make setup` (the container has no network); the runtime dependencies are
purged first, so apt must bring every one of them in through Depends.  A
guest's whole life follows: start, its console in the journal, ACPI stop, a
crash restarted and counted, an upgrade under running guests, a reboot of
the host with an enabled guest, remove and purge.

The package first installed is the previous release's (PREVIOUS, as 0.0.9), built on
Debian 12: its supervisors, started before the upgrade, must still stop
their guests and record it with the new package's files in place.  The
upgrade is to this tree built on Debian 12 on both releases (admins copy
packages between hosts); after a remove, the package built on the host's
own release is installed and runs a guest.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.harness import HarnessError, TestHost, buildroot, rootfs
from tests.harness.install import (APT_ENV, DEPENDS, OFFLINE_APT, RECOMMENDS, REPO,
                                   apt_install, build_deb, copy_guest, guest_toml, offline_apt,
                                   source_tree)
from tests.system.test_kvm_service import qemu_pid, show, wait_for, wait_restarts, wait_state

pytestmark = pytest.mark.system
RELEASES = list(rootfs.RELEASES)
BUILT_ON = RELEASES[0]  # the packages copied to every release: built on Debian 12
# The release before the code under test: what an admin upgrades from.  Its
# supervisors import some modules only when they stop a guest, from the
# files then installed, so a move of a module or a name must be tried from
# it, not from this tree.  Moved forward when a release is made (a full
# clone of the repository has it; git archive of it must work).
PREVIOUS = "5422c90"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("deb")


_clean: dict[str, tuple[Path, str]] = {}


def clean_build(work: Path, release: str) -> tuple[Path, str]:
    """0.1.0 as Debian's builders would build it, tests run, then lintian (once per
    release): the .deb and lintian's report."""
    if release not in _clean:
        try:
            _clean[release] = buildroot.build_package(
                release, source_tree(work / "src", "0.1.0"), work / release)
        except HarnessError as e:
            pytest.fail(str(e), pytrace=False)
    return _clean[release]


_copied: list[tuple[Path, Path]] = []


def copied_builds(work: Path) -> tuple[Path, Path]:
    """The previous release's package (as 0.0.9) and this tree's (as
    0.1.0+upgrade1), built on Debian 12 (once for both releases)."""
    if not _copied:
        try:
            _copied.append((build_deb(work, "0.0.9", BUILT_ON, commit=PREVIOUS),
                            build_deb(work, "0.1.0+upgrade1", BUILT_ON)))
        except HarnessError as e:
            pytest.fail(str(e), pytrace=False)
    return _copied[0]


def control_field(field: str) -> list[str]:
    """The package names of a field of debian/control's binary package
    (substitution variables left out)."""
    text = (REPO / "debian" / "control").read_text()
    binary = text.split("\nPackage:", 1)[1]
    found = re.search(rf"^{field}:(.*(?:\n[ \t].*)*)", binary, re.M)
    assert found, field
    return [name.split()[0] for name in found[1].split(",")
            if name.strip() and not name.strip().startswith("$")]


def test_the_test_hosts_get_what_the_package_depends_on() -> None:
    """The test hosts install the package's Depends and Recommends from
    tests.harness.install's lists: the same as debian/control's (systemd
    aside, every test host's init)."""
    assert sorted(DEPENDS + ["systemd"]) == sorted(control_field("Depends"))
    assert sorted(RECOMMENDS) == sorted(control_field("Recommends"))


@pytest.mark.parametrize("release", RELEASES)
def test_builds_in_a_clean_root_with_its_tests_and_passes_lintian(
        system_ok: None, work: Path, release: str) -> None:
    deb, report = clean_build(work, release)
    assert deb.name == "kvmagent_0.1.0_all.deb"
    # --fail-on error,warning would have failed the build: nothing of either, and the
    # files live under /usr/lib (Debian 13's lintian: aliased-location under /lib)
    assert not re.search(r"^[EW]: ", report, re.M), report
    assert re.search(r"^build-time tests: +\d+ passed", report, re.M), report
    assert "failed" not in report.splitlines()[0], report
    # debian/rules runs mypy and flake8 of this release (flake8 prints nothing when clean)
    assert re.search(r"^build-time types: Success: no issues found in \d+ source files",
                     report, re.M), report
    contents = deb_contents(deb)
    assert " ./usr/lib/systemd/system/kvm@.service\n" in contents and " ./lib/" not in contents
    # the OCF resource agent (#21), executable
    assert re.search(r"^-rwxr-xr-x .* \./usr/lib/ocf/resource\.d/kvmagent/guest$", contents,
                     re.M), contents
    print(f"lintian --pedantic on {release}:\n{report or '(nothing)'}")


def deb_contents(deb: Path) -> str:
    import subprocess
    return subprocess.run(["dpkg-deb", "--contents", str(deb)], check=True,
                          capture_output=True, text=True).stdout


def main_pid(th: TestHost, unit: str) -> str:
    return show(th, unit, "MainPID")["MainPID"]


@pytest.mark.parametrize("release", RELEASES)
def test_a_guests_life_on_a_clean_host(system_ok: None, work: Path, guest_image, release: str,
                                       tmp_path: Path) -> None:
    own, _ = clean_build(work, release)
    deb, upgrade = copied_builds(work)
    try:
        debs = rootfs.cached_debs(release)
    except HarnessError as e:
        pytest.fail(str(e), pytrace=False)
    with TestHost(root=release, bind_ro=[(debs, "/mnt/debs")], journal_dir=tmp_path,
                  persistent=True, persist_dir=tmp_path / "persist", stop_timeout=120) as th:
        assert f'VERSION_ID="{rootfs.RELEASES[release]}"' in th.exec(
            ["cat", "/etc/os-release"]).stdout
        th.run(["apt-get", "purge", "-y", "-q", *DEPENDS], env=APT_ENV)
        th.run(["apt-get", "autoremove", "--purge", "-y", "-q"], env=APT_ENV)
        assert th.exec(["test", "-e", "/usr/lib/python3/dist-packages/pyroute2"],
                       check=False).returncode == 1
        offline_apt(th)
        install = apt_install(th, deb)
        for dep in DEPENDS:
            assert f"Setting up {dep} " in install, dep
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
        image = copy_guest(th, guest_image)
        th.write_file("/etc/kvmagent/kvmagent.toml.d/50-test.toml", 'accel = "tcg"\n')
        th.write_file("/etc/kvmagent/guests/demo.toml", guest_toml(image, nics=0))
        assert th.run(["kvmagent", "validate", "--host"]).stdout == "demo: ok\n"
        for name in ("g1", "g2", "g3"):
            th.exec(["cp", "/etc/kvmagent/guests/demo.toml", f"/etc/kvmagent/guests/{name}.toml"])
        for name in ("demo", "g1"):
            th.exec(["systemctl", "start", f"kvm@{name}"], timeout=120)
            wait_for(th, f"kvm@{name}.service", "GUEST-READY")  # the console, in the journal
        assert "demo" in th.exec(["machinectl", "list", "--no-legend"]).stdout

        # QEMU dies: systemd restarts the guest and counts it
        first = qemu_pid(th, "g1")
        th.exec(["kill", "-9", str(first)])
        wait_for(th, "kvm@g1.service", "was killed by signal 9")
        wait_restarts(th, "kvm@g1.service", 1)
        assert qemu_pid(th, "g1") != first
        wait_for(th, "kvm@g1.service", "GUEST-READY(.|\n)*GUEST-READY")  # booted again
        before = {n: main_pid(th, f"kvm@{n}.service") for n in ("demo", "g1")}
        qemus = {n: qemu_pid(th, n) for n in ("demo", "g1")}

        # upgrade under two running guests: they keep their supervisor and QEMU.
        # As from a kvmagent before /run/kvmagent/boot-id: postinst names this
        # boot as that version did (its guests' events say so), tmpfiles does not
        th.exec(["rm", "/run/kvmagent/boot-id"])
        apt_install(th, upgrade)
        assert th.run(["kvmagent", "--version"]).stdout == "kvmagent 0.1.0+upgrade1\n"
        old_name = th.exec(["python3", "-c", "from kvmagent.host.state import kernel_boot_id; "
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
        assert "kvmagent 0.0.9)" in th.journal("kvm@demo.service")
        # the old supervisors, their files replaced, still stop their guests over
        # ACPI, and the stop is recorded
        th.exec(["systemctl", "stop", "kvm@demo", "kvm@g1"], timeout=120)
        for name in ("demo", "g1"):
            journal = th.journal(f"kvm@{name}.service")
            assert "GUEST-POWEROFF" in journal and f"guest {name} stopped" in journal, name
            assert show(th, f"kvm@{name}.service", "Result")["Result"] == "success", name
            last = json.loads(th.run(["kvmagent", "history", name, "--json"]).stdout)["events"][-1]
            assert (last["event"], last["reason"]) == ("stopped", "admin"), (name, last)

        # the autopkgtest, and bash completion of guest names
        th.copy_in(REPO / "debian" / "tests" / "smoke", "/var/tmp/smoke", 0o755)
        assert th.run(["/var/tmp/smoke"]).stdout.endswith("smoke: ok\n")
        words = th.exec(["bash", "-c", "source /usr/share/bash-completion/completions/kvmagent; "
                         "COMP_WORDS=(kvmagent stop g); COMP_CWORD=2; _kvmagent; "
                         'echo "${COMPREPLY[@]}"']).stdout.split()
        assert words == ["g1", "g2", "g3"]

        # a host reboot: the running guest is powered off over ACPI, and an
        # enabled guest comes back at boot
        th.exec(["systemctl", "enable", "kvm@g3", "machines.target"])
        th.exec(["mkdir", "-p", "/var/log/journal"])  # keep this boot's journal
        th.exec(["systemctl", "restart", "systemd-journald"])
        th.reboot()
        previous = th.exec(["journalctl", "-b", "-1", "--no-pager", "-u", "kvm@g2"]).stdout
        assert "GUEST-POWEROFF" in previous and "guest g2 stopped" in previous, previous[-3000:]
        wait_state(th, "kvm@g3.service", ("active",), timeout=120)
        wait_for(th, "kvm@g3.service", "GUEST-READY")
        assert th.exec(["systemctl", "is-active", "kvm@g2"], check=False).stdout == "inactive\n"

        # remove leaves running guests running; the package built on this host's
        # own release goes in: its postinst moves the three supervisors to its
        # code (kvmagent reload), the guests untouched; they still stop cleanly
        running = ("g3", "demo", "g1")
        for name in running[1:]:
            th.exec(["systemctl", "start", f"kvm@{name}"], timeout=120)
        pids = {n: (main_pid(th, f"kvm@{n}.service"), qemu_pid(th, n)) for n in running}
        th.run(["apt-get", *OFFLINE_APT, "remove", "-y", "-q", "kvmagent"], env=APT_ENV)
        assert th.exec(["test", "-e", "/usr/bin/kvmagent"], check=False).returncode == 1
        assert {n: (main_pid(th, f"kvm@{n}.service"), qemu_pid(th, n)) for n in running} == pids
        apt_install(th, own)
        assert th.run(["kvmagent", "--version"]).stdout == "kvmagent 0.1.0\n"
        for name in running:
            assert (main_pid(th, f"kvm@{name}.service"), qemu_pid(th, name)) == pids[name]
            doc = json.loads(th.run(["kvmagent", "status", "--json", name]).stdout)
            assert doc["supervisor"]["kvmagent_version"] == "0.1.0", (name, doc)
            assert doc["supervisor"]["qemu_started_by"] == "0.1.0+upgrade1", (name, doc)
            assert doc["restarts"] == (1 if name == "g1" else 0), (name, doc)
            assert ("supervisor reloaded, kvmagent 0.1.0+upgrade1 -> 0.1.0"
                    in th.journal(f"kvm@{name}.service")), name
        th.exec(["systemctl", "stop", *(f"kvm@{n}" for n in running)], timeout=120)
        for name in running:
            assert f"guest {name} stopped" in th.journal(f"kvm@{name}.service"), name
        th.exec(["systemctl", "start", "kvm@g2"], timeout=120)
        wait_for(th, "kvm@g2.service", r"kvmagent 0\.1\.0\)(.|\n)*GUEST-READY")
        th.exec(["systemctl", "stop", "kvm@g2"], timeout=120)
        assert show(th, "kvm@g2.service", "Result")["Result"] == "success"

        # purge: kvmagent's state and conffiles go, the admin's guest file stays
        th.exec(["mkdir", "-p", "/var/lib/kvmagent"])
        th.run(["dpkg", "--purge", "kvmagent"], env=APT_ENV)
        assert th.exec(["test", "-e", "/var/lib/kvmagent"], check=False).returncode == 1
        assert th.exec(["test", "-e", "/etc/kvmagent/kvmagent.toml"], check=False).returncode == 1
        assert th.exec(["test", "-e", "/etc/kvmagent/guests/demo.toml"]).returncode == 0
        assert th.exec(["test", "-e", "/var/lib/guests/vmlinuz"]).returncode == 0
