"""CLI for the test host.  From the checkout, as root, with Debian's python:

    /usr/bin/python3 -m tests.harness setup [--release R] [--force]   build/refresh the roots
        of the test hosts and their offline debs, and the clean build roots (every release);
        the cluster stack's offline debs (Debian 12)
    /usr/bin/python3 -m tests.harness setup-cluster [--force]   only the cluster stack's debs
    /usr/bin/python3 -m tests.harness boot [--root host|bookworm|trixie] NAME   Ctrl-C or `stop`
    /usr/bin/python3 -m tests.harness run [--exec] NAME -- CMD...   as a unit (--exec: nsenter)
    /usr/bin/python3 -m tests.harness stop NAME
    /usr/bin/python3 -m tests.harness cleanup [--force]   leftovers of dead owners (--force: all)
    /usr/bin/python3 -m tests.harness deb [--release R] [--out DIR]   the package of HEAD,
        built in the clean build root of each release with its tests, and lintian-checked
    /usr/bin/python3 -m tests.harness demo [--release R] [--keep]   guest demo as kvm@demo
        (README's main job; R: bookworm = Debian 12, the default, or trixie = Debian 13)
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from . import buildroot, clusterdebs, rootfs
from .install import GIT
from .sysutil import (
    CLEAN_ENV, STATE_ROOT, HarnessError, log, procs_mentioning, proc_alive, safe_rmtree, terminate,
)
from .testhost import (
    Record, TestHost, leftovers, nsenter_argv, remove_scratch, stop_record, unit_argv,
)

REPO = Path(__file__).resolve().parents[2]


def _records() -> list[Record]:
    recs = []
    for state in sorted(STATE_ROOT.glob("*/state.json")) if STATE_ROOT.is_dir() else []:
        try:
            recs.append(Record.load(state.parent))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("unreadable %s: %s", state, exc)
    return recs


def _find(name: str) -> Record:
    for rec in _records():
        if rec.name == name:
            return rec
    raise HarnessError(f"no test host named {name!r} under {STATE_ROOT}")


def cmd_setup(args: argparse.Namespace) -> int:
    for release in args.release or list(rootfs.RELEASES):
        t0 = time.monotonic()
        info = rootfs.build(release, force=args.force)
        info["setup_seconds"] = round(time.monotonic() - t0, 1)
        info["root_mb"] = rootfs.size_mb(Path(str(info["root"])))
        info["debs_mb"] = rootfs.size_mb(Path(str(info["debs"])))
        print(json.dumps(info, indent=1), flush=True)
        t0 = time.monotonic()
        info = buildroot.build(release, force=args.force)
        info["setup_seconds"] = round(time.monotonic() - t0, 1)
        info["root_mb"] = rootfs.size_mb(Path(str(info["root"])))
        print(json.dumps(info, indent=1), flush=True)
        if release in clusterdebs.RELEASES:
            print(json.dumps(clusterdebs.build(release, force=args.force), indent=1), flush=True)
    return 0


def cmd_setup_cluster(args: argparse.Namespace) -> int:
    for release in clusterdebs.RELEASES:
        print(json.dumps(clusterdebs.build(release, force=args.force), indent=1), flush=True)
    return 0


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def cmd_boot(args: argparse.Namespace) -> int:
    journal_dir = Path(args.journal_dir or f"/tmp/kvmagent-tests-logs/{args.name}")
    signal.signal(signal.SIGTERM, _raise_stop)  # `stop NAME` sends SIGTERM to this process
    th = TestHost(root=args.root, name=args.name, src=REPO, journal_dir=journal_dir)
    try:
        with th:
            print(f"{th.name} booted in {th.boot_seconds[-1]:.1f} s ({th.boot_state}); "
                  f"systemd = pid {th.leader}, {REPO} at /src/kvmagent\n"
                  f"  enter:  nsenter -t {th.leader} -a /bin/bash\n"
                  f"  run:    /usr/bin/python3 -m tests.harness run {th.name} -- CMD...\n"
                  f"  stop:   Ctrl-C, or /usr/bin/python3 -m tests.harness stop {th.name}",
                  flush=True)
            while True:
                signal.pause()
    except (KeyboardInterrupt, _Stop):
        pass
    print(f"{th.name} stopped in {th.stop_seconds:.1f} s; journal in {journal_dir}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    rec = _find(args.name)
    if not args.command:
        raise HarnessError("nothing to run: … run NAME -- CMD...")
    inner = args.command if args.exec else unit_argv(args.command, timeout=args.timeout)
    # Inherit our stdio: this is for a human at a terminal.
    return subprocess.run(nsenter_argv(rec.leader, inner), env=CLEAN_ENV, check=False).returncode


def cmd_stop(args: argparse.Namespace) -> int:
    rec = _find(args.name)
    if proc_alive(rec.owner, rec.owner_start):
        # The booting process owns teardown (journal, checks): ask it, then wait.
        terminate(rec.owner, rec.owner_start, 90)
    else:
        stop_record(rec, 30)
        remove_scratch(rec)
    left = leftovers(rec)
    if left:
        raise HarnessError(f"{rec.name} left things behind: {left}")
    print(f"stopped {rec.name}")
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    """Remove hosts whose owner died (all with --force), then stray processes of ours."""
    status = 0
    for rec in _records():
        if proc_alive(rec.owner, rec.owner_start) and not args.force:
            print(f"skipping {rec.name}: its owner pid {rec.owner} is alive (use --force)")
            continue
        stop_record(rec, 30)
        remove_scratch(rec)
        left = leftovers(rec)
        print(f"removed {rec.name}" + (f", but left: {left}" if left else ""))
        status |= bool(left)
    live = {r.scratch + "/" for r in _records()}
    for pid, cmdline in procs_mentioning(str(STATE_ROOT) + "/"):
        if not any(s in cmdline for s in live):
            print(f"killing stray {pid}: {cmdline}")
            terminate(pid, None, 10) or terminate(pid, None, 5, signal.SIGKILL)
    for scratch in STATE_ROOT.iterdir() if STATE_ROOT.is_dir() else []:
        if not (scratch / "state.json").exists():
            print(f"removing {scratch}")
            safe_rmtree(scratch)
    return status


def cmd_deb(args: argparse.Namespace) -> int:
    """The committed tree (git archive HEAD), as Debian's builders would build it."""
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".src-", dir=out) as tmp:
        src = Path(tmp) / "kvmagent"
        src.mkdir()
        archive = subprocess.run([*GIT, "archive", "HEAD"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        for release in args.release or list(rootfs.RELEASES):
            t0 = time.monotonic()
            deb, lint = buildroot.build_package(release, src, out / release)
            print(f"== {release} (Debian {rootfs.RELEASES[release]}): {deb} in "
                  f"{time.monotonic() - t0:.0f} s, build-time tests passed; lintian --pedantic "
                  f"(fails on {buildroot.LINTIAN_FAIL_ON}):\n{lint.rstrip() or '(nothing)'}",
                  flush=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import demo
    return demo(release=args.release, keep=args.keep)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m tests.harness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("setup", help="build/refresh the roots and offline debs of every release")
    s.add_argument("--release", action="append", choices=list(rootfs.RELEASES),
                   help="only this release (repeatable; default: all)")
    s.add_argument("--force", action="store_true", help="rebuild even if the cache is current")
    s.set_defaults(func=cmd_setup)
    s = sub.add_parser("setup-cluster", help="only the cluster stack's offline debs (#21)")
    s.add_argument("--force", action="store_true", help="rebuild even if the cache is current")
    s.set_defaults(func=cmd_setup_cluster)
    s = sub.add_parser("boot", help="boot a test host and wait for Ctrl-C or `stop`")
    s.add_argument("--root", choices=["host", "debian", *rootfs.RELEASES], default="host",
                   help="host: this machine's / under an overlay; a release: its cached root")
    s.add_argument("--journal-dir")
    s.add_argument("name")
    s.set_defaults(func=cmd_boot)
    s = sub.add_parser("run", help="run a command inside a booted test host")
    s.add_argument("--exec", action="store_true", help="plain nsenter instead of a unit")
    s.add_argument("--timeout", type=float, default=3600)
    s.add_argument("name")
    s.add_argument("command", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_run)
    s = sub.add_parser("stop", help="stop a test host booted by `boot`")
    s.add_argument("name")
    s.set_defaults(func=cmd_stop)
    s = sub.add_parser("deb", help="build HEAD's package in each release's clean build root")
    s.add_argument("--release", action="append", choices=list(rootfs.RELEASES),
                   help="only this release (repeatable; default: all)")
    s.add_argument("--out", default=str(REPO / "build"), help="where the packages go")
    s.set_defaults(func=cmd_deb)
    s = sub.add_parser("demo", help="the README's main job: guest demo as kvm@demo in a test host")
    s.add_argument("--release", choices=list(rootfs.RELEASES), default="bookworm",
                   help="the test host's Debian: bookworm (12, the default) or trixie (13)")
    s.add_argument("--keep", action="store_true", help="keep it running until Ctrl-C")
    s.set_defaults(func=cmd_demo)
    s = sub.add_parser("cleanup", help="remove leftovers of ours")
    s.add_argument("--force", action="store_true", help="also hosts whose owner is alive")
    s.set_defaults(func=cmd_cleanup)
    args = p.parse_args(argv)
    if args.action == "run" and args.command[:1] == ["--"]:
        args.command = args.command[1:]
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
