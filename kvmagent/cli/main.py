"""The kvmagent command line.  Every expected failure is a KvmagentError,
printed as one message (plus a hint) with a documented exit status.

Command implementations are imported only when their command runs:
`kvmagent run` is the long-lived supervisor of a guest, and must not carry
the configuration machinery or pyroute2/pystemd/pydbus for its lifetime.
The two commands that systemd runs in every start and stop of a guest take
a short way, without argparse (kvmagent.cli.parser) and its imports: `run NAME`
(ExecStart=) as kvm@.service and kvm-oneoff@.service give it (one-off
guests and install runs alike), and
`stop-post NAME` (ExecStopPost=) when there is nothing for it to do.  So
do `kvmagent list [--json]`, which admins and monitoring run often
(argparse, gettext and the parser cost ~15 ms of a ~110 ms listing),
`kvmagent stop --force NAME`, the power cord, `kvmagent stop NAME` and
`kvmagent start NAME`.
`-H HOST` (any command) goes to kvmagent.cli.remote: the command runs on
HOST, over ssh."""

from __future__ import annotations

import os
import sys

# A module that imports nothing: stop-post's short way needs this one name.
from kvmagent.lifecycle import RECORDED_FILE

TYPE_CHECKING = False  # as typing's, without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from typing import Any


def _stop_already_recorded(argv: list[str]) -> bool:
    """`kvmagent stop-post NAME` (ExecStopPost=) after a run whose supervisor
    recorded its stop itself, as it does unless it was killed: nothing to
    do.  It runs in every stop, so it reads one file and imports nothing
    (but kvmagent.lifecycle, for the file's name);
    the unit's runtime directory is in $RUNTIME_DIRECTORY (RuntimeDirectory=
    kvmagent/NAME); anything else takes the long way."""
    invocation = os.environ.get("INVOCATION_ID")
    directory = os.environ.get("RUNTIME_DIRECTORY", "")
    if (len(argv) != 2 or argv[0] != "stop-post" or not invocation
            or os.path.basename(directory) != argv[1]):
        return False
    try:
        with open(os.path.join(directory, RECORDED_FILE)) as f:
            return f.read() == invocation
    except (OSError, ValueError):
        return False


def _run_argv(argv: list[str]) -> tuple[str, str | None, str | None, str | None] | None:
    """(NAME, FILE, ISO, VNC) of `run NAME`, `run --file FILE NAME` and
    `run --install ISO [--vnc ADDR] NAME`, as the units give them; anything
    else goes through argparse."""
    match argv:
        case ["run", name] if not name.startswith("-"):
            return name, None, None, None
        case ["run", "--file", file, name] if not name.startswith("-"):
            return name, file, None, None
        case ["run", "--install", iso, name] if not name.startswith("-"):
            return name, None, iso, None
        case ["run", "--install", iso, "--vnc", vnc, name] if not name.startswith("-"):
            return name, None, iso, vnc
    return None


def _names_host(argv: list[str]) -> bool:
    """-H HOST, -HHOST, --host HOST or --host=HOST anywhere (kvmagent.cli.remote
    tells which are; local commands do not import it)."""
    return any(a.startswith("-H") or a.startswith("--host") for a in argv)


# Exact command lines taken without argparse: argv -> (module:function, the
# arguments argparse would give it); NAME in a key stands for one guest
# name, given as the argument "name".  tests/unit/test_cli.py checks that
# the parser gives the same.
NAME = "NAME"
SHORT_WAYS: dict[tuple[str, ...], tuple[str, dict[str, object]]] = {
    ("list",): ("cli.tracking:cmd_list", {"json": False}),
    ("list", "--json"): ("cli.tracking:cmd_list", {"json": True}),
    # the power cord: a guest in trouble, a command that costs a few ms
    ("stop", "--force", NAME): ("cli.hardstop:cmd_stop", {"force": True, "no_block": False}),
    # a graceful stop: neither argparse nor the configuration (kvmagent.cli.control)
    ("stop", NAME): ("cli.hardstop:cmd_stop", {"force": False, "no_block": False}),
    ("start", NAME): ("cli.control:cmd_start", {"no_block": False, "transient": None}),
}


def _short_way(argv: list[str]) -> tuple[str, dict[str, object]] | None:
    """The function and arguments of a command line of SHORT_WAYS, or None."""
    if NAME not in argv and (way := SHORT_WAYS.get(tuple(argv))) is not None:
        return way
    if argv and not argv[-1].startswith("-") and (
            way := SHORT_WAYS.get((*argv[:-1], NAME))) is not None:
        return way[0], {**way[1], "name": argv[-1]}
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if _stop_already_recorded(argv):
        return 0
    import importlib

    from kvmagent.errors import ExitStatus, KvmagentError
    try:
        if (run := _run_argv(argv)) is not None:
            from kvmagent.unit import run as supervise
            return supervise.main(run[0], None, *run[1:])
        if _names_host(argv):  # -H: run it on another host, over ssh
            from kvmagent.cli import remote
            if (status := remote.main(argv)) is not None:
                return status
        from kvmagent.paths import Paths
        paths = Paths.from_env()
        args: Any  # argparse's Namespace, or the same attributes without argparse
        if (short := _short_way(argv)) is not None:
            from types import SimpleNamespace
            func_name, values = short
            args = SimpleNamespace(func=func_name, config_dir=None, **values)
        else:
            from kvmagent.cli.parser import build_parser
            args = build_parser(argv).parse_args(argv)
        if args.config_dir:
            paths = Paths(config_dir=paths.config_dir.__class__(args.config_dir),
                          state_dir=paths.state_dir, runtime_dir=paths.runtime_dir)
        module, _, function = args.func.partition(":")
        func = getattr(importlib.import_module(f"kvmagent.{module}"), function)
        return int(func(args, paths))
    except KvmagentError as e:
        print(f"kvmagent: {e}", file=sys.stderr)
        return int(e.status)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `kvmagent list | head`: not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitStatus.OK
