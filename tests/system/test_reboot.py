"""Host shutdown and boot with guests: three enabled guests get their ACPI
power button in parallel at shutdown and power off cleanly (none killed);
after the reboot the persisted bridge and all three guests are back.
A persistent test host (harness notes, section 7) keeps /etc and the
journal across the reboot."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import pytest

from tests.guest.build import GuestBuildError, find_guest
from tests.harness import TestHost
from tests.harness.install import REPO, define_guest, guest_toml, install_checkout
from tests.system.test_kvm_service import wait_for, wait_state

pytestmark = pytest.mark.system
GUESTS = ("r1", "r2", "r3")
STOP_TIMEOUT = 90.0  # the host's stop_timeout by default (kvmagent.toml(5))


def _stamp(line: str) -> datetime:
    return datetime.strptime(line.split(" vm ")[0], "%b %d %H:%M:%S.%f")


def test_shutdown_powers_guests_off_in_parallel_and_boot_brings_them_back(
        system_ok: None, tmp_path: Path) -> None:
    try:
        image = find_guest()
    except GuestBuildError as e:
        pytest.fail(str(e), pytrace=False)
    with TestHost(root="host", src=REPO, persistent=True, persist_dir=tmp_path / "persist",
                  journal_dir=tmp_path, stop_timeout=120) as th:
        install_checkout(th)
        th.run(["kvmagent", "bridge", "ensure", "br-kvm", "--address", "10.77.0.1/24",
                "--persist"])
        th.exec(["systemctl", "enable", "kvmagent-bridges.service", "machines.target"])
        th.exec(["mkdir", "-p", "/var/log/journal"])  # keep the first boot's journal
        th.exec(["systemctl", "restart", "systemd-journald"])
        for i, name in enumerate(GUESTS):
            define_guest(th, name, guest_toml(
                image, cmdline=f"guest.ip=10.77.0.{10 + i}/24 guest.ping=10.77.0.1"))
            th.exec(["systemctl", "enable", "--now", f"kvm@{name}"], timeout=120)
        for name in GUESTS:
            wait_for(th, f"kvm@{name}.service", r"GUEST-PING-OK")
        th.reboot()

        previous = th.exec(["journalctl", "-b", "-1", "-o", "short-precise", "--no-pager",
                            *[f"--unit=kvm@{n}.service" for n in GUESTS]]).stdout
        pressed = {}
        for name in GUESTS:
            lines = [ln for ln in previous.splitlines()
                     if f"ACPI power button pressed for guest {name}" in ln]
            assert lines, previous[-3000:]
            pressed[name] = _stamp(lines[0])
            assert re.search(rf"{name}-console\[\d+\]: GUEST-POWEROFF", previous)
            assert f"guest {name} stopped" in previous
            assert f"guest {name} did not power off" not in previous
            assert f"kvm@{name}.service: Failed" not in previous
        # In parallel: every button pressed before the first guest's stop
        # timeout ran out, i.e. none waited for another to power off.  (A
        # tight interval would flake with three TCG guests on two busy cores.)
        spread = (max(pressed.values()) - min(pressed.values())).total_seconds()
        assert spread < STOP_TIMEOUT, f"power buttons pressed {spread:.1f} s apart"
        print(f"ACPI power buttons pressed within {spread:.1f} s of each other")

        for name in GUESTS:
            wait_state(th, f"kvm@{name}.service", ("active",), timeout=120)
            wait_for(th, f"kvm@{name}.service", r"GUEST-PING-OK")
        bridges = th.run(["kvmagent", "bridge", "show"]).stdout
        assert "br-kvm: up" in bridges and "10.77.0.1/24" in bridges
        for name in GUESTS:
            assert f"guest {name}" in bridges
