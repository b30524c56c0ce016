"""Put kvmagent into a test host: the package built from this tree
(build_deb, install_package), or the checkout itself the way the package
would lay it out (install_checkout: /usr/bin/kvmagent, the units, a host
config); and guests made from the tiny test guest."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from tests.guest.build import GuestImage
from tests.harness.testhost import TestHost

REPO = Path(__file__).resolve().parents[2]
BUILD_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # never a pyenv python3 in the build

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
    th.write_file("/etc/systemd/system-generators/kvmagent-generator",
                  WRAPPER.replace("kvmagent.cli", "kvmagent.generator"), 0o755)
    # the user QEMU runs as, as the package's postinst makes it
    th.copy_in(REPO / "debian" / "kvmagent.sysusers", "/usr/lib/sysusers.d/kvmagent.conf", 0o644)
    th.exec(["systemd-sysusers", "kvmagent.conf"])
    th.copy_in(REPO / "debian" / "kvmagent.tmpfiles", "/usr/lib/tmpfiles.d/kvmagent.conf", 0o644)
    th.exec(["systemd-tmpfiles", "--create", "kvmagent.conf"])
    th.copy_in(REPO / "catalog" / "kvmagent.catalog",
               "/usr/lib/systemd/catalog/kvmagent.catalog", 0o644)
    th.exec(["journalctl", "--update-catalog"])
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


def build_deb(work: Path, version: str | None = None) -> Path:
    """The package of this tree (its tracked files, as they are now), as
    VERSION if given (with a changed unit file, for upgrade tests); built
    without its tests (DEB_BUILD_OPTIONS=nocheck): they run on their own."""
    src = work / f"kvmagent-{version or 'tree'}"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name)
    if version is None:
        return _dpkg_buildpackage(src, work)
    init = src / "kvmagent" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"',
                           init.read_text()))
    unit = src / "units" / "kvm@.service"  # a changed unit file: systemd must reload it
    unit.write_text(unit.read_text() + f"# kvmagent {version}\n")
    changelog = src / "debian" / "changelog"
    changelog.write_text(re.sub(r"^kvmagent \([^)]*\)", f"kvmagent ({version})",
                                changelog.read_text()))
    return _dpkg_buildpackage(src, work)


def _dpkg_buildpackage(src: Path, work: Path) -> Path:
    before = set(work.glob("kvmagent_*_all.deb"))
    subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src, check=True,
                   capture_output=True, env={"PATH": BUILD_PATH, "DEB_BUILD_OPTIONS": "nocheck",
                                             "HOME": str(work)})
    (built,) = set(work.glob("kvmagent_*_all.deb")) - before
    return built


def install_package(th: TestHost, deb: Path, host_config: str = 'accel = "tcg"\n') -> None:
    """Install the .deb with dpkg: its dependencies are on the host root that
    this test host overlays (tests/system/test_package.py installs it with
    apt on a clean root, where they are not)."""
    th.copy_in(deb, f"/var/tmp/{deb.name}", 0o644)
    th.run(["dpkg", "-i", f"/var/tmp/{deb.name}"], env={"DEBIAN_FRONTEND": "noninteractive"},
           timeout=600)
    th.write_file("/etc/kvmagent/kvmagent.toml.d/50-test.toml", host_config)
