"""How a guest is stopped: presses, `quit`, SIGKILL, the exit status
(kvmagent.unit.stoppolicy, pure, with the clock passed in)."""

from __future__ import annotations

import random

import pytest

from kvmagent.unit.stoppolicy import (
    EXTEND_SLACK, POWERDOWN_INTERVAL, QUIT_GRACE, Action, ForceStop, Kill, Outcome, Phase, Press,
    Quit, Stopping, StopPolicy)

T0 = 1000.0


def press(left: float) -> Press:
    return Press(left, int((left + QUIT_GRACE + EXTEND_SLACK) * 1e6))


def run_until(policy: StopPolicy, end: float) -> list[tuple[float, Action]]:
    """Wake up when the policy asks (as the supervisor's loop does, when
    nothing else happens), up to END: what it did, and when."""
    done: list[tuple[float, Action]] = []
    while (t := policy.wakeup()) is not None and t <= end:
        done += [(t, a) for a in policy.tick(t)]
    return done


def test_running_guest_has_nothing_to_do() -> None:
    policy = StopPolicy(stop_timeout=30, keep=False)
    assert not policy.stopping
    assert policy.tick(T0) == []
    assert policy.wakeup() is None


def test_sigterm_presses_at_once_and_a_guest_that_powers_off_is_stopped() -> None:
    policy = StopPolicy(stop_timeout=30, keep=False)
    assert policy.sigterm(T0) == [Stopping()]
    assert policy.stopping and policy.wakeup() == T0
    assert policy.tick(T0) == [press(30)]
    assert policy.wakeup() == T0 + POWERDOWN_INTERVAL
    assert policy.tick(T0 + 1) == []  # too early for the next press
    assert policy.tick(T0 + POWERDOWN_INTERVAL) == [press(30 - POWERDOWN_INTERVAL)]
    # the guest powers off; QEMU (no -no-shutdown) exits by itself
    assert policy.shutdown("guest-shutdown") is False
    assert policy.outcome(0) is Outcome.STOPPED


def test_a_guest_that_never_powers_off_is_quit_then_killed() -> None:
    policy = StopPolicy(stop_timeout=14, keep=False)
    policy.sigterm(T0)
    done = run_until(policy, T0 + 100)
    presses = [t - T0 for t, a in done if isinstance(a, Press)]
    assert presses == [0, 3, 6, 9, 12]  # every POWERDOWN_INTERVAL until the timeout
    # the first wake-up at or after the timeout quits, QUIT_GRACE later kills
    assert [(t - T0, a) for t, a in done if not isinstance(a, Press)] == \
        [(15, Quit(powered_off=False)), (15 + QUIT_GRACE, Kill())]
    assert policy.phase is Phase.KILLED and policy.wakeup() is None
    assert policy.tick(T0 + 3600) == []  # nothing more: no second kill
    assert policy.outcome(-9) is Outcome.STOPPED


def test_quit_answered_ends_the_stop_before_the_kill() -> None:
    policy = StopPolicy(stop_timeout=2, keep=False)
    policy.sigterm(T0)
    assert policy.tick(T0) == [press(2)]
    assert policy.tick(T0 + 3) == [Quit(powered_off=False)]
    assert policy.phase is Phase.QUITTING and policy.wakeup() == T0 + 3 + QUIT_GRACE
    assert policy.tick(T0 + 4) == []  # QEMU is exiting: no kill yet
    assert policy.outcome(0) is Outcome.STOPPED  # QEMU exited on `quit`


def test_timeout_extension_covers_what_is_left_and_the_rest_of_the_stop() -> None:
    """Each press extends systemd's stop timeout by the presses' time left
    plus QUIT_GRACE plus slack: systemd never kills before the policy does."""
    policy = StopPolicy(stop_timeout=90, keep=False)
    policy.sigterm(T0)
    for t, action in run_until(policy, T0 + 89.9):
        assert isinstance(action, Press)
        assert action.left == pytest.approx(T0 + 90 - t)
        assert action.extend_usec == int((action.left + QUIT_GRACE + EXTEND_SLACK) * 1e6)
        # the kill comes at most POWERDOWN_INTERVAL + QUIT_GRACE after the timeout
        assert t + action.extend_usec / 1e6 >= T0 + 90 + POWERDOWN_INTERVAL + QUIT_GRACE
    assert press(0.5).extend_usec == 15_500_000


def test_a_second_sigterm_changes_nothing() -> None:
    policy = StopPolicy(stop_timeout=30, keep=False)
    policy.sigterm(T0)
    policy.tick(T0)
    assert policy.sigterm(T0 + 20) == []
    assert policy.wakeup() == T0 + POWERDOWN_INTERVAL  # the deadline stays
    assert policy.tick(T0 + 31) == [Quit(powered_off=False)]


@pytest.mark.parametrize("before", ["running", "powering off", "quitting", "killed"])
def test_sigusr1_kills_at_once_whatever_came_before(before: str) -> None:
    policy = StopPolicy(stop_timeout=14, keep=False)
    if before != "running":
        policy.sigterm(T0)
        run_until(policy, T0 + {"powering off": 4, "quitting": 16, "killed": 30}[before])
        assert policy.phase.value == before
    assert policy.sigusr1(T0 + 40) == [ForceStop()]
    # no press, `quit` or kill after it, and no wake-up for them
    assert policy.stopping and policy.phase is Phase.KILLED
    assert policy.wakeup() is None
    assert policy.tick(T0 + 41) == [] and policy.tick(T0 + 1000) == []
    assert policy.sigterm(T0 + 42) == []  # a SIGTERM after it starts no ACPI stop
    assert policy.outcome(-9) is Outcome.STOPPED


def test_sigusr1_twice_kills_twice() -> None:
    """QEMU may take a moment to die; a second stop --force kills again."""
    policy = StopPolicy(stop_timeout=14, keep=False)
    assert policy.sigusr1(T0) == [ForceStop()]
    assert policy.sigusr1(T0 + 1) == [ForceStop()]


def test_keep_guest_already_off_is_quit_at_once() -> None:
    policy = StopPolicy(stop_timeout=60, keep=True)
    assert policy.shutdown("guest-shutdown") is True  # off, QEMU kept: the unit stays
    assert policy.wakeup() is None and policy.tick(T0) == []
    assert policy.sigterm(T0 + 100) == [Stopping()]
    assert policy.tick(T0 + 100) == [Quit(powered_off=True)]  # no press
    assert policy.wakeup() == T0 + 100 + QUIT_GRACE
    assert policy.tick(T0 + 100 + QUIT_GRACE) == [Kill()]
    assert policy.outcome(-9) is Outcome.STOPPED


def test_keep_guest_powered_off_by_the_button_is_quit_without_waiting() -> None:
    policy = StopPolicy(stop_timeout=60, keep=True)
    policy.sigterm(T0)
    assert policy.tick(T0) == [press(60)]
    assert policy.shutdown("guest-shutdown") is False  # stopping: not "kept"
    # the next wake-up (any: a QMP event) quits, well before the next press
    assert policy.tick(T0 + 1.5) == [Quit(powered_off=True)]
    assert policy.outcome(0) is Outcome.STOPPED


def test_guest_poweroff_without_a_stop_ends_the_unit_successfully() -> None:
    policy = StopPolicy(stop_timeout=60, keep=False)
    assert policy.shutdown("guest-shutdown") is False
    assert not policy.stopping and policy.wakeup() is None
    assert policy.tick(T0) == []
    assert policy.outcome(0) is Outcome.POWERED_OFF


def test_a_guest_reset_is_not_a_poweroff() -> None:
    policy = StopPolicy(stop_timeout=60, keep=False)
    assert policy.shutdown("guest-shutdown") is False
    assert policy.shutdown("guest-reset") is None  # -no-reboot: QEMU exits 0
    assert policy.outcome(0) is Outcome.CRASHED


@pytest.mark.parametrize("keep", [False, True])
def test_on_reboot_stop_makes_a_guest_reboot_a_poweroff(keep: bool) -> None:
    """-action reboot=shutdown: QMP SHUTDOWN with reason guest-reset, then
    QEMU exits 0 (or, -no-shutdown, stays with the guest off)."""
    policy = StopPolicy(stop_timeout=60, keep=keep, reboot_stops=True)
    assert policy.shutdown("host-qmp-system-reset") is None  # not the guest's own reboot
    assert policy.shutdown("guest-reset") is keep
    assert policy.outcome(0) is Outcome.POWERED_OFF


@pytest.mark.parametrize("rc", [1, -9, -11])
def test_qemu_dying_on_its_own_is_a_crash(rc: int) -> None:
    policy = StopPolicy(stop_timeout=60, keep=False)
    assert policy.outcome(rc) is Outcome.CRASHED
    policy.shutdown("guest-shutdown")
    assert policy.outcome(rc) is Outcome.CRASHED  # off, but QEMU failed


@pytest.mark.parametrize("rc", [0, 1, -9])
def test_qemu_exiting_during_the_stop_is_a_stop(rc: int) -> None:
    policy = StopPolicy(stop_timeout=60, keep=False)
    policy.sigterm(T0)
    policy.tick(T0)
    assert policy.outcome(rc) is Outcome.STOPPED


def test_stop_timeout_zero_quits_at_once() -> None:
    policy = StopPolicy(stop_timeout=0, keep=False)
    policy.sigterm(T0)
    assert policy.tick(T0) == [Quit(powered_off=False)]


@pytest.mark.parametrize("trial", range(20))
def test_the_wake_up_time_is_never_in_the_past(trial: int) -> None:
    """After every tick(now), the next wake-up is later than now or None: a
    time in the past would make the supervisor's loop spin (it once did,
    for as long as a stop took).  Wake-ups early, late and at random, with
    signals and events in between."""
    rnd = random.Random(trial)
    policy = StopPolicy(stop_timeout=rnd.choice([0, 1, 7, 14]), keep=rnd.random() < 0.5)
    now = T0
    for _ in range(200):
        now += rnd.choice([0.0, 0.001, 0.4, 1.0, 2.9, 3.0, 5.0, 60.0])
        event = rnd.random()
        if event < 0.05:
            policy.sigterm(now)
        elif event < 0.07:
            policy.sigusr1(now)
        elif event < 0.1:
            policy.shutdown(rnd.choice(["guest-shutdown", "guest-reset"]))
        policy.tick(now)
        wake = policy.wakeup()
        assert wake is None or wake > now, (now, wake, policy.phase)
        assert (wake is None) == (policy.phase in (Phase.RUNNING, Phase.KILLED))
