"""Where kvmagent reads and writes, relocatable through the environment.

KVMAGENT_CONFIG_DIR, KVMAGENT_STATE_DIR and KVMAGENT_RUNTIME_DIR move
everything, so tests (and admins trying things out) never touch the host.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple


class Paths(NamedTuple):
    # A NamedTuple, not a dataclass: the long-lived supervisor imports this,
    # and dataclasses pulls in inspect (a few MiB per guest).
    config_dir: Path
    state_dir: Path
    runtime_dir: Path

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Paths":
        env = os.environ if environ is None else environ
        return cls(
            config_dir=Path(env.get("KVMAGENT_CONFIG_DIR") or "/etc/kvmagent"),
            state_dir=Path(env.get("KVMAGENT_STATE_DIR") or "/var/lib/kvmagent"),
            runtime_dir=Path(env.get("KVMAGENT_RUNTIME_DIR") or "/run/kvmagent"),
        )

    @property
    def host_config(self) -> Path:
        return self.config_dir / "kvmagent.toml"

    @property
    def guests_dir(self) -> Path:
        return self.config_dir / "guests"

    def guest_config(self, name: str) -> Path:
        return self.guests_dir / f"{name}.toml"

    def guest_runtime(self, name: str) -> Path:
        return self.runtime_dir / name

    def console_socket(self, name: str) -> Path:
        """Where guest NAME's supervisor serves its serial console."""
        return self.guest_runtime(name) / "console.sock"

    def console_key(self, name: str) -> Path:
        """Beside it: the running guest's escape key, for `kvmagent console`."""
        return self.guest_runtime(name) / "console.key"

    def control_socket(self, name: str) -> Path:
        """Guest NAME's supervisor's control channel (kvmagent.unit.channel)."""
        return self.guest_runtime(name) / "control.sock"

    def running_record(self, name: str) -> Path:
        """The running guest's QEMU and how its supervisor started it, for the
        supervisor that takes it over (kvmagent.unit.adopt)."""
        return self.guest_runtime(name) / "running.json"

    def incoming_request(self, name: str) -> Path:
        """Written by `kvmagent migrate-incoming` before it starts guest NAME's
        unit: its supervisor starts QEMU waiting for a live migration's
        stream (kvmagent.render.plan.Incoming) instead of booting the guest;
        removed once the migration succeeded or failed."""
        return self.guest_runtime(name) / "incoming.json"

    def supervisor_pid(self, name: str) -> Path:
        """Guest NAME's supervisor's pid, and QEMU's once it runs: written by
        the supervisor, read by `kvmagent stop --force` (kvmagent.cli.hardstop)."""
        return self.guest_runtime(name) / "supervisor.pid"

    def supervisor_lock(self, name: str) -> Path:
        """Locked by guest NAME's supervisor for as long as it runs (and
        across its reload): a second one cannot start (kvmagent.unit.adopt)."""
        return self.guest_runtime(name) / "supervisor.lock"


def guest_names(paths: Paths, dropin_dirs: set[str] | None = None) -> list[str]:
    """Names of the defined guests: guests/NAME.toml, sorted.  Symlinks
    count (even dangling ones: loading the guest reports them); hidden
    files, such as editors' lock files, do not.  Here, not in kvmagent.config.guests,
    so that `kvmagent list` need not import the configuration machinery.
    dropin_dirs, if given, gets the names of the NAME.toml.d directories
    found on the way (one read of the directory, no stat per guest)."""
    try:
        entries = list(os.scandir(paths.guests_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    names = []
    for e in entries:
        if e.name.startswith("."):
            continue
        if e.name.endswith(".toml") and (e.is_symlink() or e.is_file()):
            names.append(e.name[:-5])
        elif dropin_dirs is not None and e.name.endswith(".toml.d") and e.is_dir():
            dropin_dirs.add(e.name)
    return sorted(names)
