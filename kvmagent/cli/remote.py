"""`kvmagent -H [USER@]HOST[:PORT] COMMAND ...`: the command run by kvmagent on
HOST, over ssh (kvmagent.host.ssh), as `systemctl -H` does; `list` on
several hosts at once (`list -H a -H b`: one table, kvmagent.cli.hostlist).

The command line is checked here first (a usage error costs no
connection), and refused (exit 2) where running it on HOST would not do
what it says: commands whose arguments are files here (FILE_COMMANDS),
those only systemd runs (UNIT_COMMANDS), and more than one host for anything
but `list`.  Every other argument goes to HOST as it was given, each quoted
for HOST's shell; paths in it (--config-dir) are HOST's."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from kvmagent.errors import ExitStatus, KvmagentError

if TYPE_CHECKING:
    import argparse

    from kvmagent.host.ssh import Target

# The options that take a value (the next word is that value, never -H);
# tests/unit/test_remote.py keeps this in step with the parser.
VALUE_OPTIONS = frozenset({
    "--config-dir", "--lines", "-n", "--since", "--transient", "--iso", "--vnc", "--uplink",
    "--address", "--name", "--bridge", "--snapshot", "--timeout", "--file", "--install",
    "--max-downtime", "--bandwidth", "--machine", "--cpu", "--from", "--transport", "--booted",
    "--downtime",
    "--copy-disk", "--make-disk",
})
# What only systemd runs, on the host of the guest (the units' ExecStart= and the like).
UNIT_COMMANDS = frozenset({"run", "stop-post", "stop-orphan"})
# command -> the option whose value is a file of this host (None: the command's FILE).
FILE_COMMANDS = {"import": None, "start": "transient", "install": "iso"}
# `validate --host` is validate's own (also check this host): -H there.
OWN_HOST_OPTION = "validate"


def _usage(message: str, hint: str | None = None) -> KvmagentError:
    return KvmagentError(message, hint, ExitStatus.USAGE)


def split_hosts(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the values of -H/--host, anywhere in argv; the rest of argv).  After
    `--`, and as the value of an option, nothing is taken; `--host` after
    `validate` is validate's."""
    hosts: list[str] = []
    rest: list[str] = []
    command: str | None = None
    i = 0
    while i < len(argv):
        a = argv[i]
        own = command == OWN_HOST_OPTION
        if a == "--":
            rest += argv[i:]
            break
        if a == "-H" or (a == "--host" and not own):
            if i + 1 >= len(argv):
                raise _usage(f"{a} needs a host", "kvmagent -H [USER@]HOST[:PORT] COMMAND ...")
            hosts.append(argv[i + 1])
            i += 2
            continue
        if a.startswith("--host=") and not own:
            hosts.append(a.partition("=")[2])
        elif a.startswith("-H"):
            hosts.append(a[2:])
        elif a in VALUE_OPTIONS and i + 1 < len(argv):
            rest += [a, argv[i + 1]]
            i += 2
            continue
        else:
            if command is None and not a.startswith("-"):
                command = a
            rest.append(a)
        i += 1
    return hosts, rest


def refusal(args: argparse.Namespace, hosts: int) -> KvmagentError | None:
    """Why this parsed command line cannot run with -H (None: it can)."""
    command = args.command
    if command in UNIT_COMMANDS:
        return _usage(f"-H: {command} is what systemd runs on the guest's host, not a "
                      "command to give another host", "systemctl -H HOST start kvm@NAME, or "
                      "kvmagent -H HOST start NAME")
    if command in FILE_COMMANDS:
        option = FILE_COMMANDS[command]
        value = getattr(args, option) if option else getattr(args, "file", None)
        if value is not None:
            what = f"--{option} {value}" if option else value
            return _usage(f"-H: {command} {what}: a file named here would be read on "
                          "the other host", f"copy it there and run kvmagent {command} there "
                          "(ssh HOST kvmagent ...)")
    if hosts > 1 and command != "list":
        return _usage(f"-H given {hosts} times: only list runs on several hosts at once",
                      f"one -H for {command}")
    return None


def main(argv: list[str]) -> int | None:
    """Run argv on the host(s) it names; None when it names none (run it here)."""
    texts, rest = split_hosts(argv)
    if not texts:
        return None
    from kvmagent.cli.parser import build_parser
    from kvmagent.host import ssh
    targets = [ssh.parse_target(t) for t in texts]
    args = build_parser(rest).parse_args(rest)  # a usage error: exit 2, before any ssh
    if (refused := refusal(args, len(targets))) is not None:
        raise refused
    if args.command == "list":
        prefix = ["--config-dir", args.config_dir] if args.config_dir else []
        return list_hosts(targets, [*prefix, "list", "--json"], args.json)
    tty = args.command == "console" and sys.stdin.isatty() and sys.stdout.isatty()
    status = ssh.run(targets[0], rest, tty=tty)
    if status == ssh.UNREACHABLE:
        print(f"kvmagent: {targets[0]}: ssh could not reach it, or lost the connection "
              "(exit status 255)", file=sys.stderr)
    return status


def list_hosts(targets: list[Target], remote_args: list[str], as_json: bool) -> int:
    """`kvmagent list` on every target at once, merged into one listing."""
    import json

    from kvmagent.cli import hostlist
    from kvmagent.host import ssh
    started = [(str(t), ssh.start(t, remote_args)) for t in targets]
    listings = []
    for host, proc in started:
        out, err = proc.communicate()
        listings.append(hostlist.HostListing(host, proc.returncode, out.decode(errors="replace"),
                                             err.decode(errors="replace")))
    merged = hostlist.merge(listings)
    if as_json:
        json.dump(merged.rows, sys.stdout, indent=2)
        print()
    elif merged.rows:
        for line in hostlist.table(merged.rows, hosts=True, color=hostlist.color_wanted()):
            print(line)
    elif not merged.notes:
        print("no guests defined on " + ", ".join(h for h, _ in started))
    sys.stdout.flush()
    for note in merged.notes:
        print(f"kvmagent: {note}", file=sys.stderr)
    return merged.status
