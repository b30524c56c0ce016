"""Second-stage checks: does this host have what the guest needs?  QEMU,
kernel and disk files, a working /dev/kvm, the bridges.  Read-only: nothing
is created or changed.  The result is plain data (HostFacts) for the pure
argv generation, plus the problems found, each a KvmagentError.  What the
installed QEMU supports is asked of it (kvmagent.host.qemucaps, cached)."""

from __future__ import annotations

import errno
import functools
import os
import socket
import stat
from pathlib import Path
from typing import Callable

from kvmagent.config.model import Accel, Cache, Guest, HostConfig, NicMode
from kvmagent.config.values import format_size
from kvmagent.errors import KvmagentError, host_error
from kvmagent.host.pinfile import pin_file, read_pin
from kvmagent.host.qemucaps import QemuCaps, capabilities, qemu_notices, qemu_problems
from kvmagent.paths import Paths
from kvmagent.render.pin import Pin, pinned_machine
from kvmagent.render.qemu import HostFacts

KvmProbe = Callable[[], tuple[bool, str]]
CapsProbe = Callable[[Path], QemuCaps]  # may raise a host error


def probe_direct_io(path: Path) -> bool:
    """Whether PATH can be opened with O_DIRECT (cache=none).  Block devices
    always can; tmpfs on Debian 12's 6.1 kernel cannot.  Opens read-only and
    closes again: changes nothing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    return True


@functools.cache
def default_kvm_probe() -> tuple[bool, str]:
    """Once per process: the probe forks a child and may wait 2 s for it, and
    `validate --host` of many guests, or a start waiting for its devices,
    would otherwise pay that for every check."""
    from kvmagent.host.kvmprobe import kvm_usable  # forks a child; only when needed
    return kvm_usable()


def default_caps_probe(qemu: Path) -> QemuCaps:
    """Cached in the state directory: kvm@.service's sandbox can write
    there (StateDirectory=), not to /run/kvmagent (ProtectSystem=strict)."""
    return capabilities(qemu, Paths.from_env().state_dir)


def resolve_accel(guest: Guest, host: HostConfig, probe: KvmProbe,
                  problems: list[KvmagentError], notices: list[str]) -> Accel:
    if guest.accel is Accel.TCG:
        return Accel.TCG
    usable, reason = probe()
    if usable:
        return Accel.KVM
    origin = guest.origin_of("accel")
    if guest.accel is Accel.KVM:
        problems.append(host_error(
            f"guest {guest.name}: accel = \"kvm\" ({origin}) but KVM does not work here: {reason}",
            'load kvm_intel or kvm_amd, or set accel = "tcg" (slow software emulation)'))
        return Accel.KVM
    if host.tcg_fallback:
        notices.append(f"KVM does not work here ({reason}); falling back to TCG, "
                       "slow software emulation (tcg_fallback = true)")
        return Accel.TCG
    problems.append(host_error(
        f"guest {guest.name}: KVM does not work here: {reason}",
        'set tcg_fallback = true in kvmagent.toml to allow slow software emulation, '
        'or accel = "tcg" for this guest'))
    return Accel.KVM


def _check_file(path: Path, what: str, key: str, origin: str, *, write: bool = False,
                block_ok: bool = False) -> KvmagentError | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return host_error(f"{origin}: {key} = \"{path}\": {what} does not exist")
    except OSError as e:
        return host_error(f"{origin}: {key} = \"{path}\": {e.strerror}")
    if not (stat.S_ISREG(st.st_mode) or (block_ok and stat.S_ISBLK(st.st_mode))):
        kind = "a regular file or block device" if block_ok else "a regular file"
        return host_error(f"{origin}: {key} = \"{path}\": {what} is not {kind}")
    if not os.access(path, os.R_OK | (os.W_OK if write else 0)):
        mode = "read and write" if write else "read"
        return host_error(f"{origin}: {key} = \"{path}\": cannot {mode} the {what}",
                          "check its permissions" + ("" if not write else
                                                     ", or set readonly = true"))
    return None


def host_memory() -> int:
    """Physical RAM of this host, in bytes."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def interface_exists(name: str) -> bool:
    """In this process's network namespace (unlike /sys/class/net, which
    shows the namespace of whoever mounted sysfs).  Whether it is a bridge
    is checked when the tap is enslaved (kvmagent.host.netdev)."""
    try:
        socket.if_nametoindex(name)
        return True
    except OSError:
        return False


def machine_problem(guest: Guest, pin: Pin | None, where: Path,
                    caps: QemuCaps) -> KvmagentError | None:
    """The guest's pinned machine type, if this QEMU lacks it (a host that
    went back to an older QEMU, or a pin copied from a newer one)."""
    if pin is None or pin.requested != guest.machine or pin.machine in caps.machines:
        return None
    now = caps.aliases.get(guest.machine, guest.machine)
    return host_error(
        f"guest {guest.name}: machine = \"{guest.machine}\" ({guest.origin_of('machine')}) is "
        f"pinned to {pin.machine} ({where}), which {caps.name} does not have",
        f"kvmagent repin {guest.name} (removes that file): the next start pins {now}, and "
        "the guest sees that type's hardware; or run it on a host whose QEMU has "
        + pin.machine)


def check_host(guest: Guest, host: HostConfig, *,
               kvm_probe: KvmProbe = default_kvm_probe,
               caps_probe: CapsProbe = default_caps_probe,
               lasting: list[KvmagentError] | None = None,
               state_dir: Path | None = None,
               ) -> tuple[HostFacts, list[KvmagentError]]:
    """All second-stage checks.  Returns the facts and every problem found
    (an empty list means the guest can start here).  Problems that waiting
    for devices cannot solve (KVM not working, QEMU lacking what the guest
    needs) are also added to LASTING, if given.  The machine type is the
    one pinned under STATE_DIR (kvmagent.render.pin), read, never written."""
    problems: list[KvmagentError] = []
    permanent: list[KvmagentError] = []
    notices: list[str] = []
    qemu_ok = os.access(host.qemu, os.X_OK)
    if not qemu_ok:
        problems.append(host_error(
            f"{host.origin.get('qemu', 'kvmagent.toml')}: qemu = \"{host.qemu}\": "
            "no such executable", "apt-get install qemu-system-x86"))
    ram = host_memory()
    if guest.memory > ram:
        # A host check, not validation: the same file may be meant for a
        # bigger host.  QEMU would start (guest RAM is allocated lazily) and
        # the host would run out of memory later, killing something.
        problems.append(host_error(
            f"{guest.origin_of('memory')}: memory = \"{format_size(guest.memory)}\": more than "
            f"this host's {ram >> 20}M of RAM", "lower memory for this host"))
    if guest.kernel:
        for key, path in (("kernel.image", guest.kernel.image),
                          ("kernel.initrd", guest.kernel.initrd)):
            if path is not None:
                err = _check_file(path, "kernel file", key, guest.origin_of(key))
                if err:
                    problems.append(err)
    direct: dict[Path, bool] = {}
    block: set[Path] = set()
    for d in guest.disks:
        key = f"disk[{d.index}].path"
        err = _check_file(d.path, "disk", key, guest.origin_of(key),
                          write=not d.readonly, block_ok=True)
        if err:
            problems.append(err)
            continue
        if stat.S_ISBLK(os.stat(d.path).st_mode):
            block.add(d.path)
        direct[d.path] = probe_direct_io(d.path)
        if direct[d.path]:
            continue
        if d.cache in (Cache.NONE, Cache.DIRECTSYNC):
            problems.append(host_error(
                f"{guest.origin_of(f'disk[{d.index}].cache')}: disk[{d.index}].cache = "
                f"\"{d.cache}\": the file system of {d.path} does not support O_DIRECT",
                'use cache = "writeback" (or "auto") for this disk'))
        elif d.cache is Cache.AUTO:
            notices.append(f"disk[{d.index}] {d.path}: no O_DIRECT on its file system, "
                           "using cache=writeback")
    for nic in guest.nics:
        if nic.mode is NicMode.BRIDGE and not interface_exists(str(nic.bridge)):
            key = f"nic[{nic.index}].bridge"
            problems.append(host_error(
                f"{guest.origin_of(key)}: {key} = \"{nic.bridge}\": no such bridge",
                f"create it with: kvmagent bridge ensure {nic.bridge} "
                "(or in systemd-networkd / ifupdown, see README)"))
    accel = resolve_accel(guest, host, kvm_probe, permanent, notices)
    vhost = os.path.exists("/dev/vhost-net")
    caps = None
    if qemu_ok:
        try:
            caps = caps_probe(host.qemu)
        except KvmagentError as e:
            permanent.append(e)
        else:
            notices += qemu_notices(guest, caps)
    machine = None
    if caps is not None:
        where = pin_file(state_dir or Paths.from_env().state_dir, guest.name)
        try:
            pin = read_pin(where)
        except KvmagentError as e:
            permanent.append(e)
            pin = None
        machine = pinned_machine(guest.machine, pin, caps.aliases)
        err = machine_problem(guest, pin, where, caps)
        if err:
            permanent.append(err)
    facts = HostFacts(accel, direct, vhost, tuple(notices), frozenset(block), machine)
    if caps is not None:
        permanent += qemu_problems(guest, host, facts, caps)
    if lasting is not None:
        lasting += permanent
    return facts, problems + permanent
