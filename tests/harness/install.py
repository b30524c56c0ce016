"""Put kvmagent into a test host: the package built from this tree
(build_deb, install_package), or the checkout itself the way the package
would lay it out (install_checkout: /usr/bin/kvmagent, the units, a host
config); and guests made from the tiny test guest."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

from tests.guest.build import GuestImage
from tests.harness import buildroot, rootfs
from tests.harness.testhost import TestHost

REPO = Path(__file__).resolve().parents[2]
# git on this checkout, whoever owns it: `sudo make check` in one's own clone
# runs git as root on a tree root does not own, which git refuses otherwise
GIT = ["git", "-c", f"safe.directory={REPO}", "-C", str(REPO)]

WRAPPER = """#!/usr/bin/python3
# kvmagent from the checkout bound at /src/kvmagent (test host only)
import sys
sys.path.insert(0, "/src/kvmagent")
from kvmagent.cli.main import main
sys.exit(main())
"""


def install_checkout(th: TestHost, host_config: str = 'accel = "tcg"\n') -> None:
    th.write_file("/usr/bin/kvmagent", WRAPPER, 0o755)
    for unit in sorted((REPO / "units").glob("*.service")):
        th.copy_in(unit, f"/etc/systemd/system/{unit.name}", 0o644)
    th.write_file("/etc/systemd/system-generators/kvmagent-generator",
                  WRAPPER.replace("kvmagent.cli.main", "kvmagent.cli.generator"), 0o755)
    # the OCF resource agent, where the package puts it (ocf/guest)
    th.exec(["mkdir", "-p", "/usr/lib/ocf/resource.d/kvmagent"])
    th.write_file("/usr/lib/ocf/resource.d/kvmagent/guest",
                  WRAPPER.replace("kvmagent.cli.main", "kvmagent.cli.ocf"), 0o755)
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


def source_tree(work: Path, version: str | None = None, commit: str | None = None) -> Path:
    """This tree's tracked files (as they are now), or those of an earlier commit,
    copied under work; as VERSION if given, with a changed unit file too
    (upgrade tests: systemd must reload it)."""
    src = work / f"kvmagent-{version or 'tree'}"
    shutil.rmtree(src, ignore_errors=True)  # a copy an earlier, failed build left
    if commit is not None:
        src.mkdir(parents=True)
        archive = subprocess.run([*GIT, "archive", commit], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    else:
        files = subprocess.run([*GIT, "ls-files", "-z"], check=True,
                               capture_output=True).stdout.decode().split("\0")
        for name in filter(None, files):
            if (REPO / name).exists():  # not a file deleted in the work tree
                (src / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, src / name)
    if version is None:
        return src
    init = src / "kvmagent" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"',
                           init.read_text()))
    unit = src / "units" / "kvm@.service"
    unit.write_text(unit.read_text() + f"# kvmagent {version}\n")
    changelog = src / "debian" / "changelog"
    changelog.write_text(re.sub(r"^kvmagent \([^)]*\)", f"kvmagent ({version})",
                                changelog.read_text()))
    return src


def build_deb(work: Path, version: str | None = None, release: str = "debian", *,
              commit: str | None = None, check: bool = False, lint: bool = False) -> Path:
    """The package of this tree (or of an earlier commit), built in the clean build
    root of release (tests/harness/buildroot.py), into work/RELEASE/.  By default
    without its build-time tests and lintian: test_package.py runs those on their own."""
    release = rootfs.resolve(release)
    deb, _ = buildroot.build_package(release, source_tree(work, version, commit),
                                     work / release, check=check, lint=lint)
    return deb


# apt inside a test host of a release's root (no network): the offline repository
# of kvmagent's runtime dependencies, bound at /mnt/debs (rootfs.cached_debs), is
# its only source.
OFFLINE_APT = ["-o", "Dir::Etc::SourceList=/etc/apt/offline.list", "-o", "Dir::Etc::SourceParts=-",
               "-o", "Dir::State::Lists=/var/tmp/offline-lists"]
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}


def offline_apt(th: TestHost) -> None:
    """Point apt at /mnt/debs alone (once per test host)."""
    th.write_file("/etc/apt/offline.list", "deb [trusted=yes] file:/mnt/debs ./\n")
    th.exec(["mkdir", "-p", "/var/tmp/offline-lists/partial"])
    th.run(["apt-get", *OFFLINE_APT, "update", "-q"])


# What kvmagent needs at run time, from a release's own packages: debian/control's
# Depends but systemd (the test host's init: never purged) and its Recommends
# (qemu-img: clone, and migrate --copy-storage's qcow2 images), what apt installs
# with it by default.  tests/system/test_package.py keeps them in step with
# debian/control; the test hosts get them all (RUNTIME_DEPENDS).
DEPENDS = ["python3-pystemd", "python3-pydbus", "python3-pyroute2", "qemu-system-x86",
           "systemd-container"]
RECOMMENDS = ["qemu-utils"]
RUNTIME_DEPENDS = DEPENDS + RECOMMENDS


def install_on_release(th: TestHost, bridge_address: str = "10.77.0.1/24") -> None:
    """This checkout on a test host of a release's root (once per test host): its
    runtime dependencies from the offline repository at /mnt/debs, and br-kvm."""
    if th.exec(["test", "-e", "/usr/bin/kvmagent"], check=False).returncode != 0:
        offline_apt(th)
        th.run(["apt-get", *OFFLINE_APT, "install", "-y", "-q", "--no-install-recommends",
                *RUNTIME_DEPENDS], env=APT_ENV, timeout=600)
        install_checkout(th)
        th.run(["kvmagent", "bridge", "ensure", "br-kvm", "--address", bridge_address])


def apt_install(th: TestHost, deb: Path) -> str:
    """Install the .deb with apt, its Depends from the offline repository; apt's output."""
    th.copy_in(deb, f"/var/tmp/{deb.name}", 0o644)
    return str(th.run(["apt-get", *OFFLINE_APT, "install", "-y", "-q", "--no-install-recommends",
                       f"/var/tmp/{deb.name}"], env=APT_ENV, timeout=600).stdout)


def install_package(th: TestHost, deb: Path, host_config: str = 'accel = "tcg"\n') -> None:
    """Install the .deb into a test host of a release's root (with the offline
    repository at /mnt/debs), as an admin would: apt, its Depends from the
    repository; and a host configuration for the test guests."""
    offline_apt(th)
    apt_install(th, deb)
    th.write_file("/etc/kvmagent/kvmagent.toml.d/50-test.toml", host_config)


def copy_guest(th: TestHost, image: GuestImage) -> GuestImage:
    """The tiny guest's kernel and initrd inside the test host (a release's root
    does not see this machine's cache), at the paths a host's guests use."""
    inside = dataclasses.replace(image, kernel=Path("/var/lib/guests/vmlinuz"),
                                 initrd=Path("/var/lib/guests/initrd.gz"))
    th.copy_in(image.kernel, str(inside.kernel), 0o644)
    th.copy_in(image.initrd, str(inside.initrd), 0o644)
    return inside
