"""`kvmagent start|stop|restart NAME`: drive kvm@NAME.service over D-Bus
(pystemd) and report the outcome, as `systemctl` would but with the
guest's configuration checked first, so a bad file is reported here, by
file, key and value, instead of as a failed unit.

Where the kvm@.service template is not installed (a checkout, a pip
install), kvm@NAME.service is made as a transient unit with the template's
settings (kvmagent.render.service).  `start --transient FILE` runs a one-off guest
from a file as the transient kvm-oneoff@NAME.service.  A guest name runs as
one of the two at a time: they share the scope, the machine, the taps and
the runtime directory.

`stop NAME` needs no configuration (a guest whose file has gone bad can
still be stopped), so the configuration machinery is imported by the
functions that load a guest, not by this module: a graceful stop through
this module (kvmagent.cli.hardstop, a short way of kvmagent.cli.main)
imports what a stop needs and no more."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.names import oneoff_unit, service_unit, valid_guest_name
from kvmagent.paths import Paths

if TYPE_CHECKING:
    import argparse  # `start NAME` comes without it (kvmagent.cli.main's short ways)

    from kvmagent.config.model import Guest

RESULT_HINT = "see: systemctl status {unit}; journalctl -u {unit}"
ONEOFF_STOP_WAIT = 1800.0  # stop: the supervisor extends systemd's own stop timeout as it goes


def kvmagent_command(paths: Paths) -> tuple[list[str], list[str]]:
    """How a transient service runs this very kvmagent: this interpreter with
    the package's directory on PYTHONPATH (a checkout works as installed),
    and the relocated directories of `paths`, if any."""
    import kvmagent
    env = [f"PYTHONPATH={Path(kvmagent.__file__).resolve().parent.parent}"]
    default = Paths.from_env({})
    for var, mine, theirs in zip(("KVMAGENT_CONFIG_DIR", "KVMAGENT_STATE_DIR",
                                  "KVMAGENT_RUNTIME_DIR"), paths, default):
        if mine != theirs:
            env.append(f"{var}={Path(mine).resolve()}")
    return [sys.executable, "-m", "kvmagent"], env


def refuse_if_running(unit: str, name: str, as_what: str) -> None:
    from kvmagent.host import systemd
    if systemd.active_state(unit) in systemd.RUNNING_STATES:
        raise KvmagentError(f"guest {name} is already running as {as_what} ({unit})",
                            f"stop it first: kvmagent stop {name}")


def report(action: str, unit: str, result: str | None, no_block: bool) -> int:
    if no_block:
        print(f"{unit}: {action} queued")
        return ExitStatus.OK
    if result != "done":
        raise KvmagentError(f"{unit}: {action} {result}", RESULT_HINT.format(unit=unit))
    done = {"start": "started", "stop": "stopped", "restart": "restarted"}[action]
    print(f"{unit}: {done}")
    return ExitStatus.OK


def _stop(unit: str, state: str | None, args: argparse.Namespace, timeout: float) -> int:
    """Stop UNIT, whose ActiveState (None: not loaded) was just asked."""
    from kvmagent.host import systemd
    if state is None:
        # Not loaded: stopped already (and, without the template, systemd
        # would not even know the name).
        return report("stop", unit, "done", False)
    if args.force:
        # SIGUSR1 first: the supervisor stops QEMU at once, no ACPI (the
        # power cord); the stop job then only waits for it to exit.
        import signal
        if systemd.unit_properties(unit, ["ActiveState"])["ActiveState"] == "active":
            systemd.kill_unit(unit, "main", signal.SIGUSR1)
    result = systemd.stop_unit(unit, wait=not args.no_block, timeout=timeout)
    return report("stop", unit, result, args.no_block)


def _job(action: str, args: argparse.Namespace, paths: Paths) -> int:
    from kvmagent.host import systemd  # pystemd: only for these commands
    oneoff = oneoff_unit(args.name)
    # A running one-off guest is stopped (restarted) by its name alone:
    # it has no guests/NAME.toml.
    if (action != "start" and valid_guest_name(args.name)
            and (state := systemd.active_state(oneoff)) is not None):
        if action == "stop":
            return _stop(oneoff, state, args, ONEOFF_STOP_WAIT)
        result = systemd.restart_unit(oneoff, wait=not args.no_block,
                                      timeout=ONEOFF_STOP_WAIT + 300)
        return report(action, oneoff, result, args.no_block)
    if action == "stop":
        # No configuration needed: a guest whose file has gone bad can still
        # be stopped.  The supervisor extends systemd's stop timeout itself.
        unit = service_unit(args.name)
        state = systemd.active_state(unit)
        if state is None and not paths.guest_config(args.name).exists():
            from kvmagent.config.guests import load_guest, load_host_config
            load_guest(paths, args.name, load_host_config(paths))  # unknown guest: exit 8
        return _stop(unit, state, args, ONEOFF_STOP_WAIT)
    from kvmagent.config.guests import load_guest, load_host_config
    from kvmagent.render.service import needs_inet, service_settings
    host = load_host_config(paths)
    guest = load_guest(paths, args.name, host)  # exit 6/8 before touching systemd
    unit = service_unit(guest.name)
    timeout = {"start": host.device_timeout + 60}.get(
        action, host.device_timeout + guest.stop_timeout + 120)
    refuse_if_running(oneoff, guest.name, "a one-off guest")
    if not systemd.template_installed():
        # No kvm@.service (a checkout, a pip install): make kvm@NAME.service
        # ourselves, with the template's settings.
        if action == "restart" and systemd.active_state(unit) is not None:
            result = systemd.restart_unit(unit, wait=not args.no_block, timeout=timeout)
        else:
            command, env = kvmagent_command(paths)
            result = systemd.start_service(unit, service_settings(guest.name, command,
                                                                  environment=env,
                                                                  inet=needs_inet(guest)),
                                           wait=not args.no_block, timeout=timeout)
        return report(action, unit, result, args.no_block)
    job: dict[str, Any] = {"start": systemd.start_unit, "restart": systemd.restart_unit}
    result = job[action](unit, wait=not args.no_block, timeout=timeout)
    return report(action, unit, result, args.no_block)


def running_guests(paths: Paths, host: Any) -> list[Guest]:
    """The guests running now, defined, one-off or installing (those whose
    file still loads)."""
    from kvmagent.config.guests import load_guest, load_guest_file
    from kvmagent.host import systemd
    out = []
    for row in systemd.list_units(["kvm@*.service", "kvm-oneoff@*.service"]):
        if row["active_state"] not in systemd.RUNNING_STATES:
            continue
        kind, _, rest = row["name"].partition("@")
        name = rest.removesuffix(".service")
        try:
            if kind == "kvm":
                out.append(load_guest(paths, name, host))
                continue
            (exec_start, *_), = systemd.unit_properties(row["name"], ["ExecStart"]).values()
            argv = list(exec_start[1])  # (path, argv, ignore failure, ...)
            if "--install" in argv:  # an install run: the guest's own file (and a CD-ROM)
                out.append(load_guest(paths, name, host))
                continue
            out.append(load_guest_file(Path(argv[argv.index("--file") + 1]), host))
        except (KvmagentError, ValueError, IndexError):
            pass  # changed or removed since it started: nothing to compare with
    return out


def start_oneoff(args: argparse.Namespace, paths: Paths) -> int:
    """`kvmagent start --transient FILE`: the guest of FILE, checked like any
    (nothing is made when it is bad), as the transient kvm-oneoff@NAME.service,
    collected when it stops."""
    from kvmagent.config.guests import check_unique, load_guest_file, load_host_config
    from kvmagent.render.service import needs_inet, service_settings, writable_images
    path = Path(args.transient).resolve()
    host = load_host_config(paths)
    guest = load_guest_file(path, host)  # exit 6 before touching systemd
    from kvmagent.host import systemd  # pystemd: not even imported for a bad file
    unit = oneoff_unit(guest.name)
    refuse_if_running(service_unit(guest.name), guest.name, "a defined guest")
    refuse_if_running(unit, guest.name, "a one-off guest")
    # Its MACs, taps and writable disks against the guests running now (a
    # defined guest that is stopped may well share them: a copy of its file).
    check_unique([*running_guests(paths, host), guest])
    command, env = kvmagent_command(paths)
    settings = service_settings(guest.name, command, guest_file=str(path),
                                writable=writable_images(guest),
                                environment=env, inet=needs_inet(guest))
    result = systemd.start_service(unit, settings, wait=not args.no_block,
                                   timeout=host.device_timeout + 60)
    return report("start", unit, result, args.no_block)


def cmd_start(args: argparse.Namespace, paths: Paths) -> int:
    if (args.name is None) == (args.transient is None):
        raise KvmagentError("start needs NAME or --transient FILE (one of the two)",
                            "kvmagent start NAME; kvmagent start --transient FILE.toml",
                            ExitStatus.USAGE)
    if args.transient is not None:
        return start_oneoff(args, paths)
    return _job("start", args, paths)


def cmd_stop(args: argparse.Namespace, paths: Paths) -> int:
    return _job("stop", args, paths)


def cmd_restart(args: argparse.Namespace, paths: Paths) -> int:
    return _job("restart", args, paths)
