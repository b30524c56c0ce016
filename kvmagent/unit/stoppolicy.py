"""How a guest is stopped: pure logic (no I/O, the clock passed in), so the
supervisor only carries out what it returns.

- SIGTERM (systemctl stop, host shutdown): the ACPI power button, pressed
  again every POWERDOWN_INTERVAL seconds (an early press is lost) until the
  guest's stop timeout, each press extending systemd's stop timeout; then
  QMP `quit`; QUIT_GRACE seconds later, SIGKILL.  A later SIGTERM changes
  nothing.
- SIGUSR1 (`kvmagent stop --force`): SIGKILL at once, whatever came before;
  no press after it.
- on_poweroff = "keep" (QEMU runs -no-shutdown): a guest that is off, before
  the stop or by its power button, needs no more presses and no wait for the
  rest of the stop timeout: `quit` at once.
- on_reboot = "stop" (QEMU runs -action reboot=shutdown): a guest reboot is
  a poweroff (QMP SHUTDOWN, reason guest-reset).
- The exit: stopped (by either signal), powered off by the guest itself
  (QEMU exited 0 after the guest's shutdown), or crashed (anything else:
  systemd restarts the unit)."""

from __future__ import annotations

import enum
from typing import Union

POWERDOWN_INTERVAL = 3.0  # seconds between presses of the ACPI power button
QUIT_GRACE = 5.0  # after `quit`, before SIGKILL
EXTEND_SLACK = 10.0  # seconds a stop timeout extension adds beyond what is left


class Phase(enum.Enum):
    RUNNING = "running"  # no stop asked
    POWERING_OFF = "powering off"  # pressing the power button
    QUITTING = "quitting"  # `quit` sent, waiting QUIT_GRACE
    KILLED = "killed"  # SIGKILL sent: waiting for QEMU to be gone


class Outcome(enum.Enum):
    STOPPED = "stopped"  # by SIGTERM or SIGUSR1
    POWERED_OFF = "powered off"  # the guest turned itself off
    CRASHED = "crashed"  # QEMU died otherwise


class _Step:
    """An action: a small immutable value, compared by kind and fields.
    Plain classes with __slots__, not frozen dataclasses: the long-lived
    supervisor holds this module, and dataclasses brings inspect, ast, dis
    and tokenize with it (~270 KiB more per guest, measured: bench/supervisor_memory.py)."""
    __slots__: tuple[str, ...] = ()

    def __init__(self, *values: object) -> None:
        if len(values) != len(self.__slots__):
            raise TypeError(f"{type(self).__name__} takes {len(self.__slots__)} values")
        for name, value in zip(self.__slots__, values):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, _Step) and type(other) is type(self)
                and other._values() == self._values())

    def __hash__(self) -> int:
        return hash((type(self), self._values()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={v!r}" for n, v in zip(self.__slots__, self._values()))
        return f"{type(self).__name__}({fields})"


class Stopping(_Step):
    """A stop (SIGTERM) begins: tell systemd and record it."""
    __slots__ = ()


class ForceStop(_Step):
    """stop --force (SIGUSR1): tell systemd, record and log it, SIGKILL QEMU."""
    __slots__ = ()


class Press(_Step):
    """Extend systemd's stop timeout by extend_usec, then press the power
    button; `left`: seconds of the stop timeout left (for the status)."""
    __slots__ = ("left", "extend_usec")
    left: float
    extend_usec: int

    def __init__(self, left: float, extend_usec: int) -> None:
        super().__init__(left, extend_usec)


class Quit(_Step):
    """QMP `quit`; powered_off: the guest is off (on_poweroff = keep), else
    it did not power off within the stop timeout (which the log says)."""
    __slots__ = ("powered_off",)
    powered_off: bool

    def __init__(self, powered_off: bool) -> None:
        super().__init__(powered_off)


class Kill(_Step):
    """SIGKILL QEMU (`quit` was not enough)."""
    __slots__ = ()


Action = Union[Stopping, ForceStop, Press, Quit, Kill]


class StopPolicy:
    def __init__(self, stop_timeout: float, keep: bool, reboot_stops: bool = False) -> None:
        self.stop_timeout = stop_timeout  # seconds of presses before `quit`
        self.keep = keep  # on_poweroff = keep: QEMU outlives the guest
        self.reboot_stops = reboot_stops  # on_reboot = stop: a guest reboot is a poweroff
        self.phase = Phase.RUNNING
        self.guest_off = False  # the guest shut itself down (QMP SHUTDOWN)
        self.deadline = 0.0  # the end of the presses
        self.next_step = 0.0  # when tick() has something to do

    @property
    def stopping(self) -> bool:
        return self.phase is not Phase.RUNNING

    def sigterm(self, now: float) -> list[Action]:
        """SIGTERM or SIGINT: the first begins the ACPI stop (tick() presses)."""
        if self.stopping:
            return []
        self.phase = Phase.POWERING_OFF
        self.deadline = now + self.stop_timeout
        self.next_step = now
        return [Stopping()]

    def sigusr1(self, now: float) -> list[Action]:
        """SIGUSR1, at any time: QEMU is killed at once, nothing more is pressed."""
        self.phase = Phase.KILLED
        return [ForceStop()]

    def shutdown(self, reason: str) -> bool | None:
        """QMP SHUTDOWN caused by the guest, with its reason.  Whether the
        guest is off now and QEMU kept (on_poweroff = keep and no stop
        asked: it waits for one); None when the guest is not off (a reset)."""
        self.guest_off = (reason == "guest-shutdown"
                          or (self.reboot_stops and reason == "guest-reset"))
        if not self.guest_off:
            return None
        return self.keep and not self.stopping

    def tick(self, now: float) -> list[Action]:
        """After each wake-up: what is due now."""
        if (self.phase is Phase.POWERING_OFF and self.guest_off and self.keep
                and now < self.deadline):
            # The guest is off but QEMU stays (-no-shutdown): no press, no
            # wait for the rest of the stop timeout.
            self.deadline = self.next_step = now
        if self.phase in (Phase.RUNNING, Phase.KILLED) or now < self.next_step:
            return []
        if self.phase is Phase.POWERING_OFF and now < self.deadline:
            left = self.deadline - now
            self.next_step = now + POWERDOWN_INTERVAL
            return [Press(left, int((left + QUIT_GRACE + EXTEND_SLACK) * 1e6))]
        if self.phase is Phase.POWERING_OFF:
            self.phase = Phase.QUITTING
            self.next_step = now + QUIT_GRACE
            return [Quit(self.guest_off)]
        self.phase = Phase.KILLED
        return [Kill()]

    def wakeup(self) -> float | None:
        """When tick() has something to do next, if nothing happens before;
        after a tick(now), never at or before now (a time in the past would
        make the supervisor's loop spin)."""
        if self.phase in (Phase.POWERING_OFF, Phase.QUITTING):
            return self.next_step
        return None

    def outcome(self, returncode: int) -> Outcome:
        """QEMU has exited with returncode (negative: killed by a signal)."""
        if self.stopping:
            return Outcome.STOPPED
        if returncode == 0 and self.guest_off:
            return Outcome.POWERED_OFF
        return Outcome.CRASHED
