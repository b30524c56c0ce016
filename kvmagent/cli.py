"""The kvmagent command line.  Every expected failure is a KvmagentError,
printed as one message (plus a hint) with a documented exit status.

Command implementations are imported only when their command runs:
`kvmagent run` is the long-lived supervisor of a guest, and must not carry
the configuration machinery or pyroute2/pystemd/pydbus for its lifetime."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

from . import __version__
from .errors import EXIT_STATUS_HELP, ExitStatus, KvmagentError
from .paths import Paths


def _err(text: str) -> None:
    print(f"kvmagent: {text}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        _err(message)
        sys.exit(ExitStatus.USAGE)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    epilog = ("environment:\n  KVMAGENT_CONFIG_DIR (/etc/kvmagent), KVMAGENT_STATE_DIR "
              "(/var/lib/kvmagent),\n  KVMAGENT_RUNTIME_DIR (/run/kvmagent)\n\n"
              + EXIT_STATUS_HELP)
    p = _Parser(prog="kvmagent", formatter_class=fmt, epilog=epilog,
                description="Run KVM/QEMU guests as systemd services (kvm@NAME.service).")
    p.add_argument("--version", action="version", version=f"kvmagent {__version__}")
    p.add_argument("--config-dir", metavar="DIR",
                   help="configuration directory (default $KVMAGENT_CONFIG_DIR or /etc/kvmagent)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(subparsers: Any, name: str, fn: str, help: str) -> argparse.ArgumentParser:
        """fn: "module:function" of kvmagent, imported when the command runs."""
        sp = subparsers.add_parser(name, help=help, description=help, epilog=EXIT_STATUS_HELP,
                                   formatter_class=fmt)
        sp.set_defaults(func=fn)
        return sp

    sp = add(sub, "validate", "commands:cmd_validate", "check guest definitions (all, or the named ones)")
    sp.add_argument("names", nargs="*", metavar="NAME")
    sp.add_argument("--host", action="store_true",
                    help="also check this host: QEMU, disks, kernel files, bridges, /dev/kvm")
    sp = add(sub, "show", "commands:cmd_show", "show a guest's merged configuration (with the file of "
             "each value), QEMU command line and systemd settings")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp = add(sub, "list", "tracking:cmd_list", "list the defined guests: state, uptime, "
             "restarts, vCPUs, memory, QEMU PID, enabled at boot, taps")
    sp.add_argument("--json", action="store_true",
                    help="machine-readable output (seconds, bytes)")
    sp = add(sub, "status", "tracking:cmd_status", "show guest NAME's state, uptime, restarts, "
             "last failure, taps, console socket and last journal lines")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--lines", "-n", type=int, default=10, metavar="N",
                    help="journal lines to show (default 10)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp = add(sub, "history", "tracking:cmd_history", "show guest NAME's recorded lifecycle "
             "events, its cumulative and longest uptime")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--since", metavar="WHEN",
                    help="only events since a date (2024-05-01) or an age (7d, 12h, 30m)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp = add(sub, "reset-counters", "tracking:cmd_reset_counters",
             "set guest NAME's count of restarts after failures back to zero")
    sp.add_argument("name", metavar="NAME")
    for name, text in (
            ("start", "start guest NAME (kvm@NAME.service) and wait until it runs"),
            ("stop", "stop guest NAME: ACPI power button, then QEMU is stopped after its "
             "stop timeout"),
            ("restart", "stop, then start guest NAME")):
        # stop: kvmagent.hardstop first (stop --force needs neither D-Bus nor the config)
        sp = add(sub, name, "hardstop:cmd_stop" if name == "stop" else f"control:cmd_{name}", text)
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
    sp = add(sub, "console", "console:cmd_console",
             "attach to guest NAME's serial console (leave with Ctrl-] or Ctrl-Q); "
             "without a terminal, type stdin and print the output for --timeout seconds")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--timeout", type=float, metavar="SECONDS",
                    help="scripted use: print the output for this long (default 5 without "
                    "a terminal)")
    bridge = sub.add_parser("bridge", help="create or show the bridges guests attach to",
                            description="create or show the bridges guests attach to",
                            epilog=EXIT_STATUS_HELP, formatter_class=fmt)
    bsub = bridge.add_subparsers(dest="bridge_command", metavar="COMMAND", parser_class=_Parser)
    bsub.required = True
    sp = add(bsub, "ensure", "bridges:cmd_ensure",
             "create or adjust a bridge (default: the host's bridge, br-kvm) with the "
             "seed's settings: STP off, forward delay 9 s, hello 2 s, max age 12 s")
    sp.add_argument("name", nargs="?", metavar="NAME")
    sp.add_argument("--uplink", metavar="IFACE", help="enslave this interface")
    sp.add_argument("--address", metavar="CIDR", help="give the bridge this address")
    sp.add_argument("--persist", action="store_true",
                    help="record it in /etc/kvmagent/bridges/NAME.toml, created at boot")
    sp.add_argument("--all", action="store_true",
                    help="ensure every bridge recorded in /etc/kvmagent/bridges/")
    sp = add(bsub, "show", "bridges:cmd_show",
             "list bridges with their ports and the guests of taps")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp = add(sub, "run", "supervisor:cmd_run", "supervise guest NAME in the foreground: the ExecStart= of "
             "kvm@NAME.service (start guests with systemctl start kvm@NAME)")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--file", metavar="FILE", help="load the guest from FILE, not from "
                    "guests/NAME.toml (a one-off guest: kvmagent start --transient)")
    sp = add(sub, "stop-post", "stoppost:cmd_stop_post", "record how guest NAME's run ended, "
             "from systemd's $SERVICE_RESULT: the ExecStopPost= of kvm@NAME.service")
    sp.add_argument("name", metavar="NAME")
    return p


def _stop_already_recorded(argv: list[str]) -> bool:
    """`kvmagent stop-post NAME` (ExecStopPost=) after a run whose supervisor
    recorded its stop itself, as it does unless it was killed: nothing to
    do, so nothing is imported or parsed (it delays every stop)."""
    invocation = os.environ.get("INVOCATION_ID")
    if len(argv) != 2 or argv[0] != "stop-post" or not invocation or "/" in argv[1]:
        return False
    try:
        recorded = (Paths.from_env().guest_runtime(argv[1]) / "recorded").read_text()
    except (OSError, ValueError):
        return False
    return recorded == invocation


def main(argv: list[str] | None = None) -> int:
    if _stop_already_recorded(sys.argv[1:] if argv is None else argv):
        return ExitStatus.OK
    args = build_parser().parse_args(argv)
    paths = Paths.from_env()
    if args.config_dir:
        paths = Paths(config_dir=paths.config_dir.__class__(args.config_dir),
                      state_dir=paths.state_dir, runtime_dir=paths.runtime_dir)
    module, _, function = args.func.partition(":")
    try:
        func = getattr(importlib.import_module(f"kvmagent.{module}"), function)
        return int(func(args, paths))
    except KvmagentError as e:
        _err(str(e))
        return int(e.status)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `kvmagent list | head`: not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitStatus.OK
