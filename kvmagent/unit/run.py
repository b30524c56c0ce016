"""`kvmagent run NAME`: the ExecStart= of kvm@NAME.service.

Its first act is to fork the child that makes the guest's plan
(kvmagent.unit.startup:prepare: load and check the configuration, wait for the
devices, make QEMU's command line), and only then to import the supervisor:
the two imports and the checks run side by side, on their way to a guest
that runs.  Everything that follows is kvmagent.unit.supervisor."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from kvmagent.unit import forkcall

if TYPE_CHECKING:
    from kvmagent.paths import Paths


def main(name: str, paths: Paths | None, guest_file: str | None = None,
         iso: str | None = None, vnc: str | None = None) -> NoReturn:
    """paths None: from the environment (kvmagent.paths), in both processes;
    not imported before the fork, so that the planner starts sooner.
    iso (and vnc): guest NAME's install run (kvmagent install)."""
    planner = forkcall.Child(preload=("kvmagent.unit.startup",))
    planner.submit("kvmagent.unit.startup:prepare", name, paths, guest_file, iso, vnc)
    from kvmagent.names import guest_unit
    from kvmagent.paths import Paths
    from kvmagent.unit.supervisor import run
    status = run(name, paths or Paths.from_env(),
                 guest_unit(name, oneoff=guest_file is not None or iso is not None), planner)
    # The supervisor's last act: it exits at once.  Python's finalisation
    # (freeing every module's objects) added ~20 ms to each stop, measured;
    # nothing is left for it to do: the events are written, QEMU is reaped.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def cmd_run(args: Any, paths: Paths) -> NoReturn:
    main(args.name, paths, args.file, args.install, args.vnc)
