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


def guest_names(paths: Paths) -> list[str]:
    """Names of the defined guests: guests/NAME.toml, sorted.  Symlinks
    count (even dangling ones: loading the guest reports them); hidden
    files, such as editors' lock files, do not.  Here, not in kvmagent.guests,
    so that `kvmagent list` need not import the configuration machinery."""
    if not paths.guests_dir.is_dir():
        return []
    return sorted(p.name[:-5] for p in paths.guests_dir.iterdir()
                  if p.name.endswith(".toml") and not p.name.startswith(".")
                  and (p.is_symlink() or p.is_file()))
