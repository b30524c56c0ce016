"""The unprivileged user QEMU runs as (kvmagent.toml: qemu_user).

QEMU gets everything of its guest as file descriptors from the supervisor
(root): taps, vhost-net, QMP, the console and the disks (-add-fd, so the
guest's LVM volumes and image files keep their owners and modes, and QEMU
cannot open another guest's).  What it still opens by name: the kernel and
initrd of direct kernel boot, its firmware under /usr/share, and /dev/kvm —
reached through the group that owns /dev/kvm, added to QEMU's groups.  The
checks here run before QEMU starts, so a file the user cannot read is a
clear error (exit 5), not a QEMU message."""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from kvmagent.errors import host_error

KVM_DEVICE = "/dev/kvm"


@dataclass(frozen=True)
class QemuUser:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary: /dev/kvm's group

    @property
    def is_root(self) -> bool:
        return self.uid == 0


def resolve(name: str, origin: str = "default") -> QemuUser:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        where = "kvmagent.toml (default)" if origin == "default" else origin
        raise host_error(f"{where}: qemu_user = {name!r}: no such user",
                         "the kvmagent package creates kvmagent-qemu (systemd-sysusers "
                         "kvmagent.conf); or set qemu_user to an existing user") from None
    groups: list[int] = []
    try:
        kvm_gid = os.stat(KVM_DEVICE).st_gid
    except OSError:
        kvm_gid = 0
    if kvm_gid and kvm_gid != pw.pw_gid:
        groups.append(kvm_gid)
    return QemuUser(name, pw.pw_uid, pw.pw_gid, tuple(groups))


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def unreadable(user: QemuUser, files: list[tuple[Path, int]]) -> list[Path]:
    """Those of FILES (path, os.R_OK / os.R_OK | os.W_OK) that USER cannot
    access, asked of the kernel by a forked child running as USER."""
    if user.is_root or not files:
        return []
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become the user, ask, report indexes, exit
        code = 0
        try:
            os.close(r)
            os.setgroups(list(user.groups))
            os.setresgid(user.gid, user.gid, user.gid)
            os.setresuid(user.uid, user.uid, user.uid)
            bad = [str(i) for i, (path, mode) in enumerate(files) if not os.access(path, mode)]
            os.write(w, " ".join(bad).encode())
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return [path for path, _ in files]
    return [files[int(i)][0] for i in out.split()]


def check_access(user: QemuUser, files: list[tuple[Path, int]], what: str) -> None:
    bad = unreadable(user, files)
    if bad:
        raise host_error(f"QEMU runs as user {user.name}, who cannot read {bad[0]} ({what})",
                         f"make it readable for {user.name} (e.g. chmod o+r, or a group "
                         f"{user.name} is in), or set qemu_user in kvmagent.toml")
