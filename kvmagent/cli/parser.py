"""kvmagent's command line grammar (argparse): every command, its options
and its help.  Commands are named as "module:function" of kvmagent, which
kvmagent.cli.main imports only when the command runs.  Only the parser of the
command being run is built (all of them for --help, or a mistake): building
the others would cost every command ~12 ms."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kvmagent import __version__
from kvmagent.errors import EXIT_STATUS_HELP, ExitStatus


def _err(text: str) -> None:
    print(f"kvmagent: {text}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        _err(message)
        sys.exit(ExitStatus.USAGE)


class _Unused:
    """Stands in for the parser of a command that is not being run."""

    required = False

    def add_argument(self, *args: Any, **kwargs: Any) -> None:
        pass

    def add_subparsers(self, *args: Any, **kwargs: Any) -> _Unused:
        return self

    def add_mutually_exclusive_group(self, *args: Any, **kwargs: Any) -> _Unused:
        return self


def _command(argv: list[str]) -> str | None:
    """The command word of argv, None for anything but --config-dir before
    it (`kvmagent -h list` is the main help: every command)."""
    args = iter(argv)
    for arg in args:
        if arg == "--config-dir":
            next(args, None)
        elif arg.startswith("--config-dir="):
            continue
        elif arg.startswith("-"):
            return None
        else:
            return arg
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for argv (None: with every command)."""
    only = _command(argv) if argv is not None else None
    p, built = _build(only)
    return p if only is None or only in built else _build(None)[0]


def _build(only: str | None) -> tuple[argparse.ArgumentParser, set[str]]:
    fmt = argparse.RawDescriptionHelpFormatter
    epilog = ("environment:\n  KVMAGENT_CONFIG_DIR (/etc/kvmagent), KVMAGENT_STATE_DIR "
              "(/var/lib/kvmagent),\n  KVMAGENT_RUNTIME_DIR (/run/kvmagent)\n\n"
              + EXIT_STATUS_HELP)
    p = _Parser(prog="kvmagent", formatter_class=fmt, epilog=epilog,
                description="Run KVM/QEMU guests as systemd services (kvm@NAME.service).")
    p.add_argument("--version", action="version", version=f"kvmagent {__version__}")
    p.add_argument("--config-dir", metavar="DIR",
                   help="configuration directory (default $KVMAGENT_CONFIG_DIR or /etc/kvmagent)")
    p.add_argument("-H", "--host", metavar="[USER@]HOST[:PORT]", action="append",
                   help="run the command on HOST, over ssh (given anywhere; several times "
                   "for list: one table with a HOST column; after validate, -H only)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    built: set[str] = set()

    def add(subparsers: Any, name: str, fn: str | None, help: str) -> Any:
        """fn: "module:function" of kvmagent, imported when the command runs."""
        if isinstance(subparsers, _Unused) or (subparsers is sub and only not in (None, name)):
            return _Unused()
        built.add(name)
        sp = subparsers.add_parser(name, help=help, description=help, epilog=EXIT_STATUS_HELP,
                                   formatter_class=fmt)
        if fn is not None:
            sp.set_defaults(func=fn)
        return sp

    sp = add(sub, "validate", "cli.commands:cmd_validate",
             "check guest definitions (all, or the named ones)")
    sp.add_argument("names", nargs="*", metavar="NAME")
    sp.add_argument("--host", action="store_true",
                    help="also check this host: QEMU, disks, kernel files, bridges, /dev/kvm")
    sp = add(sub, "show", "cli.commands:cmd_show", "show a guest's merged configuration (with the "
             "file of each value), QEMU command line and systemd settings")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp = add(sub, "list", "cli.tracking:cmd_list", "list the defined guests: state, uptime, "
             "restarts, vCPUs, memory, QEMU PID, enabled at boot, taps")
    sp.add_argument("--json", action="store_true",
                    help="machine-readable output (seconds, bytes)")
    sp = add(sub, "status", "cli.status:cmd_status", "show guest NAME's state, uptime, restarts, "
             "last failure, taps, console socket and last journal lines")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--lines", "-n", type=int, default=10, metavar="N",
                    help="journal lines to show (default 10)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp = add(sub, "history", "cli.tracking:cmd_history", "show guest NAME's recorded lifecycle "
             "events, its cumulative and longest uptime")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--since", metavar="WHEN",
                    help="only events since a date (2024-05-01) or an age (7d, 12h, 30m)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp = add(sub, "repin", "cli.commands:cmd_repin", "forget the machine type guest NAME is "
             "pinned to: its next start pins what its machine is then")
    sp.add_argument("name", metavar="NAME")
    sp = add(sub, "reset-counters", "cli.tracking:cmd_reset_counters",
             "set guest NAME's count of restarts after failures back to zero")
    sp.add_argument("name", metavar="NAME")
    for name, text in (
            ("start", "start guest NAME (kvm@NAME.service) and wait until it runs"),
            ("stop", "stop guest NAME: ACPI power button, then QEMU is stopped after its "
             "stop timeout"),
            ("restart", "stop, then start guest NAME")):
        # stop: kvmagent.cli.hardstop first (stop --force needs neither D-Bus nor the config)
        sp = add(sub, name, "cli.hardstop:cmd_stop" if name == "stop"
                 else f"cli.control:cmd_{name}", text)
        sp.add_argument("name", metavar="NAME", nargs="?" if name == "start" else None)
        sp.add_argument("--no-block", action="store_true", help="do not wait for the job")
        if name == "start":
            sp.add_argument("--transient", metavar="FILE",
                            help="run a one-off guest straight from FILE (NAME.toml) as the "
                            "transient kvm-oneoff@NAME.service, gone when it stops")
        if name == "stop":
            sp.add_argument("--force", action="store_true",
                            help="stop QEMU at once, without the ACPI power button "
                            "(like pulling the power cord)")
    sp = add(sub, "install", "cli.install:cmd_install",
             "boot guest NAME once from an installer ISO (as a CD-ROM, first in the boot "
             "order) as the transient kvm-oneoff@NAME.service, which ends when the guest "
             "powers off; guests/NAME.toml is not changed")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--iso", metavar="FILE", required=True,
                    help="the installer's ISO image (or a CD-ROM device), read-only")
    how = sp.add_mutually_exclusive_group()
    how.add_argument("--console", action="store_true",
                     help="attach to the guest's serial console once it runs (leaving it "
                     "leaves the install running)")
    how.add_argument("--vnc", metavar="ADDR", help='a VNC display for a graphical installer: '
                     '"127.0.0.1:1" (port 5901) or "unix:/PATH"')
    sp.add_argument("--no-block", action="store_true", help="do not wait for the guest to run")
    sp = add(sub, "console", "cli.console:cmd_console",
             "attach to guest NAME's serial console (leave with Ctrl-] or Ctrl-Q); "
             "without a terminal, type stdin and print the output for --timeout seconds")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--timeout", type=float, metavar="SECONDS",
                    help="scripted use: print the output for this long (default 5 without "
                    "a terminal)")
    bridge = add(sub, "bridge", None, "create or show the bridges guests attach to")
    bsub = bridge.add_subparsers(dest="bridge_command", metavar="COMMAND", parser_class=_Parser)
    bsub.required = True
    sp = add(bsub, "ensure", "cli.bridges:cmd_ensure",
             "create or adjust a bridge (default: the host's bridge, br-kvm) with the "
             "seed's settings: STP off, forward delay 9 s, hello 2 s, max age 12 s")
    sp.add_argument("name", nargs="?", metavar="NAME")
    sp.add_argument("--uplink", metavar="IFACE", help="enslave this interface")
    sp.add_argument("--address", metavar="CIDR", help="give the bridge this address")
    sp.add_argument("--persist", action="store_true",
                    help="record it in /etc/kvmagent/bridges/NAME.toml, created at boot")
    sp.add_argument("--all", action="store_true",
                    help="ensure every bridge recorded in /etc/kvmagent/bridges/")
    sp = add(bsub, "show", "cli.bridges:cmd_show",
             "list bridges with their ports and the guests of taps")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp = add(sub, "import", "cli.importcmd:cmd_import", "translate a hand-written kvm start script "
             "or a Xen domain configuration into a guest file (printed, or --write)")
    sp.add_argument("format", choices=["kvm-script", "xen"], metavar="kvm-script|xen")
    sp.add_argument("file", metavar="FILE")
    sp.add_argument("--name", metavar="NAME", help="the guest's name (default: the one in FILE)")
    sp.add_argument("--bridge", metavar="BRIDGE", help="kvm-script: the bridge of its taps "
                    "(default: the one its ifup script names)")
    sp.add_argument("--write", action="store_true", help="write guests/NAME.toml instead of "
                    "printing it")
    sp.add_argument("--force", action="store_true", help="with --write: replace an existing file")
    sp = add(sub, "clone", "cli.clone:cmd_clone", "define guest NEW as a copy of guest SRC: "
             "new name, MACs and UUID; its disks a qcow2 overlay (a template's image files), "
             "an LVM snapshot (--snapshot SIZE) or a full copy (--copy)")
    sp.add_argument("src", metavar="SRC")
    sp.add_argument("new", metavar="NEW")
    how = sp.add_mutually_exclusive_group()
    how.add_argument("--snapshot", metavar="SIZE", help="LVM volumes: a snapshot with room "
                     "for SIZE of changes (lvcreate -s -L SIZE); a running SRC is paused for "
                     "that instant")
    how.add_argument("--copy", action="store_true", help="copy writable disks whole "
                     "(SRC stopped)")
    sp = add(sub, "kernel", "cli.kernel:cmd_kernel", "copy one of the host's kernels and its "
             "initrd into /boot/kvm/NAME/ and point guest NAME at them (a drop-in, "
             "NAME.toml.d/kernel.toml)")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--from-host", nargs="?", const="", metavar="VERSION",
                    help="the host's /boot/vmlinuz-VERSION (default: the running kernel, "
                    "or the newest installed)")
    sp = add(sub, "reload", "cli.reload:cmd_reload", "move the supervisors of guests NAME (all "
             "running guests if none is named) to the installed kvmagent, the guests untouched")
    sp.add_argument("names", metavar="NAME", nargs="*")
    sp.add_argument("--quiet", action="store_true", help="say nothing when no guest runs")
    sp = add(sub, "migrate", "cli.migrate:cmd_migrate", "move running guest NAME to HOST "
             "while it runs (live migration over ssh; its disks on storage both hosts share, "
             "or copied with --copy-storage)")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("host", metavar="[USER@]HOST[:PORT]")
    sp.add_argument("--max-downtime", type=int, metavar="MS",
                    help="the longest the guest may be paused at the switch (QEMU's default: "
                    "300 ms)")
    sp.add_argument("--bandwidth", metavar="RATE", help='bytes per second at most ("100M")')
    sp.add_argument("--force", action="store_true",
                    help="migrate a guest with cpu host (both hosts' CPUs must be alike)")
    sp.add_argument("--transport", default="ssh", metavar="ssh|tcp[:ADDR[:PORT]]|tcp:CIDR[:PORT]",
                    help="how the state goes: ssh (default, encrypted), or plain TCP to HOST's "
                    "address (on network CIDR), UNENCRYPTED: a dedicated migration network only")
    sp.add_argument("--copy-storage", action="store_true",
                    help="copy the guest's writable disks to HOST while it runs (onto disks "
                    "of the same size there; missing image files are made)")
    sp.add_argument("--copy-config", action="store_true",
                    help="copy guests/NAME.toml and its drop-ins to HOST if they are missing "
                    "or differ there (HOST's own kept as .old)")
    sp.add_argument("--json", action="store_true", help="progress events, one JSON a line")
    sp = add(sub, "migrate-incoming", "cli.incoming:cmd_migrate_incoming",
             "internal: the destination's half of kvmagent migrate, run over ssh")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--facts", action="store_true",
                    help="print this host's facts about guest NAME (JSON) and exit")
    sp.add_argument("--config-in", action="store_true",
                    help="with --facts: as if the guest's files were those on standard input "
                    "(JSON, from migrate --copy-config); nothing is installed")
    sp.add_argument("--put-config", action="store_true",
                    help="install the guest's files on standard input (JSON, from migrate "
                    "--copy-config) and exit")
    sp.add_argument("--where", action="store_true",
                    help="print what runs of guest NAME here (JSON), for a source that lost "
                    "the destination's word (with --enable: enabled if it runs here)")
    sp.add_argument("--machine", metavar="TYPE", help="the source QEMU's machine type")
    sp.add_argument("--cpu", metavar="CPU", help="the source QEMU's -cpu value")
    sp.add_argument("--from", dest="source", metavar="HOST", help="the source host")
    sp.add_argument("--enable", action="store_true",
                    help="enable kvm@NAME.service once the guest runs here")
    sp.add_argument("--booted", type=float, metavar="TIME",
                    help="when the guest booted (seconds since the epoch): its uptime goes on")
    sp.add_argument("--transport", default="ssh", metavar="ssh|tcp...",
                    help="the stream: standard input (ssh), or a TCP connection admitted by "
                    "the tokens on standard input")
    sp.add_argument("--arrived", action="store_true",
                    help="the move is over: add --downtime to the arrival's record")
    sp.add_argument("--downtime", type=int, metavar="MS", help="QEMU's downtime of the move")
    sp.add_argument("--copy-disk", action="append", metavar="INDEX=BYTES",
                    help="migrate --copy-storage: disk INDEX is copied onto this host's, of "
                    "BYTES")
    sp.add_argument("--make-disk", action="append", metavar="INDEX=BYTES[:FORMAT:BACKING]",
                    help="migrate --copy-storage: make disk INDEX's image file here, of BYTES "
                    "(a qcow2 overlay on BACKING, of FORMAT), and copy it")
    sp = add(sub, "migrate-nbd", "cli.nbdcopy:cmd_migrate_nbd",
             "internal: one disk's copy for kvmagent migrate --copy-storage, run over ssh")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--facts", action="store_true",
                    help="print guest NAME's disks as this host has them (JSON) and exit")
    sp.add_argument("--backing-facts", nargs="+", metavar="PATH",
                    help="print the files at PATHs as this host has them (size, checksum of "
                    "samples across them; JSON) and exit")
    sp = add(sub, "run", "unit.run:cmd_run",
             "supervise guest NAME in the foreground: the ExecStart= of "
             "kvm@NAME.service (start guests with systemctl start kvm@NAME)")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--file", metavar="FILE", help="load the guest from FILE, not from "
                    "guests/NAME.toml (a one-off guest: kvmagent start --transient)")
    sp.add_argument("--install", metavar="ISO", help="guest NAME's install run: boot from "
                    "ISO as a CD-ROM (kvmagent install)")
    sp.add_argument("--vnc", metavar="ADDR", help="with --install: a VNC display")
    sp = add(sub, "stop-orphan", "unit.orphan:cmd_stop_orphan", "internal: stop guest NAME's "
             "QEMU once systemd gave up restarting its supervisor: kvmagent-orphan@NAME.service")
    sp.add_argument("name", metavar="NAME")
    sp = add(sub, "stop-post", "unit.stoppost:cmd_stop_post", "internal: record how guest NAME's "
             "run ended, from systemd's $SERVICE_RESULT: the ExecStopPost= of kvm@NAME.service")
    sp.add_argument("name", metavar="NAME")
    return p, built
