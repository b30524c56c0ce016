"""kvmagent list|status|history|reset-counters|stop-post: what the guests
are doing and have done, from systemd (the present) and the state database
(the record, kvmagent.host.state).

`list` stays cheap however many guests there are: one D-Bus call
(ListUnitsByPatterns), one read of the state database, one scan of the
*.wants/ directories for enabled guests, and of each guest's TOML only what
the listing shows (guest_facts), not the whole validation (`kvmagent
validate` does that)."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from contextlib import suppress
from typing import TYPE_CHECKING, Any, Callable

from kvmagent.cli import hostlist
from kvmagent.cli.hostlist import duration
from kvmagent.config.values import parse_size
from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.host import state
from kvmagent.paths import Paths, guest_names
from kvmagent.render import uptime

if TYPE_CHECKING:
    import argparse

# Not imported here, to keep `list` quick: tomllib (only for a changed
# guest file) and kvmagent.names (hashlib loads OpenSSL: ~10 ms).
FACTS_CACHE = "list-cache.json"  # in the runtime directory

# systemd's ActiveState -> the word shown for a guest.
STATES = {"active": "running", "reloading": "running", "inactive": "stopped",
          "failed": "failed", "activating": "starting", "deactivating": "stopping"}
# systemd's ActiveStates in which a guest's run goes on: its uptime counts.
UP_STATES = ("active", "reloading", "deactivating")


# -- what a guest's files say (cheap) -------------------------------------------------

def _signature(guests_dir: str, name: str, dropin_dirs: set[str]) -> list[int] | None:
    """What a guest's facts depend on: its file and its drop-in directory
    (if guest_names() saw one).  The change time too: a chmod or chown
    changes whether kvmagent trusts a file (config._check_trusted), not its
    contents."""
    main = f"{guests_dir}/{name}.toml"
    try:
        st = os.stat(main)
    except OSError:
        return None
    sig = [st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino]
    if f"{name}.toml.d" in dropin_dirs:
        try:
            for e in os.scandir(f"{main}.d"):
                if e.name.endswith(".toml"):
                    d = e.stat()
                    sig += [d.st_mtime_ns, d.st_ctime_ns, d.st_size, d.st_ino]
        except (FileNotFoundError, NotADirectoryError):
            pass
    return sig


def all_facts(paths: Paths, names: list[str],
              dropin_dirs: set[str]) -> dict[str, dict[str, Any]]:
    """guest_facts() of each guest (or {"error": message}), parsing only the
    guests whose files changed since the last listing: the rest comes from a
    cache in the runtime directory, keyed by each file's mtime, ctime, size
    and inode (_signature).  The cache is an optimisation only; it is rewritten atomically,
    and a listing that cannot write it (not root) parses every file.
    dropin_dirs: the guests' NAME.toml.d directories, as guest_names() found
    them."""
    path = paths.runtime_dir / FACTS_CACHE
    try:
        with open(path) as f:
            cache = json.load(f)
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    out, fresh, changed = {}, {}, False
    guests_dir = str(paths.guests_dir)
    for name in names:
        sig = _signature(guests_dir, name, dropin_dirs)
        hit = cache.get(name)
        if sig is not None and isinstance(hit, dict) and hit.get("sig") == sig:
            facts = hit["facts"]
        else:
            try:
                facts = guest_facts(paths, name)
            except KvmagentError as e:
                facts = {"error": e.message}
            changed = True
        out[name] = facts
        if sig is not None:
            fresh[name] = {"sig": sig, "facts": facts}
    if changed or len(fresh) != len(cache):
        tmp = path.with_name(f".{FACTS_CACHE}.{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as f:
                json.dump(fresh, f)
            os.replace(tmp, path)
        except OSError:
            pass
    return out


def guest_facts(paths: Paths, name: str) -> dict[str, Any]:
    """description, cpus, memory_bytes and taps of a guest, from its file and
    drop-ins (later files replace these top-level keys and [[nic]] whole, as
    kvmagent.config.layers merges them).  KvmagentError(CONFIG) for what cannot be
    shown; the rest of the checks are `kvmagent validate`'s."""
    # The same reader as the full configuration's: ownership and size checks,
    # no parser bombs (kvmagent.config.layers); imported only when the cache misses.
    from kvmagent.config.layers import dropin_files, read_toml
    from kvmagent.names import GUEST_NAME_RULE, tap_name, valid_guest_name
    main = paths.guest_config(name)
    data: dict[str, Any] = {}
    for f in [main, *dropin_files(main)]:
        data.update(read_toml(f))  # KvmagentError(CONFIG) naming the file
    cpus = data.get("cpus", 1)
    if not valid_guest_name(name):
        raise KvmagentError(f"{main}: guest name {name!r} is not valid", GUEST_NAME_RULE,
                            ExitStatus.CONFIG)
    if isinstance(cpus, bool) or not isinstance(cpus, int) or not 1 <= cpus <= 255:
        raise KvmagentError(f"{main}: cpus = {cpus!r} is not 1-255", status=ExitStatus.CONFIG)
    try:
        memory = parse_size(data.get("memory", "512M"))
    except ValueError as e:
        raise KvmagentError(f"{main}: memory: {e}", status=ExitStatus.CONFIG) from None
    nics = data.get("nic", [])
    if not isinstance(nics, list) or not all(isinstance(n, dict) for n in nics):
        raise KvmagentError(f"{main}: nic is not an array of tables", status=ExitStatus.CONFIG)
    return {"description": str(data.get("description", f"KVM guest {name}")), "cpus": cpus,
            "memory_bytes": memory,
            "taps": [tap_name(name, i) for i, n in enumerate(nics) if n.get("mode") != "user"]}


# -- what systemd says ------------------------------------------------------------------

# Where `systemctl enable kvm@NAME` puts its symlink (WantedBy=machines.target).
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/lib/systemd/system",
             "/lib/systemd/system")


def enabled_guests(unit_dirs: tuple[str, ...] = UNIT_DIRS) -> set[str]:
    """Guests whose kvm@NAME.service is enabled: a symlink of that name in a
    *.wants/ or *.requires/ directory, which is how systemd itself finds an
    enabled template instance; not those masked (`systemctl mask`: a link
    to /dev/null named kvm@NAME.service, or kvm@.service for all, in the
    first unit directory that has the name: UNIT_DIRS is systemd's order).
    The manager has no call that lists the unit-file state of instances
    (ListUnitFilesByPatterns lists only kvm@.service), and one
    GetUnitFileState per guest is what list avoids; so is a system call per
    enabled guest (following each link was 9 ms of a listing of 200)."""
    found: set[str] = set()
    masked: set[str] = set()  # guests; "" for the template
    named: set[str] = set()  # unit files found: the first directory (of UNIT_DIRS' order) wins
    seen: set[str] = set()
    for top in unit_dirs:
        real = os.path.realpath(top)  # /lib/systemd/system is /usr/lib/... (merged /usr)
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        wants = []
        for e in entries:
            if e.name.endswith((".wants", ".requires")) and e.is_dir():
                wants.append(e.path)
            elif (e.name.startswith("kvm@") and e.name.endswith(".service")
                  and e.name not in named):
                named.add(e.name)
                if e.is_symlink():
                    with suppress(OSError):
                        if os.readlink(e.path) == "/dev/null":
                            masked.add(e.name[len("kvm@"):-len(".service")])
        for d in wants:
            try:
                found.update(e.name[len("kvm@"):-len(".service")] for e in os.scandir(d)
                             if e.name.startswith("kvm@") and e.name.endswith(".service")
                             and e.name != "kvm@.service")
            except OSError:
                continue
    if "" in masked:
        return set()
    return found - masked


def _rank(unit: dict[str, str]) -> int:
    return {"inactive": 0, "failed": 1}.get(unit["active_state"], 2)


def systemd_view(names: list[str]) -> tuple[dict[str, dict[str, str]], dict[str, str], str]:
    """(unit rows by guest, unit-file state by guest, a note when systemd
    could not be asked).  Degrades, never fails: `list` still lists."""
    if not os.path.isdir("/run/systemd/system"):
        return {}, {}, "systemd is not running on this host (not PID 1): states unknown"
    from kvmagent.host import systemd  # pystemd, for these commands only
    try:
        units = systemd.list_units(["kvm@*.service", "kvm-oneoff@*.service"])
    except KvmagentError as e:
        return {}, {}, f"states unknown: {e.message}"
    wanted = set(names)
    rows: dict[str, dict[str, str]] = {}
    for u in units:
        guest = u["name"].partition("@")[2].removesuffix(".service")
        # A defined guest runs as kvm@NAME.service, or as kvm-oneoff@NAME.service
        # (its install run, or a one-off from a copy of its file), one at a time:
        # the one running shows, else a failed one, kvm@NAME.service first.
        have = rows.get(guest)
        if guest in wanted and (have is None or (_rank(u), u["name"].startswith("kvm@")) >
                                (_rank(have), have["name"].startswith("kvm@"))):
            rows[guest] = u
    enabled = {g: "enabled" for g in enabled_guests() if g in wanted}
    return rows, enabled, ""


def state_view(paths: Paths, names: list[str]) -> tuple[dict[str, state.Figures], str]:
    try:
        conn = state.connect(paths.state_dir, create=False)
    except FileNotFoundError:
        return {}, ""  # no guest has run yet
    except (sqlite3.Error, OSError) as e:
        return {}, f"no uptime record: {state.db_path(paths.state_dir)}: {e}"
    try:
        return state.list_figures(conn, state.now(), names), ""
    except sqlite3.Error as e:
        return {}, f"no uptime record: {state.db_path(paths.state_dir)}: {e}"
    finally:
        conn.close()


# -- formatting -------------------------------------------------------------------------

def stamp(realtime: float | None) -> str:
    if realtime is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(realtime))


def reason_text(ev: uptime.Event) -> str:
    words = {state.POWEROFF: "guest powered off", state.ADMIN: "stopped by admin",
             state.SHUTDOWN: "host shutdown", state.CRASHED: "crashed",
             state.WATCHDOG: "watchdog", state.CONFIG: "bad configuration",
             state.KILLED: "supervisor killed", state.OOM: "out of memory",
             state.TIMEOUT: "timed out", state.FAILED: "failed",
             state.MIGRATED: "live migration"}
    text = words.get(ev.reason or "", ev.reason or "")
    return f"{text}: {ev.detail}" if ev.detail else text


def event_text(ev: uptime.Event) -> str:
    """The DETAIL of a history line: the reason of a stop, QEMU's pid of a
    run, and of a takeover or reload both QEMU's pid and what happened; of
    an arrival by live migration, since when the guest runs (its boot on
    the host it came from)."""
    if ev.reason:
        return reason_text(ev)
    qemu = f"QEMU pid {ev.pid}" if ev.pid else ""
    booted = f"booted {stamp(ev.booted)}" if ev.booted is not None else ""
    return "; ".join(t for t in (qemu, ev.detail, booted) if t)


def _note(text: str) -> None:
    if text:
        print(f"kvmagent: {text}", file=sys.stderr)


# -- list -------------------------------------------------------------------------------

def list_rows(paths: Paths) -> tuple[list[dict[str, Any]], list[str]]:
    dropin_dirs: set[str] = set()
    names = guest_names(paths, dropin_dirs)
    units, enabled, note1 = systemd_view(names) if names else ({}, {}, "")
    figures, note2 = state_view(paths, names) if names else ({}, "")
    facts = all_facts(paths, names, dropin_dirs)
    known = not note1
    now = state.now()
    rows = []
    for name in names:
        unit = units.get(name)
        active = unit["active_state"] if unit else ("inactive" if known else None)
        # Every row has every field (null where unknown): stable for scripts.
        row: dict[str, Any] = {
            "name": name, "state": STATES.get(active or "", "unknown"),
            "active_state": active, "sub_state": unit["sub_state"] if unit else None,
            "enabled": (enabled.get(name) == "enabled") if known else None,
            "uptime_seconds": None, "restarts": None, "qemu_pid": None,
            "description": None, "cpus": None, "memory_bytes": None, "taps": None,
            "error": None,
        }
        fig = figures.get(name)
        if fig is not None:
            row["restarts"] = fig.restarts
            run = fig.running_since
            if run is not None and (active in UP_STATES or active is None):
                row["uptime_seconds"] = int(uptime.run_uptime(run, now))
                if run.pid and os.path.exists(f"/proc/{run.pid}"):
                    row["qemu_pid"] = run.pid
        elif not note2:
            row["restarts"] = 0
        if "error" in facts[name]:
            row |= {"state": "invalid", "error": facts[name]["error"]}
        else:
            row |= facts[name]
        rows.append(row)
    unknown = [r for r in rows if r["active_state"] in UP_STATES and r["qemu_pid"] is None]
    note3 = from_systemd(unknown, now.realtime) if unknown and known else ""
    return rows, [n for n in (note1, note2, note3) if n]


def qemu_of(name: str, processes: list[tuple[int, str]]) -> int | None:
    """The QEMU among the processes of guest NAME's scope: the one started
    with -name guest=NAME (the scope holds QEMU alone, but a helper it
    started would be there too).  Pure."""
    for pid, cmdline in processes:
        if any(f"guest={name}" in word.split(",") for word in cmdline.split()):
            return pid
    return processes[0][0] if len(processes) == 1 else None


def from_systemd(rows: list[dict[str, Any]], now: float,
                 scopes: Callable[[list[str]], dict[str, Any]] | None = None) -> str:
    """For running guests that the record says nothing of (the state
    database was damaged and started anew, or its events were lost): QEMU's
    pid and the uptime as systemd knows them, from the guest's scope (its
    processes, and since when it is active: a supervisor taken over or
    reloaded leaves the scope as it is).  Only these guests cost a D-Bus
    call; a note when systemd could not be asked."""
    from kvmagent.names import scope_unit
    if scopes is None:
        from kvmagent.host import systemd
        scopes = systemd.scopes
    try:
        found = scopes([scope_unit(r["name"]) for r in rows])
    except KvmagentError as e:
        return f"QEMU unknown: {e.message}"
    for row in rows:
        scope = found.get(scope_unit(row["name"]))
        if scope is None or scope.active_state not in UP_STATES:
            continue
        row["qemu_pid"] = qemu_of(row["name"], scope.processes)
        if row["uptime_seconds"] is None and scope.since is not None:
            row["uptime_seconds"] = int(max(0.0, now - scope.since))
    return ""


def cmd_list(args: argparse.Namespace, paths: Paths) -> int:
    rows, notes = list_rows(paths)
    for n in notes:
        _note(n)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return ExitStatus.OK
    if not rows:
        print(f"no guests defined in {paths.guests_dir}")
        return ExitStatus.OK
    for line in hostlist.table(rows, color=hostlist.color_wanted()):
        print(line)
    return ExitStatus.OK


# -- status, history, reset-counters: one guest -----------------------------------------

def _known(paths: Paths, name: str) -> None:
    from kvmagent.names import GUEST_NAME_RULE, valid_guest_name
    if not valid_guest_name(name):
        raise KvmagentError(f"invalid guest name {name!r}", GUEST_NAME_RULE,
                            ExitStatus.UNKNOWN_GUEST)
    if not paths.guest_config(name).exists():
        raise KvmagentError(f"unknown guest {name!r}: {paths.guest_config(name)} does not "
                            "exist", "kvmagent list shows the defined guests",
                            ExitStatus.UNKNOWN_GUEST)


def _history(paths: Paths, name: str, since: float | None = None
             ) -> tuple[list[uptime.Event], uptime.Summary | None, str]:
    try:
        conn = state.connect(paths.state_dir, create=False)
    except FileNotFoundError:
        return [], None, ""
    except (sqlite3.Error, OSError) as e:
        return [], None, f"no uptime record: {state.db_path(paths.state_dir)}: {e}"
    try:
        summary = state.summaries(conn, [name], state.now())[name]
        return state.events(conn, [name], since), summary, ""
    except sqlite3.Error as e:
        return [], None, f"no uptime record: {state.db_path(paths.state_dir)}: {e}"
    finally:
        conn.close()


def _event_json(ev: uptime.Event) -> dict[str, Any]:
    return {"id": ev.id, "time": ev.realtime, "event": ev.event, "reason": ev.reason,
            "detail": ev.detail, "boot_id": ev.boot_id, "invocation_id": ev.invocation,
            "qemu_pid": ev.pid, "source": ev.source, "booted": ev.booted}


def _summary_json(s: uptime.Summary | None, known: bool = True) -> dict[str, Any]:
    """The figures; without a summary, zero when nothing was recorded yet
    (KNOWN), null when the record could not be read."""
    if s is None:
        nothing = 0 if known else None
        return {"uptime_seconds": None, "cumulative_uptime_seconds": nothing,
                "longest_uptime_seconds": nothing, "runs": nothing, "restarts": nothing,
                "last_failure": None, "restarts_counted_since": None}
    return {"uptime_seconds": None if s.uptime is None else int(s.uptime),
            "cumulative_uptime_seconds": int(s.cumulative),
            "longest_uptime_seconds": int(s.longest), "runs": s.runs, "restarts": s.restarts,
            "last_failure": _event_json(s.last_failure) if s.last_failure else None,
            "restarts_counted_since": s.counted_since}


def parse_since(text: str, now: float | None = None) -> float:
    """"2024-05-01", "2024-05-01 10:00", or an age: "7d", "12h", "30m"."""
    from datetime import datetime
    now = time.time() if now is None else now
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    number = text[:-1]
    if number.isascii() and number.isdigit() and len(number) <= 9 and text[-1:] in units:
        return now - int(number) * units[text[-1]]
    try:
        return datetime.fromisoformat(text).timestamp()
    except (ValueError, OverflowError, OSError):
        raise KvmagentError(f"--since {text!r}: expected a date (2024-05-01, "
                            "\"2024-05-01 10:00\") or an age (7d, 12h, 30m)",
                            status=ExitStatus.USAGE) from None


def cmd_history(args: argparse.Namespace, paths: Paths) -> int:
    _known(paths, args.name)
    since = parse_since(args.since) if args.since is not None else None
    evs, summary, note = _history(paths, args.name, since)
    _note(note)
    if args.json:
        json.dump({"name": args.name, **_summary_json(summary, known=not note),
                   "events": [_event_json(e) for e in evs]}, sys.stdout, indent=2)
        print()
        return ExitStatus.OK
    if not evs:
        print(f"no events recorded for guest {args.name}" + (" since then" if since else ""))
    else:
        print(f"{'TIME':<19}  {'EVENT':<10}  DETAIL")
        wrap = sys.stdout.isatty()  # 80 columns on a terminal; whole lines for grep
        if wrap:
            import textwrap
        for e in evs:
            line = f"{stamp(e.realtime):<19}  {e.event:<10}  {event_text(e)}".rstrip()
            if wrap and len(line) > 80:
                line = textwrap.fill(line, 80, subsequent_indent=" " * 33,
                                     break_long_words=False, break_on_hyphens=False)
            print(line)
        print()
    if summary is not None:
        line = (f"runs {summary.runs}, cumulative uptime {duration(summary.cumulative)}, "
                f"longest {duration(summary.longest)}, restarts after failures "
                f"{summary.restarts}")
        if summary.counted_since:  # on a line of its own: 80 columns
            line += f"\n(restarts counted since {stamp(summary.counted_since)})"
        print(line)
    return ExitStatus.OK


def cmd_reset_counters(args: argparse.Namespace, paths: Paths) -> int:
    _known(paths, args.name)
    try:
        conn = state.connect(paths.state_dir)
        try:
            state.reset_counters(conn, args.name)
        finally:
            conn.close()
    except PermissionError as e:
        raise KvmagentError(f"cannot write {state.db_path(paths.state_dir)}: {e.strerror}",
                            "run kvmagent as root", ExitStatus.NOPERMISSION) from None
    except (sqlite3.Error, OSError) as e:
        raise KvmagentError(f"cannot write {state.db_path(paths.state_dir)}: {e}") from None
    print(f"{args.name}: restart counter reset")
    return ExitStatus.OK
