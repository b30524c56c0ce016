"""`kvmagent run NAME`: the ExecStart= of kvm@NAME.service.

Its first act is to fork the child that makes the guest's plan
(kvmagent.startup:prepare: load and check the configuration, wait for the
devices, make QEMU's command line), and only then to import the supervisor:
the two imports and the checks run side by side, on their way to a guest
that runs.  Everything that follows is kvmagent.supervisor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import forkcall

if TYPE_CHECKING:
    from .paths import Paths


def main(name: str, paths: Paths | None, guest_file: str | None = None) -> int:
    """paths None: from the environment (kvmagent.paths), in both processes;
    not imported before the fork, so that the planner starts sooner."""
    planner = forkcall.Child(preload=("kvmagent.startup",))
    planner.submit("kvmagent.startup:prepare", name, paths, guest_file)
    from .paths import Paths
    from .supervisor import run
    return run(name, paths or Paths.from_env(), guest_file, planner)


def cmd_run(args: Any, paths: Paths) -> int:
    return main(args.name, paths, args.file)
