"""The one error type of kvmagent, and the exit statuses it maps to.

Every expected failure (bad configuration, unknown guest, host not ready, a
runtime failure) is raised as KvmagentError; the CLI turns it into one message
on stderr plus an optional hint, and exits with the error's status.  Nothing
that an admin can cause should end in a traceback.
"""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    """Documented exit statuses (see kvmagent(1) and README.md).

    The numbers follow the LSB init-script conventions that systemd also
    uses (EXIT_NOTCONFIGURED = 6 and so on), so kvm@.service can say
    RestartPreventExitStatus=6 8 and never loop on a bad configuration.
    """

    OK = 0
    FAILURE = 1  # runtime failure: QEMU, D-Bus, netlink or the guest failed
    USAGE = 2  # bad command line (argparse uses 2 as well)
    NOPERMISSION = 4  # needs root (or membership of a group) for this action
    HOST_NOT_READY = 5  # bridge, disk, kernel image, /dev/kvm or QEMU missing
    CONFIG = 6  # invalid configuration (EXIT_NOTCONFIGURED)
    NOT_RUNNING = 7  # the guest is not running (EXIT_NOTRUNNING)
    UNKNOWN_GUEST = 8  # no guests/NAME.toml for this name
    UNREACHABLE = 255  # -H: ssh could not reach the host, or lost it (ssh's own status)


EXIT_STATUS_HELP = """\
exit status:
  0  success
  1  runtime failure (QEMU, systemd, netlink or the guest failed)
  2  usage error (bad command line)
  4  insufficient privileges (run as root)
  5  host not ready (missing bridge, disk, kernel image, /dev/kvm or QEMU)
  6  configuration error (names the file, key and value)
  7  guest not running
  8  unknown guest (no guests/NAME.toml)
  255  -H: ssh could not reach the host, or lost the connection"""


class KvmagentError(Exception):
    """An expected failure: a message, an optional hint and an exit status."""

    def __init__(self, message: str, hint: str | None = None,
                 status: ExitStatus = ExitStatus.FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.status = status

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


def config_error(message: str, hint: str | None = None) -> KvmagentError:
    return KvmagentError(message, hint, ExitStatus.CONFIG)


def host_error(message: str, hint: str | None = None) -> KvmagentError:
    return KvmagentError(message, hint, ExitStatus.HOST_NOT_READY)
