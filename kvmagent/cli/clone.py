"""`kvmagent clone SRC NEW [--snapshot SIZE] [--copy]`: a new guest from an
existing one.  What is made for which disk, and NEW's file, is planned by
kvmagent.render.cloneplan (pure); here the host is looked at (the disks'
kinds, room in the volume group, whether SRC runs), the running SRC is
paused over its supervisor's control channel while its snapshots are
taken (never over QMP: the supervisor resumes it by itself after
FREEZE_SECONDS), the commands run, and NEW's file is written last, never
over an existing one.  On any failure whatever was made is removed again:
nothing half-made is left."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import suppress

from kvmagent.config.guests import (build_guest, check_hidden_paths, check_unique, guest_names,
                                    load_guest, load_host_config)
from kvmagent.config.layers import Layered, load_layers, parse_toml
from kvmagent.config.values import parse_size
from kvmagent.errors import ExitStatus, KvmagentError, config_error
from kvmagent.host import storage
from kvmagent.names import GUEST_NAME_RULE, valid_guest_name
from kvmagent.paths import Paths
from kvmagent.render.cloneplan import Action, ClonePlan, Step, plan_clone
from kvmagent.unit import protocol

FREEZE_SECONDS = 30.0  # the longest SRC stays paused, should this command die


def _err(text: str) -> None:
    print(f"kvmagent: {text}", file=sys.stderr)


def is_running(paths: Paths, name: str) -> bool:
    """Whether guest NAME's supervisor runs (its pid file, or its control
    channel answering)."""
    if paths.supervisor_pid(name).exists():
        return True
    try:
        protocol.call(paths.control_socket(name), protocol.StatusAsk(), protocol.Status,
                      timeout=2.0)
    except KvmagentError:
        return False
    return True


def make_plan(args: argparse.Namespace, paths: Paths) -> ClonePlan:
    """Check everything and plan; nothing is made here."""
    if not valid_guest_name(args.new):
        raise KvmagentError(f"invalid guest name {args.new!r}", GUEST_NAME_RULE,
                            ExitStatus.USAGE)
    host = load_host_config(paths)
    src = load_guest(paths, args.src, host)  # exit 8 for an unknown guest
    target = paths.guest_config(args.new)
    for there in (target, target.with_name(target.name + ".d")):
        if os.path.lexists(there):
            raise config_error(f"{there}: exists; nothing made",
                               "choose another name, or remove guest " + args.new + " first")
    snapshot = None
    if args.snapshot is not None:
        try:
            snapshot = parse_size(args.snapshot)
        except ValueError as e:
            raise KvmagentError(f"--snapshot {args.snapshot}: {e}", "e.g. --snapshot 1G",
                                ExitStatus.USAGE) from None
    layered = load_layers(src.config_file, required=True)
    facts = {d.index: storage.classify(d.path, src.origin_of(f"disk[{d.index}].path"),
                                       f"disk[{d.index}].path") for d in src.disks}
    plan = plan_clone(src, layered.data, layered.files, args.new, facts, snapshot=snapshot,
                      full_copy=args.copy, running=is_running(paths, src.name))
    # NEW as validate sees it, beside every other guest (MACs, taps, disks)
    guest = build_guest(args.new, Layered(data=parse_toml(plan.toml.encode(), target)), host,
                        target)
    check_hidden_paths(guest)
    others = []
    for name in guest_names(paths):
        with suppress(KvmagentError):
            others.append(load_guest(paths, name, host))
    try:
        check_unique([*others, guest])
    except KvmagentError as e:
        raise config_error(f"{e.message.removeprefix(f'{target}: ')}; nothing made", e.hint)
    for step in plan.steps:
        if step.action is not Action.SHARE and os.path.lexists(step.target):
            raise config_error(f"disk[{step.index}] of {args.new}: {step.target} exists; "
                               "nothing made", "remove it, or choose another name")
    needed: dict[str, int] = {}
    for step, fact in ((s, facts[s.index]) for s in plan.steps):
        if step.action is Action.SNAPSHOT:
            assert snapshot is not None
            needed[fact.vg] = needed.get(fact.vg, 0) + snapshot
        elif step.action is Action.COPY_LV:
            needed[fact.vg] = needed.get(fact.vg, 0) + fact.size
    for vg, size in needed.items():
        storage.check_room(vg, size, f"clone {src.name} as {args.new}")
    return plan


def _make(step: Step, made: list[Step]) -> None:
    for n, argv in enumerate(step.commands):
        storage.run(argv)
        if n == 0 and step.temp is None:
            made.append(step)  # a volume: lvremove undoes it (and the dd after it)
    if step.temp is not None:
        try:
            os.link(step.temp, step.target)  # never over a file that appeared meanwhile
        except OSError as e:
            raise KvmagentError(f"{step.target}: {e.strerror}; nothing made") from None
        made.append(step)
        os.unlink(step.temp)


def _undo(steps: list[Step], plan: ClonePlan) -> None:
    for step in reversed(steps):
        try:
            if step.temp is not None:
                os.unlink(step.target)
            else:
                storage.run(step.undo, timeout=120)
        except (OSError, KvmagentError) as e:
            _err(f"could not remove {step.target}, made for guest {plan.new}: {e}")
    for step in plan.steps:
        if step.temp is not None:
            with suppress(OSError):
                os.unlink(step.temp)


def carry_out(plan: ClonePlan, paths: Paths) -> None:
    """Make NEW's disks, SRC paused meanwhile if it runs, then write NEW's
    file; on any failure everything made is removed."""
    from kvmagent.cli.importcmd import write_guest
    made: list[Step] = []
    snapshots = [s for s in plan.steps if s.action is Action.SNAPSHOT]
    rest = [s for s in plan.steps if s.action not in (Action.SNAPSHOT, Action.SHARE)]
    control = paths.control_socket(plan.src)
    try:
        if plan.freeze:
            protocol.call(control, protocol.FreezeAsk(FREEZE_SECONDS), protocol.Frozen)
            try:
                for step in snapshots:
                    _make(step, made)
            finally:
                thawed = protocol.call(control, protocol.ThawAsk(), protocol.Thawed)
            if not thawed.resumed and len(snapshots) > 1:
                _err(f"guest {plan.src} was resumed before its last snapshot was taken: "
                     "each of its disks' snapshots is crash-consistent, but not all from "
                     "the same instant")
        else:
            rest = snapshots + rest
        for step in rest:
            _make(step, made)
        write_guest(paths.guest_config(plan.new), plan.toml, force=False)
    except BaseException:
        _undo(made, plan)
        raise


def cmd_clone(args: argparse.Namespace, paths: Paths) -> int:
    plan = make_plan(args, paths)
    carry_out(plan, paths)
    for step in plan.steps:
        what = {Action.SHARE: "shared (read-only)", Action.OVERLAY: "qcow2 overlay on",
                Action.COPY_FILE: "copy of", Action.SNAPSHOT: "LVM snapshot of",
                Action.COPY_LV: "LVM volume, copy of"}[step.action]
        shown = str(step.target) if step.action is Action.SHARE else \
            f"{step.target}: {what} {step.source}"
        print(f"{plan.new}: disk[{step.index}] {shown}")
    for note in plan.notes:
        _err(note)
    print(f"kvmagent: wrote {paths.guest_config(plan.new)}; check it with kvmagent validate "
          f"--host {plan.new}, then systemctl daemon-reload and start it", file=sys.stderr)
    return ExitStatus.OK
