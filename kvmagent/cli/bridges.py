"""`kvmagent bridge ensure|show`, and persistent bridge definitions.

A bridge made at runtime is gone after a reboot.  `--persist` records it in
/etc/kvmagent/bridges/NAME.toml; kvmagent-bridges.service (shipped in
units/, enabled by the package, skipped while that directory is empty) runs
`kvmagent bridge ensure --all` early at boot, before the network is
configured and before any guest starts (kvm@.service orders itself after
it).  Why a unit of ours rather than systemd-networkd files: Debian hosts
mostly run ifupdown, and switching a host's uplink to networkd for one
bridge would take the host's network out of the admin's hands; admins who
do use networkd or ifupdown declare the bridge there instead (docs/bridges.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kvmagent.config.guests import guest_names, load_guest, load_host_config
from kvmagent.config.layers import load_layers
from kvmagent.config.schema import BRIDGE_KEYS, Reader, render
from kvmagent.errors import ExitStatus, KvmagentError, config_error
from kvmagent.host.hostcheck import interface_exists
from kvmagent.paths import Paths

UPLINK_POLL = 0.5


def bridges_dir(paths: Paths) -> Path:
    return paths.config_dir / "bridges"


def load_bridge(path: Path) -> dict[str, Any]:
    """One bridges/NAME.toml -> keyword arguments for bridge.ensure_bridge."""
    name = path.name[:-5]
    layered = load_layers(path, required=True)
    r = Reader(layered, path)
    r.check_keys(layered.data, BRIDGE_KEYS, ())
    try:
        BRIDGE_KEYS["uplink"].parse(name)  # the file name is the bridge name
    except ValueError as e:
        raise config_error(f"{path}: the bridge name {name!r} (from the file name): {e}") from None
    kw = {k: r.value(layered.data, BRIDGE_KEYS, (), k, None) for k in BRIDGE_KEYS}
    return {"name": name, **{k: v for k, v in kw.items() if v is not None}}


def persist(paths: Paths, name: str, settings: dict[str, Any]) -> Path:
    """Write bridges/NAME.toml atomically (comments are not kept: this file
    is kvmagent's record of `bridge ensure --persist`; SETTINGS are the
    recorded ones with this command's on top, see cmd_ensure)."""
    directory = bridges_dir(paths)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{name}.toml"
    lines = ["# Written by `kvmagent bridge ensure --persist`; created again at boot by",
             "# kvmagent-bridges.service before guests start.  See kvmagent.toml(5)."]
    lines += [f"{k} = {render(v)}" for k, v in settings.items() if v is not None]
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)
    return target


def _ensure(kw: dict[str, Any], wait: float = 0.0) -> list[str]:
    from kvmagent.host import bridge  # pyroute2: only for these commands
    uplink = kw.get("uplink")
    deadline = time.monotonic() + wait
    while uplink and not interface_exists(uplink) and time.monotonic() < deadline:
        time.sleep(UPLINK_POLL)  # at boot the uplink may still be on its way
    return bridge.ensure_bridge(**kw)


def cmd_ensure(args: argparse.Namespace, paths: Paths) -> int:
    if args.all:
        if args.name or args.uplink or args.address or args.persist:
            raise KvmagentError("--all takes no bridge name and no other option",
                                status=ExitStatus.USAGE)
        files = sorted(bridges_dir(paths).glob("*.toml")) if bridges_dir(paths).is_dir() else []
        defs = [load_bridge(p) for p in files]  # all checked before any change
        wait = load_host_config(paths).device_timeout
        # At boot: a bridge that cannot be made (its uplink missing) must not
        # keep the others from being made; each failure is said, the worst
        # status is the exit status.
        status = ExitStatus.OK
        for definition in defs:
            try:
                for line in _ensure(definition, wait):
                    print(f"{definition['name']}: {line}")
            except KvmagentError as e:
                print(f"kvmagent: {e}", file=sys.stderr)
                status = max(status, e.status)
        return status
    host = load_host_config(paths)
    name = args.name or host.bridge
    # The recorded definition (--persist) is the starting point: a plain
    # `ensure NAME` keeps its stp and timers, and a later --persist adds to it.
    recorded = bridges_dir(paths) / f"{name}.toml"
    kw: dict[str, Any] = load_bridge(recorded) if recorded.is_file() else {"name": name}
    if args.uplink:
        kw["uplink"] = args.uplink
    if args.address:
        kw["address"] = args.address
    changes = _ensure(kw)
    for line in changes:
        print(f"{name}: {line}")
    if not changes:
        print(f"{name}: nothing to change")
    if args.persist:
        path = persist(paths, name, {k: v for k, v in kw.items() if k != "name"})
        print(f"{name}: recorded in {path}; kvmagent-bridges.service creates it at boot")
    return ExitStatus.OK


def _tap_owners(paths: Paths) -> dict[str, str]:
    """tap name -> guest, for every valid guest definition."""
    owners: dict[str, str] = {}
    try:
        host = load_host_config(paths)
    except KvmagentError:
        return owners
    for name in guest_names(paths):
        try:
            for nic in load_guest(paths, name, host).nics:
                owners[nic.tap] = name
        except KvmagentError:
            continue
    return owners


def cmd_show(args: argparse.Namespace, paths: Paths) -> int:
    from kvmagent.host import bridge
    report = bridge.bridge_report(_tap_owners(paths))
    if args.json:
        json.dump([asdict(b) for b in report], sys.stdout, indent=2)
        print()
        return ExitStatus.OK
    if not report:
        print("no bridges")
    for b in report:
        state = "up" if b.up else "DOWN"
        addrs = " ".join(b.addresses) or "no address"
        print(f"{b.name}: {state}, mtu {b.mtu}, {addrs}, stp {'on' if b.stp else 'off'}, "
              f"forward delay {b.forward_delay:g} s")
        for p in b.ports:
            owner = f"guest {p.guest}" if p.kvmagent_tap else (p.kind or "uplink")
            carrier = "" if p.carrier else ", no carrier"
            print(f"  {p.name:<16} {owner:<22} {p.mac}{carrier}")
    return ExitStatus.OK
