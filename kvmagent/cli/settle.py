"""`kvmagent migrate` when the destination's word is lost after the source
sent the whole guest: the source's QEMU is paused ("postmigrate") and the
destination's may run it.  Neither host may guess: the source asks the
destination again, over new ssh sessions (`migrate-incoming NAME --where`),
and kvmagent.render.migration.settle_step decides.  The guest is ended here
only when it runs there, resumed here only when its arrival there failed,
and otherwise left paused here, said loudly: running it twice on one shared
disk would corrupt that disk, which no later step can undo.

`kvmagent migrate NAME HOST` run again on a guest left paused so settles it
the same way, without moving anything."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Callable
from typing import Any

from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.host import ssh
from kvmagent.names import service_unit
from kvmagent.paths import Paths
from kvmagent.render.migration import Settle, Where, settle_step
from kvmagent.unit import protocol

ASK_TIMEOUT = 20.0  # seconds for one ask over ssh (its connection: ssh.CONNECT_TIMEOUT)
ASK_EVERY = 1.0  # seconds between asks

Say = Callable[..., None]  # (event, text, **fields): kvmagent.cli.migrate's _say


def where(name: str, paths: Paths) -> Where:
    """The destination: what it says of guest NAME (migrate-incoming --where)."""
    from kvmagent.host import state, systemd
    unit = systemd.active_state(service_unit(name))
    runstate: str | None = None
    arriving = False
    try:
        status = protocol.call(paths.control_socket(name), protocol.MigrateStatusAsk(),
                               protocol.MigrationStatus, timeout=5.0)
        arriving = status.phase == "incoming"
        runstate = status.runstate or ("inmigrate" if arriving else None)
    except KvmagentError:
        pass
    last: list[str | None] | None = None
    try:
        conn = state.connect(paths.state_dir, create=False)
        try:
            rows = state.events(conn, [name])
        finally:
            conn.close()
        if rows:
            last = [rows[-1].event, rows[-1].reason, rows[-1].detail]
    except (OSError, sqlite3.Error):
        pass
    return Where(unit or "inactive", runstate, arriving, last)  # None: not loaded


def ask(target: ssh.Target, name: str, enable: bool) -> Where | None:
    """The source: ask TARGET; None when it cannot be asked or says nothing
    readable.  ENABLE: enable kvm@NAME there if the guest runs there."""
    proc = ssh.start(target, ["migrate-incoming", name, "--where"]
                     + (["--enable"] if enable else []))
    try:
        out, _ = proc.communicate(timeout=ASK_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None
    try:
        return Where.from_json(json.loads(out))
    except ValueError:
        return None


def settle(target: ssh.Target, name: str, control: Any, why: str, say: Say,
           interrupted: list[int], enabled: bool) -> int | None:
    """None: the guest runs on TARGET, end it here.  Otherwise resumed here
    (exit status 1), or held paused here (KvmagentError, exit status 1,
    saying what to do)."""
    say("unconfirmed", f"guest {name}'s state went to {target}, which did not confirm that "
        f"it runs there ({why}); asking {target}, the guest paused here meanwhile",
        host=str(target), why=why)
    t0, pressed = time.monotonic(), len(interrupted)
    while True:
        there = ask(target, name, enabled)
        step, said = settle_step(there, time.monotonic() - t0)
        if step is Settle.WAIT and len(interrupted) > pressed:
            step, said = Settle.HOLD, "interrupted while asking the destination"
        if step is Settle.END:
            return None
        if step is Settle.RESUME:
            cancelled = protocol.call(control, protocol.CancelAsk(str(target), said, resume=True),
                                      protocol.Cancelled)
            say("cancelled", f"migration of guest {name} to {target} cancelled: {said}; the "
                "guest runs on here", why=said, resumed=cancelled.resumed)
            return ExitStatus.FAILURE
        if step is Settle.HOLD:
            say("held", f"guest {name} is left paused here: {said}", host=str(target),
                why=said)
            raise KvmagentError(
                f"guest {name} is left paused here, its state sent to {target}: {said}",
                f"once {target} answers, run `kvmagent migrate {name} {target}` again: it ends "
                f"the guest here if it runs there, or resumes it here if its arrival failed",
                ExitStatus.FAILURE)
        time.sleep(ASK_EVERY)
