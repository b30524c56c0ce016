"""`kvmagent install NAME --iso FILE [--console | --vnc ADDR]`: boot guest
NAME once from an installer ISO, as the hand-written scripts' `-cdrom
x.iso -boot d` did, without changing guests/NAME.toml.

The run is the transient kvm-oneoff@NAME.service (as a one-off guest's),
whose supervisor loads the guest's own configuration and applies the
install overlay (kvmagent.config.install): the ISO as a read-only CD-ROM,
first in the boot order, no direct kernel boot.  It ends when the guest
powers off, or with `kvmagent stop NAME`; its start and end are recorded
as any run of the guest (kvmagent history NAME).  Everything is checked
before anything is started: an unknown guest (exit 8), a bad guest file
(6), an ISO that is missing or not a file (5), a bad --vnc (2), a guest
already running (1)."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path

from kvmagent.cli.control import kvmagent_command, refuse_if_running, report, running_guests
from kvmagent.config.guests import check_unique, load_guest, load_host_config
from kvmagent.config.install import check_vnc, install_guest
from kvmagent.errors import ExitStatus, KvmagentError, config_error, host_error
from kvmagent.names import oneoff_unit, service_unit
from kvmagent.paths import Paths
from kvmagent.render.service import needs_inet, service_settings, writable_images


def check_iso(text: str) -> Path:
    """The ISO as an absolute path without symlinks (the unit binds it
    there): a regular file or block device (a CD-ROM drive) that root can
    read; host_error (exit 5) otherwise."""
    path = Path(os.path.abspath(text))
    try:
        path = path.resolve(strict=True)
        st = os.stat(path)
    except FileNotFoundError:
        raise host_error(f"--iso {text}: no such file", "give the path of the installer's "
                         "ISO image") from None
    except OSError as e:
        raise host_error(f"--iso {text}: {e.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise host_error(f"--iso {text}: not a file (an ISO image or a CD-ROM device)")
    if not os.access(path, os.R_OK):
        raise host_error(f"--iso {text}: cannot read it", "check its permissions; run as root")
    return path


def check_unix_vnc(vnc: str, qemu_user: str, runtime: Path) -> None:
    """--vnc unix:PATH where QEMU can make the socket: in the sandbox of the
    guest's service only the runtime directory (and /var/lib/kvmagent) is
    writable, and only by root (measured: QEMU as kvmagent-qemu gets EACCES
    there); a socket in the service's private /tmp no admin would find."""
    path = Path(vnc.removeprefix("unix:"))
    if qemu_user != "root":
        raise KvmagentError(
            f"--vnc {vnc}: QEMU runs as {qemu_user}, which cannot create a socket where the "
            "guest's service lets it write", "use VNC on TCP on the loopback, --vnc "
            "127.0.0.1:1 (port 5901; from elsewhere: ssh -L 5901:127.0.0.1:5901 HOST)",
            ExitStatus.USAGE)
    if path.parent != runtime:
        raise KvmagentError(f"--vnc {vnc}: the socket must be in the guest's runtime directory, "
                            f"the one place its service may write",
                            f"--vnc unix:{runtime}/vnc.sock", ExitStatus.USAGE)


def cmd_install(args: argparse.Namespace, paths: Paths) -> int:
    if args.console and args.no_block:
        raise KvmagentError("--console waits for the guest to run: not with --no-block",
                            "kvmagent install NAME --iso FILE --console", ExitStatus.USAGE)
    vnc = None if args.vnc is None else check_vnc(args.vnc)  # exit 2
    host = load_host_config(paths)
    guest = load_guest(paths, args.name, host)  # exit 8, 6
    iso = check_iso(args.iso)  # exit 5
    if vnc is not None and vnc.startswith("unix:"):
        check_unix_vnc(vnc, host.qemu_user, paths.guest_runtime(guest.name))
    run, notes = install_guest(guest, iso, vnc)
    if args.console and not run.console.serial:
        raise config_error(f"{guest.origin_of('console.serial')}: console.serial = false: "
                           f"guest {guest.name} has no serial console for --console",
                           "use --vnc ADDR for a graphical installer")
    from kvmagent.host import systemd  # pystemd: not even imported for bad input
    unit = oneoff_unit(guest.name)
    refuse_if_running(service_unit(guest.name), guest.name, "a defined guest")
    refuse_if_running(unit, guest.name, "a one-off guest or an install run")
    check_unique([*running_guests(paths, host), run])
    for note in notes:
        print(f"kvmagent: {guest.name}: {note}", file=sys.stderr)
    command, env = kvmagent_command(paths)
    settings = service_settings(guest.name, command, iso=str(iso), vnc=vnc,
                                writable=writable_images(run), environment=env,
                                inet=needs_inet(run))
    result = systemd.start_service(unit, settings, wait=not args.no_block,
                                   timeout=host.device_timeout + 60)
    status = report("start", unit, result, args.no_block)
    if vnc is not None:
        print(f"{guest.name}: VNC display {vnc}", flush=True)
    if args.console:
        sys.stdout.flush()  # before the console's own writes
        from kvmagent.cli.console import cmd_console
        return cmd_console(argparse.Namespace(name=guest.name, timeout=None), paths)
    if status == ExitStatus.OK and not args.no_block:
        print(f"{guest.name}: the install run ends when the guest powers off, or with "
              f"kvmagent stop {guest.name}; console: kvmagent console {guest.name}")
    return status
