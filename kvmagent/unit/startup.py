"""The guest's plan, made in a short-lived child of the supervisor
(kvmagent.unit.forkcall) so that the long-lived supervisor never imports the
configuration machinery: load and check the guest, wait for its devices, and
make its QEMU command line (fds as placeholders) and scope settings: a
kvmagent.render.plan.Plan, typed records of plain data, so that unpickling
it imports that module alone.  What the other
children do while QEMU initialises is kvmagent.unit.attach."""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import time
from pathlib import Path

from kvmagent import names
from kvmagent.config.guests import load_guest, load_guest_file, load_host_config
from kvmagent.config.install import check_vnc, install_guest
from kvmagent.config.model import (Accel, Cache, Format, Guest, HostConfig, NicMode,
                                   OnPoweroff, OnReboot)
from kvmagent.errors import KvmagentError, config_error
from kvmagent.host import qemuuser
from kvmagent.host.hostcheck import check_host
from kvmagent.host.imagechain import backing_chain
from kvmagent.host.pinfile import pin_file, read_pin, write_pin
from kvmagent.host.sdnotify import Journal
from kvmagent.paths import Paths
from kvmagent.render.plan import (CONSOLE_FD, QMP_FD, Disk, Incoming, Plan, QemuUser, Tap,
                                  backing_token, disk_token, tap_token)
from kvmagent.render.pin import pin_change, pin_message
from kvmagent.render.qemu import HostFacts, Sockets, effective_cache, qemu_argv
from kvmagent.render.scope import scope_settings
from kvmagent.render.service import needs_inet

DEVICE_POLL = 0.5


def wait_for_host(guest: Guest, host: HostConfig, journal: Journal,
                  state_dir: Path | None = None) -> HostFacts:
    """Bridges and block devices may appear late at boot: retry the host
    checks until host.device_timeout, then fail naming what is missing.
    (This runs in a child of the supervisor, whose sd_notify STATUS= systemd
    would drop under NotifyAccess=main: the wait is said in the journal.)
    What no wait can bring (a working KVM, a QEMU that has what the guest
    needs) fails at once."""
    deadline = time.monotonic() + host.device_timeout
    said = ""
    while True:
        lasting: list[KvmagentError] = []
        facts, problems = check_host(guest, host, lasting=lasting, state_dir=state_dir)
        if not problems:
            for n in facts.notices:
                journal.send(n, 5, GUEST=guest.name, SYSLOG_IDENTIFIER="kvmagent")
            return facts
        if time.monotonic() >= deadline or lasting:
            first = (lasting or problems)[0]
            for p in problems:
                if p is not first:
                    journal.send(str(p), 3, GUEST=guest.name, SYSLOG_IDENTIFIER="kvmagent")
            raise first
        waiting = "; ".join(p.message for p in problems)
        if waiting != said:
            journal.send(f"guest {guest.name} waits up to {host.device_timeout:g} s for: "
                         f"{waiting}", 5, GUEST=guest.name, SYSLOG_IDENTIFIER="kvmagent")
            said = waiting
        time.sleep(DEVICE_POLL)


def prepare(name: str, paths: Paths | None, guest_file: str | None = None,
            iso: str | None = None, vnc: str | None = None) -> tuple[Plan, list[int]]:
    """Load and check the guest (from guest_file for a one-off guest; with
    iso, its install run: kvmagent.config.install), wait for its devices,
    and make its QEMU command line (with placeholders for the fds) and
    scope settings."""
    paths = paths or Paths.from_env()
    host = load_host_config(paths)
    oneoff = guest_file is not None or iso is not None  # kvm-oneoff@NAME, not kvm@NAME
    service = names.guest_unit(name, oneoff)
    journal = Journal(unit=service)  # this child may be gone when journald reads it
    if iso is not None:
        guest, notes = install_guest(load_guest(paths, name, host), Path(iso),
                                     None if vnc is None else check_vnc(vnc))
        for note in [f"guest {name}: install run from {iso}", *notes]:
            journal.send(note, 5, GUEST=name, SYSLOG_IDENTIFIER="kvmagent")
    elif guest_file is None:
        guest = load_guest(paths, name, host)
    else:
        guest = load_guest_file(Path(guest_file), host)
        if guest.name != name:
            raise config_error(f"{guest_file}: defines guest {guest.name}, not {name}",
                               "the guest is named after its file")
    check_inet(guest, service)
    incoming = None if oneoff else read_incoming(paths, name)
    facts = wait_for_host(guest, host, journal, paths.state_dir)
    if incoming is not None:  # the guest's hardware is the source's: pinned here too
        facts = dataclasses.replace(facts, machine=incoming.machine)
    keep_pin(guest, facts, paths.state_dir, journal)
    user = qemu_user(guest, host, facts)
    bridged = [n for n in guest.nics if n.mode is NicMode.BRIDGE]
    # The disks are opened by the supervisor and passed in: read-write ones
    # as an O_RDWR and an O_RDONLY fd (QEMU picks by the mode it opens with).
    direct = [effective_cache(d.cache, facts.direct_io.get(d.path)) in
              (Cache.NONE, Cache.DIRECTSYNC) for d in guest.disks]
    disks = [Disk(str(d.path), d.readonly, (disk_token(i, "ro"),) if d.readonly
                  else (disk_token(i, "rw"), disk_token(i, "ro")), direct[i])
             for i, d in enumerate(guest.disks)]
    disk_fds = {d.node: list(disk.tokens) for d, disk in zip(guest.disks, disks)}
    # A qcow2 image's backing files (a clone's overlay): opened read-only by
    # the supervisor too, as QEMU could not open them by their path.
    backing: dict[str, list[tuple[str, str]]] = {}
    for i, d in enumerate(guest.disks):
        if d.format is Format.QCOW2:
            key = f"disk[{i}].path"
            for depth, (path, fmt) in enumerate(backing_chain(d.path, guest.origin_of(key), key)):
                disks.append(Disk(str(path), True, (backing_token(i, depth),), direct[i]))
                backing.setdefault(d.node, []).append((backing_token(i, depth), fmt))
    sockets = Sockets(qmp=f"fd={QMP_FD}",
                      console=f"fd={CONSOLE_FD}" if guest.console.serial else None,
                      taps={n.index: tap_token(n.index) for n in bridged},
                      disk_fds=disk_fds, backing_fds=backing)
    argv = qemu_argv(guest, host, facts, sockets, incoming=incoming is not None,
                     machine=incoming.machine if incoming else None,
                     cpu=incoming.cpu if incoming else None)
    argv.insert(1, "-S")
    plan = Plan(
        name=guest.name, uuid=guest.uuid, cpus=guest.cpus, memory_mib=guest.memory >> 20,
        stop_timeout=guest.stop_timeout, keep=guest.on_poweroff is OnPoweroff.KEEP,
        reboot_stops=guest.on_reboot is OnReboot.STOP,
        serial=guest.console.serial, console_burst=guest.console.log_burst,
        console_interval=guest.console.log_interval, escape=guest.console.escape,
        argv=argv, vhost=facts.vhost_net, disks=disks,
        qemu_user=None if user.is_root else QemuUser(user.uid, user.gid, tuple(user.groups)),
        taps=[Tap(n.index, n.tap, str(n.bridge), n.queues) for n in bridged],
        scope_unit=names.scope_unit(guest.name),
        scope=scope_settings(guest, host, facts, service=service), incoming=incoming)
    return plan, []


def read_incoming(paths: Paths, name: str) -> Incoming | None:
    """The request of `kvmagent migrate-incoming`, if there is one: this
    start is the destination of a live migration."""
    path = paths.incoming_request(name)
    try:
        return Incoming.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise config_error(f"{path}: not a migration request: {e}",
                           "remove it; kvmagent migrate writes it anew") from None


def keep_pin(guest: Guest, facts: HostFacts, state_dir: Path, journal: Journal) -> None:
    """The machine type the guest starts with, pinned for its later starts
    (kvmagent.render.pin): written the first time, and when the guest's
    machine changed; said in the journal."""
    if facts.machine is None:
        return
    where = pin_file(state_dir, guest.name)
    old = read_pin(where)
    new = pin_change(guest.machine, old, facts.machine)
    if new is not None:
        write_pin(where, new)
        journal.send(pin_message(guest.name, old, new), 5, GUEST=guest.name,
                     SYSLOG_IDENTIFIER="kvmagent", PINNED_MACHINE=new.machine)


def check_inet(guest: Guest, service: str) -> None:
    """A guest whose QEMU needs IP sockets (VNC on TCP, user networking) in a
    service that does not allow them: its drop-in from kvmagent-generator is
    missing (the guest was changed without a daemon-reload)."""
    if not needs_inet(guest):
        return
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
    except OSError as e:
        if e.errno not in (errno.EAFNOSUPPORT, errno.EPERM, errno.EACCES):
            raise
        raise config_error(
            f"{guest.config_file}: guest {guest.name} needs IP sockets (VNC on TCP or "
            f"user-mode networking), which {service} does not allow",
            "run systemctl daemon-reload (kvmagent-generator then adds them for this "
            "guest), and start it again") from None


def qemu_user(guest: Guest, host: HostConfig, facts: HostFacts) -> qemuuser.QemuUser:
    """The user QEMU will run as, once it is sure that QEMU can read what it
    opens by name: the kernel and initrd, and /dev/kvm for KVM."""
    user = qemuuser.resolve(host.qemu_user, host.origin.get("qemu_user", "default"))
    if guest.kernel is not None:
        files = [(guest.kernel.image, os.R_OK)]
        files += [(guest.kernel.initrd, os.R_OK)] if guest.kernel.initrd else []
        qemuuser.check_access(user, files, "[kernel] of guest " + guest.name)
    if facts.accel is Accel.KVM:
        qemuuser.check_access(user, [(Path(qemuuser.KVM_DEVICE), os.R_OK | os.W_OK)],
                              "KVM acceleration")
    return user
