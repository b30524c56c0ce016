"""Test-only hooks in the supervisor: a point in its life where a system
test makes it fail (an exception) or wait (so that the test can kill -9
it exactly there).  Never used by the package: a hook is active only when
the supervisor's environment has KVMAGENT_TEST_HOOKS=1, which the system
tests set in a drop-in for kvm@.service inside their throwaway test host,
and a file /run/kvmagent/NAME/test-hook (the runtime directory) says
"POINT raise" or "POINT wait".  The file is removed when its point is
reached, so the supervisor that systemd starts next runs on; a waiting
supervisor says so in test-hook.reached and waits until it is killed.

Off, a point costs one function call and a test of a constant; this module
imports nothing beyond the interpreter's own (os and time are loaded at
start anyway), so the long-lived supervisor stays as light as it was."""

from __future__ import annotations

import os
import time

# Where the supervisor is when a test may stop it: before QEMU runs the
# guest (paused, in its scope), after it does (before the fds are kept in
# systemd's fd store), running (the main loop), and as an ACPI stop begins.
POINTS = ("before-cont", "after-cont", "running", "stopping")
ACTIVE = os.environ.get("KVMAGENT_TEST_HOOKS") == "1"
HOOK_FILE = "test-hook"
REACHED_FILE = "test-hook.reached"


class InjectedFailure(Exception):
    """The exception a hook raises: an unexpected failure of the supervisor."""


def point(directory: str, name: str) -> None:
    """At point NAME: fail or wait if DIRECTORY/test-hook says so."""
    if not ACTIVE:
        return
    path = os.path.join(directory, HOOK_FILE)
    try:
        with open(path) as f:
            where, _, action = f.read().strip().partition(" ")
    except OSError:
        return
    if where != name:
        return
    os.unlink(path)
    if action == "raise":
        raise InjectedFailure(f"test hook: an exception at {name}")
    with open(os.path.join(directory, REACHED_FILE), "w") as f:
        f.write(f"{name} {os.getpid()}\n")
    while True:  # until kill -9
        time.sleep(60)
