"""`kvmagent list`'s table, for this host or for several (`list -H a -H b`):
the listings of the hosts (each host's `kvmagent list --json`) merged into
one, with the host of each guest in a HOST column and a "host" field.

Pure: text in, rows, lines and an exit status out; kvmagent.cli.remote
runs ssh.  A host that cannot be reached, or whose kvmagent fails, is said
on stderr with its name and the others are listed; the exit status then
says so (EXIT_STATUS)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, NamedTuple

from kvmagent.config.values import format_size
from kvmagent.errors import ExitStatus

NAME_WIDTH = 12  # so that a row fits 80 columns
HOST_WIDTH = 12
UNREACHABLE = ExitStatus.UNREACHABLE.value  # ssh's, when it could not reach the host
_COLORS = {"running": "32", "failed": "31", "invalid": "31", "starting": "33",
           "stopping": "33"}
EXIT_STATUS = ("0 when every host listed its guests; 255 when one or more could not be "
               "reached; else the exit status of the first host whose kvmagent failed "
               "(1 for an answer that is not a listing)")


class HostListing(NamedTuple):
    """What `kvmagent list --json` on one host gave: its exit status, output, errors."""

    host: str
    status: int
    stdout: str
    stderr: str


class Merged(NamedTuple):
    rows: list[dict[str, Any]]  # each guest's record, "host" first, hosts in the order given
    notes: list[str]  # for stderr, each naming its host
    status: int


def _lines(text: str) -> list[str]:
    return [line.removeprefix("kvmagent: ") for line in text.splitlines() if line.strip()]


def merge(listings: list[HostListing]) -> Merged:
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    status = ExitStatus.OK.value
    unreachable = False
    for listing in listings:
        said = _lines(listing.stderr)
        if listing.status == UNREACHABLE:
            unreachable = True
            why = said[-1] if said else "ssh failed"
            notes.append(f"{listing.host}: cannot reach it over ssh (exit status 255): {why}")
            continue
        records: Any = None
        if listing.status == 0:
            try:
                records = json.loads(listing.stdout)
            except ValueError:
                pass
            if not (isinstance(records, list) and all(isinstance(r, dict) for r in records)):
                notes += [f"{listing.host}: {line}" for line in said]
                notes.append(f"{listing.host}: kvmagent list --json gave no listing")
                status = status or ExitStatus.FAILURE.value
                continue
        notes += [f"{listing.host}: {line}" for line in said]
        if listing.status != 0:
            notes.append(f"{listing.host}: kvmagent list failed (exit status {listing.status})")
            status = status or listing.status
            continue
        rows += [{"host": listing.host, **{k: v for k, v in r.items() if k != "host"}}
                 for r in records]
    return Merged(rows, notes, UNREACHABLE if unreachable else status)


# -- the table ---------------------------------------------------------------------------

def duration(seconds: float | None) -> str:
    """Two units at most: 3d 04h, 5h 02m, 12m 05s, 42s."""
    if seconds is None:
        return "-"
    s = int(seconds)
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if d:
        return f"{d}d {h:02d}h"
    if h:
        return f"{h}h {m:02d}m"
    if m:
        return f"{m}m {s % 60:02d}s"
    return f"{s}s"


def color_wanted() -> bool:
    return (sys.stdout.isatty() and not os.environ.get("NO_COLOR")  # no-color.org: non-empty
            and os.environ.get("TERM") != "dumb")


def paint(text: str, word: str, width: int = 0, color: bool | None = None) -> str:
    padded = text.ljust(width)
    code = _COLORS.get(word)
    if code and (color_wanted() if color is None else color):
        return f"\x1b[{code}m{text}\x1b[0m" + padded[len(text):]
    return padded


def _taps(taps: list[str], room: int = 15) -> str:
    if not taps:
        return "-"
    text = taps[0] + (f" +{len(taps) - 1}" if len(taps) > 1 else "")
    return text if len(text) <= room else f"{len(taps)} taps"


def _memory(nbytes: int) -> str:
    """The size as written (512M, 2G), or rounded when that is wider than the
    column (100000M: 97.7G)."""
    text = format_size(nbytes)
    if len(text) <= 6:
        return text
    for unit, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= factor:
            return f"{nbytes / factor:.1f}{unit}" if nbytes < 1000 * factor else \
                f"{nbytes // factor}{unit}"
    return text


def table(rows: list[dict[str, Any]], hosts: bool = False, color: bool = False) -> list[str]:
    """The listing's lines: a header, then a line per guest (two for a name
    wider than its column); hosts: a HOST column first, from each row's "host"."""
    w = min(NAME_WIDTH, max(4, *(len(r["name"]) for r in rows)))
    hw = min(HOST_WIDTH, max(4, *(len(r["host"]) for r in rows))) if hosts else 0
    lines = [(f"{'HOST':<{hw}} " if hosts else "")
             + f"{'NAME':<{w}} {'STATE':<8} {'UPTIME':>8} {'RESTARTS':>8} {'CPUS':>4} "
             f"{'MEMORY':>6} {'PID':>7} {'BOOT':<4} TAPS"]
    for r in rows:
        name = r["name"]
        host = r["host"] if hosts else ""
        if len(name) > w or len(host) > hw:
            lines.append(f"{host} {name}" if hosts else name)
            name = host = ""
        lead = f"{host:<{hw}} " if hosts else ""
        if r["state"] == "invalid":
            hint = f"(kvmagent validate {r['name']})"
            if len(lead) + w + 10 + len(hint) > 80:
                hint = "(kvmagent validate NAME)"
            lines.append(f"{lead}{name:<{w}} {paint('invalid', 'invalid', 8, color)} {hint}")
            continue
        boot = "-" if r["enabled"] is None else ("yes" if r["enabled"] else "no")
        restarts = "-" if r["restarts"] is None else str(r["restarts"])
        uptime = duration(r["uptime_seconds"])
        if len(uptime) > 8:  # a thousand days and more: the days alone
            uptime = uptime.split()[0]
        lines.append(f"{lead}{name:<{w}} {paint(r['state'], r['state'], 8, color)} "
                     f"{uptime:>8} {restarts:>8} {r['cpus']:>4} "
                     f"{_memory(r['memory_bytes']):>6} {r['qemu_pid'] or '-':>7} {boot:<4} "
                     f"{_taps(r['taps'])}")
    return lines
