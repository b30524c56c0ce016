"""kvmagent validate|show|repin: reading guest definitions (list: kvmagent.cli.tracking)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kvmagent.config.guests import check_unique, guest_names, load_guest, load_host_config
from kvmagent.config.model import Guest, HostConfig
from kvmagent.errors import ExitStatus, KvmagentError, host_error
from kvmagent.host import dpkgfiles
from kvmagent.host.cib import CIB, pacemaker_guests
from kvmagent.host.hostcheck import check_host, default_caps_probe
from kvmagent.host.pinfile import pin_file, read_pin
from kvmagent.names import scope_unit, service_unit
from kvmagent.paths import Paths
from kvmagent.render import hostkernel
from kvmagent.render.ocf import enabled_under_pacemaker
from kvmagent.render.pin import pin_status
from kvmagent.render.qemu import Sockets, machine_and_cpu, qemu_argv
from kvmagent.render.scope import render_settings, scope_settings
from kvmagent.render.show import effective_config, render_argv, render_config


def _err(text: str) -> None:
    print(f"kvmagent: {text}", file=sys.stderr)


def cmd_validate(args: argparse.Namespace, paths: Paths) -> int:
    host = load_host_config(paths)
    names = args.names or guest_names(paths)
    status = ExitStatus.OK
    good: list[Guest] = []
    for name in names:
        try:
            guest = load_guest(paths, name, host)
            if args.host:
                _, problems = check_host(guest, host, state_dir=paths.state_dir)
                if problems:
                    for p in problems:
                        _err(str(p))
                    status = max(status, ExitStatus.HOST_NOT_READY)
                    continue
        except KvmagentError as e:
            _err(str(e))
            status = max(status, e.status)
            continue
        good.append(guest)
        print(f"{name}: ok")
        if args.host:
            for warning in package_kernels(guest) + pacemaker_enabled(name):
                _err(f"warning: {warning}")
    # Cross-guest checks (MACs, taps, disks) always look at every defined
    # guest, so validating one guest catches a clash with another.
    others = [] if not args.names else _load_quietly(paths, host, set(args.names))
    try:
        check_unique(others + good)
    except KvmagentError as e:
        _err(str(e))
        status = max(status, e.status)
    if not names:
        print(f"no guests defined in {paths.guests_dir}")
    return status


def pacemaker_enabled(name: str, cib: Path = CIB) -> list[str]:
    """A warning for a guest that this node's Pacemaker runs as a resource
    while kvm@NAME.service is enabled at boot (systemd asked only then)."""
    if name not in pacemaker_guests(cib):
        return []
    from kvmagent.host import systemd
    enabled = systemd.unit_properties(service_unit(name), ["UnitFileState"])["UnitFileState"]
    warning = enabled_under_pacemaker(name, str(enabled))
    return [warning] if warning else []


def package_kernels(guest: Guest, boot: Path = hostkernel.BOOT,
                    info: Path = dpkgfiles.INFO) -> list[str]:
    """Warnings for a guest that boots a kernel straight out of /boot that a
    Debian package owns: an apt upgrade or autoremove removes it under the
    guest."""
    if guest.kernel is None:
        return []
    out = []
    for key, path, packaged in hostkernel.package_kernel_paths(guest.kernel.image,
                                                               guest.kernel.initrd, boot):
        package = dpkgfiles.owner(packaged, info)
        if package is None:
            continue
        version = packaged.name.removeprefix("vmlinuz-")
        whose = "" if packaged == path else f" (made for {packaged}, removed with it)"
        out.append(f"{guest.origin_of(key)}: {key} = \"{path}\"{whose} belongs to package "
                   f"{package}: an apt upgrade or autoremove can remove it under guest "
                   f"{guest.name}; copy it: kvmagent kernel {guest.name} --from-host {version}")
    return out


def _load_quietly(paths: Paths, host: HostConfig, skip: set[str]) -> list[Guest]:
    out = []
    for name in guest_names(paths):
        if name not in skip:
            try:
                out.append(load_guest(paths, name, host))
            except KvmagentError:
                pass  # reported when that guest itself is validated
    return out


def cmd_show(args: argparse.Namespace, paths: Paths) -> int:
    host = load_host_config(paths)
    guest = load_guest(paths, args.name, host)
    facts, problems = check_host(guest, host, state_dir=paths.state_dir)
    argv = qemu_argv(guest, host, facts, Sockets.in_dir(paths.guest_runtime(guest.name)))
    where = pin_file(paths.state_dir, guest.name)
    try:
        pin = read_pin(where)
    except KvmagentError:  # among the problems
        pin = None
    machine, cpu = machine_and_cpu(guest, facts)
    settings = scope_settings(guest, host, facts)
    if args.json:
        doc: dict[str, Any] = {
            "name": guest.name, "config_file": str(guest.config_file),
            "config": effective_config(guest), "origin": guest.origin,
            "accel": str(facts.accel), "argv": argv,
            "machine": machine if facts.machine else None, "cpu": cpu,
            "pin": {"file": str(where), **(pin._asdict() if pin else {})},
            "scope": {"unit": scope_unit(guest.name), "settings": dict(settings)},
            "notices": list(facts.notices), "problems": [str(p) for p in problems],
        }
        json.dump(doc, sys.stdout, indent=2)
        print()
        return ExitStatus.OK
    print(f"# guest {guest.name}: {guest.config_file}")
    print("\n".join(render_config(guest, paths.config_dir)))
    print(f"\n# {pin_status(guest.machine, pin, facts.machine)} ({where})")
    print(f"\n# QEMU command line (accel {facts.accel})")
    print("\n".join(render_argv(argv)))
    print(f"\n# systemd settings of {scope_unit(guest.name)}")
    print("\n".join(render_settings(settings)))
    for n in facts.notices:
        print(f"\n# notice: {n}")
    for p in problems:
        print(f"\n# host not ready: {p}")
    return ExitStatus.OK


def cmd_repin(args: argparse.Namespace, paths: Paths) -> int:
    """Remove guest NAME's pin (kvmagent.render.pin), also a damaged one;
    say what its next start pins.  A running guest is not touched."""
    host = load_host_config(paths)
    guest = load_guest(paths, args.name, host)
    where = pin_file(paths.state_dir, guest.name)
    try:
        pin = read_pin(where)
    except KvmagentError:
        pin = None  # damaged: removing it is the cure
    try:
        where.unlink()
    except FileNotFoundError:
        print(f"guest {guest.name}: not pinned ({where} does not exist)")
        return ExitStatus.OK
    except OSError as e:
        raise host_error(f"{where}: cannot remove it: {e.strerror}",
                         "run kvmagent as root") from None
    try:
        caps = default_caps_probe(host.qemu)
        then = f"{caps.aliases.get(guest.machine, guest.machine)} (in {caps.name})"
    except KvmagentError:
        then = "what it is in the QEMU installed then"
    was = f" (was {pin.machine})" if pin else ""
    print(f"guest {guest.name}: unpinned{was}; its next start pins machine "
          f"\"{guest.machine}\" to {then}. A running guest keeps its machine type until it "
          "is stopped and started again.")
    return ExitStatus.OK
