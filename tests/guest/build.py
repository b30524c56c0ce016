"""Build the tiny test guest (vmlinuz + initrd.gz) from Debian packages.

    /usr/bin/python3 tests/guest/build.py [--cache-dir DIR] [--print]

The kernel is the Debian cloud kernel (KERNEL_PACKAGE), the userland is
busybox-static, and /init is tests/guest/rootfs/init (its comments say what
it does).  The result is cached in
CACHE/guest/<key>/ (the .debs in CACHE/guest/.debs/), where key hashes the package versions, the files under
rootfs/ and this source, so a change to any of them means a rebuild.

Tests never build: they call find_guest(), which only looks in the cache
(no network, no apt-get download) and tells the user to run `make setup`.
Setup calls ensure_guest() (or runs this file), which builds when needed.
Only the stdlib is used; apt-cache, apt-get and dpkg-deb run as argv lists.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Pinned: the ABI number changes with every kernel security update.  This is
# what linux-image-cloud-amd64 depends on in bookworm-security (6.1.192-2).
KERNEL_PACKAGE = "linux-image-6.1.0-56-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"

DEFAULT_CACHE = Path("/var/cache/kvmagent-tests")
CACHE_ENV = "KVMAGENT_TEST_CACHE"  # overrides DEFAULT_CACHE
ROOTFS = Path(__file__).resolve().parent / "rootfs"
EXECUTABLES = frozenset({"init", "sbin/guest-shutdown", "etc/acpi/PWRF/00000080"})

# Loaded with insmod (dependencies first) before acpid starts ...
EARLY_MODULES = ("button", "evdev")
# ... and after it.  Every driver the guest needs is a module (=m).
LATE_MODULES = ("virtio_pci", "virtio_net", "virtio_blk", "virtio_console",
                "ata_piix", "sd_mod", "pvpanic_mmio", "pvpanic_pci")

SETUP_HINT = "run `make setup` (or: /usr/bin/python3 tests/guest/build.py)"


class GuestBuildError(RuntimeError):
    """The image cannot be found or built; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    kernel_version: str  # uname -r in the guest, e.g. 6.1.0-56-cloud-amd64


def cache_root(cache_dir: Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def _run(argv: list[str], cwd: Path | None = None) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"})
    if result.returncode != 0:
        raise GuestBuildError(f"{' '.join(argv)} returned non-zero exit code "
                              f"{result.returncode}: {result.stderr.strip()}")
    return result.stdout


def candidate_versions(cache_dir: Path | None = None) -> dict[str, str]:
    """The versions apt would download (local package lists, no network)."""
    # This image disables apt's binary cache, which makes every apt-cache
    # call take a second; keep one next to ours (0.03 s when fresh).
    apt_cache = cache_root(cache_dir) / "guest" / ".apt"
    if apt_cache.parent.is_dir():  # find_guest() creates nothing
        with contextlib.suppress(OSError):  # apt-cache works without, only slower
            apt_cache.mkdir(exist_ok=True)
    output = _run(["apt-cache", "-o", f"Dir::Cache::pkgcache={apt_cache}/pkgcache.bin",
                   "-o", "Dir::Cache::srcpkgcache=", "policy", KERNEL_PACKAGE, BUSYBOX_PACKAGE])
    versions: dict[str, str] = {}
    package = ""
    for line in output.splitlines():
        if line and not line[0].isspace():
            package = line.rstrip(":")
        key, _, value = line.strip().partition(": ")
        if key == "Candidate" and value and value != "(none)":
            versions[package] = value
    for package in (KERNEL_PACKAGE, BUSYBOX_PACKAGE):
        if package not in versions:
            raise GuestBuildError(f"apt knows no candidate version of {package}; run `apt-get update`, "
                                  "or update KERNEL_PACKAGE in tests/guest/build.py")
    return versions


def inputs_key(kernel_version: str, busybox_version: str) -> str:
    digest = hashlib.sha256()
    digest.update(f"{KERNEL_PACKAGE} {kernel_version}\n{BUSYBOX_PACKAGE} {busybox_version}\n".encode())
    for path in sorted(p for p in ROOTFS.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(ROOTFS)}\n".encode())
        digest.update(path.read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()


def _image_dir(cache_dir: Path | None, versions: dict[str, str]) -> Path:
    key = inputs_key(versions[KERNEL_PACKAGE], versions[BUSYBOX_PACKAGE])
    return cache_root(cache_dir) / "guest" / key


def _load(directory: Path) -> GuestImage | None:
    kernel, initrd, version = (directory / n for n in ("vmlinuz", "initrd.gz", "kernel-version"))
    if not (kernel.is_file() and initrd.is_file() and version.is_file()):
        return None
    return GuestImage(kernel, initrd, version.read_text().strip())


def find_guest(cache_dir: Path | None = None) -> GuestImage:
    """The cached image for the current inputs; never builds or downloads."""
    directory = _image_dir(cache_dir, candidate_versions(cache_dir))
    image = _load(directory)
    if image is None:
        raise GuestBuildError(f"the tiny test guest is not built (no {directory}); {SETUP_HINT}")
    return image


def ensure_guest(cache_dir: Path | None = None) -> GuestImage:
    """The cached image, built first if missing or stale."""
    (cache_root(cache_dir) / "guest").mkdir(parents=True, exist_ok=True)
    versions = candidate_versions(cache_dir)
    directory = _image_dir(cache_dir, versions)
    with open(directory.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time
        image = _load(directory)
        if image is not None:
            return image
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=directory.parent))
        try:
            debs = directory.parent / ".debs"
            kernel_deb = _download(KERNEL_PACKAGE, versions[KERNEL_PACKAGE], debs)
            busybox_deb = _download(BUSYBOX_PACKAGE, versions[BUSYBOX_PACKAGE], debs)
            _build(kernel_deb, busybox_deb, work / "out", work / "tree")
            shutil.rmtree(work / "tree")
            (work / "out").rename(directory)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for stale in directory.parent.iterdir():  # images for older inputs
            if stale.is_dir() and stale != directory and not stale.name.startswith("."):
                shutil.rmtree(stale, ignore_errors=True)
    image = _load(directory)
    assert image is not None
    return image


def _download(package: str, version: str, debs: Path) -> Path:
    deb = debs / f"{package}_{version.replace(':', '%3a')}_amd64.deb"
    if deb.is_file():
        return deb
    debs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=debs) as tmp:
        _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
              f"{package}={version}"], cwd=Path(tmp))
        (Path(tmp) / deb.name).rename(deb)
    for old in debs.glob(f"{package}_*.deb"):  # earlier versions
        if old != deb:
            old.unlink()
    return deb


def _modinfo_depends(ko: Path) -> list[str]:
    """The depends= field of a module's .modinfo ELF section."""
    data = ko.read_bytes()
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + index * shentsize)
        return name, offset, size

    _, strtab, _ = section(shstrndx)
    for index in range(shnum):
        name, offset, size = section(index)
        if data[strtab + name:data.index(b"\0", strtab + name)] == b".modinfo":
            for field in data[offset:offset + size].split(b"\0"):
                if field.startswith(b"depends="):
                    return [d for d in field[8:].decode().split(",") if d]
            return []
    raise GuestBuildError(f"{ko} has no .modinfo section")


def module_load_order(kernel_dir: Path, roots: tuple[str, ...],
                      skip: frozenset[str] = frozenset()) -> list[str]:
    """Paths (relative to lib/modules/KVER) of roots and their dependencies,
    dependencies first, leaving out the modules in skip (already loaded)."""
    index = {ko.name[:-3].replace("-", "_"): ko for ko in kernel_dir.rglob("*.ko")}
    order: list[str] = []
    seen = set(skip)

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        if name not in index:
            raise GuestBuildError(f"kernel module {name} is not in {KERNEL_PACKAGE}")
        for dependency in _modinfo_depends(index[name]):
            visit(dependency)
        order.append(str(index[name].relative_to(kernel_dir.parent)))

    for root in roots:
        visit(root)
    return order


class _Cpio:
    """A reproducible initramfs: newc format, owner root, mtime 0, sorted."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[int, bytes, int, int]] = {}

    def add(self, path: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        parent = os.path.dirname(path)
        if parent and parent not in self.entries:
            self.add(parent, 0o040755)
        self.entries[path] = (mode, data, *rdev)

    def write(self) -> bytes:
        chunks: list[bytes] = []
        items = sorted(self.entries.items())
        items.append(("TRAILER!!!", (0, b"", 0, 0)))
        for ino, (path, (mode, data, major, minor)) in enumerate(items, start=1):
            name = path.encode() + b"\0"
            nlink = 2 if mode & 0o170000 == 0o040000 else 1
            fields = (ino if mode else 0, mode, 0, 0, nlink if mode else 1, 0, len(data),
                      0, 0, major, minor, len(name), 0)
            header = b"070701" + b"".join(b"%08X" % f for f in fields)
            chunks += [header, name, b"\0" * (-(len(header) + len(name)) % 4),
                       data, b"\0" * (-len(data) % 4)]
        return b"".join(chunks)


def _build(kernel_deb: Path, busybox_deb: Path, out: Path, tree: Path) -> None:
    tree.mkdir(parents=True)
    _run(["dpkg-deb", "-x", str(kernel_deb), str(tree / "kernel")])
    _run(["dpkg-deb", "-x", str(busybox_deb), str(tree / "busybox")])
    (modules_dir,) = (tree / "kernel/lib/modules").iterdir()
    kver = modules_dir.name
    early = module_load_order(modules_dir / "kernel", EARLY_MODULES)
    early_names = frozenset(Path(p).name[:-3].replace("-", "_") for p in early)
    late = module_load_order(modules_dir / "kernel", LATE_MODULES, skip=early_names)

    cpio = _Cpio()
    for directory in ("dev", "proc", "sys", "run", "tmp", "root", "mnt", "var/log"):
        cpio.add(directory, 0o040755)
    cpio.add("dev/console", 0o020600, rdev=(5, 1))  # no mknod: no root needed
    busybox = tree / "busybox/bin/busybox"
    cpio.add("bin/busybox", 0o100755, busybox.read_bytes())
    for applet in _run([str(busybox), "--list-full"]).split():
        if applet != "bin/busybox":
            cpio.add(applet, 0o120777, b"/bin/busybox")
    for path in sorted(p for p in ROOTFS.rglob("*") if p.is_file()):
        relative = str(path.relative_to(ROOTFS))
        cpio.add(relative, 0o100755 if relative in EXECUTABLES else 0o100644, path.read_bytes())
    for module in early + late:
        cpio.add(f"lib/modules/{kver}/{module}", 0o100644, (modules_dir / module).read_bytes())
    cpio.add("etc/modules.early", 0o100644, "".join(m + "\n" for m in early).encode())
    cpio.add("etc/modules.late", 0o100644, "".join(m + "\n" for m in late).encode())

    out.mkdir(parents=True)
    initrd = gzip.compress(cpio.write(), compresslevel=9, mtime=0)
    (out / "initrd.gz").write_bytes(initrd)
    shutil.copyfile(tree / f"kernel/boot/vmlinuz-{kver}", out / "vmlinuz")
    (out / "kernel-version").write_text(kver + "\n")
    manifest = {"kernel_package": KERNEL_PACKAGE, "kernel_deb": kernel_deb.name,
                "busybox_deb": busybox_deb.name, "kernel_version": kver,
                "modules": early + late,
                "initrd_sha256": hashlib.sha256(initrd).hexdigest()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build or find the tiny test guest.")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"cache directory (default ${CACHE_ENV} or {DEFAULT_CACHE})")
    parser.add_argument("--print", action="store_true",
                        help="print KERNEL=, INITRD= and KERNEL_VERSION= lines")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        image = ensure_guest(args.cache_dir)
    except GuestBuildError as e:
        print(f"build.py: {e}", file=sys.stderr)
        return 1
    if args.print:
        print(f"KERNEL={image.kernel}\nINITRD={image.initrd}\nKERNEL_VERSION={image.kernel_version}")
    else:
        print(f"tiny guest ready in {time.monotonic() - started:.1f} s: {image.kernel.parent}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
