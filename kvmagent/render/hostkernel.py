"""`kvmagent kernel NAME --from-host [VERSION]`, as plain data: which of the
host's kernels, where its copy goes, and the drop-in that points the guest
at it.  The guest's own file is the admin's: kvmagent writes a drop-in,
guests/NAME.toml.d/kernel.toml, which sets [kernel] image and initrd (a
later drop-in, or none of the admin's, overrides it: drop-ins are read in
lexical order)."""

from __future__ import annotations

import re
from pathlib import Path

BOOT = Path("/boot")
GUEST_KERNELS = BOOT / "kvm"  # /boot/kvm/NAME/vmlinuz, as the seed's scripts kept them
DROPIN = "kernel.toml"
IMAGE, INITRD = "vmlinuz", "initrd.img"


def version_key(version: str) -> list[tuple[int, str]]:
    """Orders kernel versions as people read them: 6.1.0-18 before 6.1.0-27."""
    return [(int(part), "") if part.isdigit() else (-1, part)
            for part in re.split(r"(\d+)", version) if part]


def installed(names: list[str]) -> list[str]:
    """The kernel versions among /boot's file NAMES (vmlinuz-VERSION), oldest first."""
    found = [n.removeprefix("vmlinuz-") for n in names if n.startswith("vmlinuz-")
             and not n.endswith((".dpkg-tmp", ".dpkg-new", ".bak"))]
    return sorted(found, key=version_key)


def pick_version(versions: list[str], running: str) -> str | None:
    """The running kernel if it is installed, else the newest one."""
    if running in versions:
        return running
    return versions[-1] if versions else None


def guest_kernel_dir(name: str, base: Path = GUEST_KERNELS) -> Path:
    return base / name


def dropin_text(name: str, version: str, kernel_dir: Path, initrd: bool) -> str:
    lines = [f"# Written by `kvmagent kernel {name} --from-host {version}`: the host's kernel",
             f"# {version}, copied into {kernel_dir}/, where no package upgrade of the host",
             "# removes it.  Remove this file to boot what the guest's own file says.",
             "[kernel]",
             f'image = "{kernel_dir / IMAGE}"']
    if initrd:
        lines.append(f'initrd = "{kernel_dir / INITRD}"')
    return "\n".join(lines) + "\n"


def package_kernel_paths(image: Path | None, initrd: Path | None,
                         boot: Path = BOOT) -> list[tuple[str, Path, Path]]:
    """(key, path, the file whose package counts) for a guest's kernel files
    straight out of /boot: vmlinuz-VERSION belongs to its package;
    initrd.img-VERSION is made by update-initramfs and removed with the
    package of vmlinuz-VERSION."""
    out = []
    for key, path in (("kernel.image", image), ("kernel.initrd", initrd)):
        if path is None or path.parent != boot:
            continue
        if path.name.startswith("vmlinuz-"):
            out.append((key, path, path))
        elif path.name.startswith("initrd.img-"):
            out.append((key, path, boot / ("vmlinuz-" + path.name.removeprefix("initrd.img-"))))
    return out
