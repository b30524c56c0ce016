"""Reading the journal: the last lines of a unit, through journalctl(1).

journalctl rather than python3-systemd's Reader: it is always there with
systemd, needs no extra package, and its short-iso output is what an admin
reads anyway.  (Sending to the journal is kvmagent.host.sdnotify's.)"""

from __future__ import annotations

import os
import subprocess

JOURNALCTL = "/usr/bin/journalctl"


def tail(unit: str, lines: int = 10, timeout: float = 10.0) -> list[str]:
    """The last lines logged by or about unit; [] when there is no journal."""
    argv = [JOURNALCTL, "--unit", unit, "--lines", str(lines), "--no-pager", "--quiet",
            "--output", "short-iso"]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""}
    if not os.path.exists(JOURNALCTL):
        return []
    try:
        r = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                           timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return r.stdout.splitlines() if r.returncode == 0 else []
