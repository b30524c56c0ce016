"""Put kvmagent from this checkout into a test host, the way the package
would: /usr/bin/kvmagent, the units in the unit path, a host config, and
guests made from the tiny test guest.  (Tests of the .deb itself install
the built package instead.)"""

from __future__ import annotations

from pathlib import Path

from tests.guest.build import GuestImage
from tests.harness.testhost import TestHost

REPO = Path(__file__).resolve().parents[2]

WRAPPER = """#!/usr/bin/python3
# kvmagent from the checkout bound at /src/kvmagent (test host only)
import sys
sys.path.insert(0, "/src/kvmagent")
from kvmagent.cli import main
sys.exit(main())
"""


def install_checkout(th: TestHost, host_config: str = 'accel = "tcg"\n') -> None:
    th.write_file("/usr/bin/kvmagent", WRAPPER, 0o755)
    for unit in sorted((REPO / "units").glob("*.service")):
        th.copy_in(unit, f"/etc/systemd/system/{unit.name}", 0o644)
    th.write_file("/etc/kvmagent/kvmagent.toml", host_config)
    th.exec(["systemctl", "daemon-reload"])


def guest_toml(image: GuestImage, *, nics: int = 1, cmdline: str = "", extra: str = "",
               top: str = "", description: str = "tiny test guest") -> str:
    """A guest running the tiny test guest (TCG), with NICS bridged NICs."""
    return (f'{top}\ndescription = "{description}"\nmemory = "256M"\n'
            f'[kernel]\nimage = "{image.kernel}"\ninitrd = "{image.initrd}"\n'
            f'cmdline = "console=ttyS0 quiet panic=-1 {cmdline}"\n'
            + "[[nic]]\n" * nics + extra)


def define_guest(th: TestHost, name: str, toml: str, unit_dropin: str | None = None) -> None:
    th.write_file(f"/etc/kvmagent/guests/{name}.toml", toml)
    if unit_dropin is not None:
        th.write_file(f"/etc/systemd/system/kvm@{name}.service.d/50-test.conf", unit_dropin)
        th.exec(["systemctl", "daemon-reload"])
