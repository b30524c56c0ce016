"""The systemd semantics that let a guest's QEMU outlive its supervisor (issue 18,
points 1 and 2), proved with stand-ins on a Debian 12 (systemd 252) and a Debian 13
(systemd 257) test host.  No QEMU: tests/system/adoption_standin.py is the supervisor
(main process of standin@NAME.service, settings as kvm@.service would have them) and
its "guest", which the supervisor puts into kvm-NAME.scope with StartTransientUnit.

What kvmagent relies on, each asserted below on both releases:
- the scope PartOf= + Before= the service (not BindsTo=, not StopPropagatedFrom=):
  a crash of the supervisor (SIGKILL, exit status 1) and its auto-restart leave the
  scope and its process alone; `systemctl stop` stops the scope only after the
  supervisor's own stop finished; at host shutdown the same order holds;
- `systemctl restart` of the service does not reach the scope through PartOf= (nor,
  measured, through BindsTo=): ending the guest on SIGTERM is the supervisor's job;
- the file descriptor store keeps the supervisor's end of a socketpair across a crash
  (the guest sees no EOF) and hands it back in LISTEN_FDS; it drops it on a stop;
- RuntimeDirectoryPreserve=restart keeps the runtime directory across an auto-restart;
- past the start limit the scope is orphaned; an OnFailure= unit that acts only when
  the service is failed or inactive stops it (257 triggers OnFailure= on every
  auto-restart too, 252 only on the final failure);
- a stop in the auto-restart gap stops the scope at once with SIGTERM (not graceful):
  RestartSec=0 keeps the gap short;
- execv() of the supervisor (same PID) goes unnoticed by systemd, watchdog included;
  `systemctl reload` with RELOADING=1 waits for READY=1 (252 and 257) only if the
  ExecReload= process outlives the supervisor's RELOADING=1.

Timings are printed (pytest -s); they are asserted only loosely.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import TestHost, rootfs
from tests.harness.install import REPO

pytestmark = pytest.mark.system

LOG = "/standin-log"  # bound from the test's tmp dir: survives the container's reboot
_logs: dict[str, Path] = {}  # test host's name -> LOG's directory on this side
STANDIN = "/src/kvmagent/tests/system/adoption_standin.py"

# The stand-in's service: what kvm@.service would need (RestartSec=0, the fd store,
# RuntimeDirectoryPreserve=restart, OnFailure=), plus kvm@'s Type, NotifyAccess, KillMode.
SERVICE = f"""[Unit]
Description=stand-in supervisor %i
OnFailure=standin-orphan@%i.service
StartLimitIntervalSec=10min
StartLimitBurst=3

[Service]
Type=notify
NotifyAccess=main
ExecStart=/usr/bin/python3 {STANDIN} supervisor %i
KillMode=mixed
Restart=on-failure
RestartSec=0
FileDescriptorStoreMax=4
RuntimeDirectory=standin/%i
RuntimeDirectoryPreserve=restart
Environment=STANDIN_LOG={LOG} "STANDIN_SCOPE_DEPS=PartOf Before" STANDIN_FDSTORE=before-ready
"""

# OnFailure= of the service: stops the scope unless the service is being restarted
# (on 257 OnFailure= also fires before each auto-restart, the service then being
# "activating/auto-restart").
ORPHAN = f"""[Unit]
Description=stop the orphaned scope of stand-in %i

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'state=$$(systemctl show -P ActiveState standin@%i.service); \
echo "$$state $$MONITOR_SERVICE_RESULT" >> {LOG}/%i.onfailure; \
case $$state in failed|inactive) systemctl stop kvm-%i.scope;; esac'
"""


@pytest.fixture(params=list(rootfs.RELEASES))
def host(request: pytest.FixtureRequest, system_ok: None, tmp_path: Path) -> Iterator[TestHost]:
    """A booted test host of one release, the stand-in's units installed."""
    release = request.param
    try:
        rootfs.cached_root(release)
    except Exception as exc:  # a missing cache fails, never skips
        pytest.fail(str(exc), pytrace=False)
    (tmp_path / "log").mkdir()
    with TestHost(root=release, src=REPO, bind=[(tmp_path / "log", LOG)],
                  journal_dir=tmp_path / "journal") as th:
        th.write_file("/etc/systemd/system/standin@.service", SERVICE)
        th.write_file("/etc/systemd/system/standin-orphan@.service", ORPHAN)
        th.exec(["systemctl", "daemon-reload"])
        _logs[th.name] = tmp_path / "log"
        yield th


# -- helpers ------------------------------------------------------------------------------

def configure(th: TestHost, name: str, dropin: str) -> None:
    th.write_file(f"/etc/systemd/system/standin@{name}.service.d/test.conf", dropin)
    th.exec(["systemctl", "daemon-reload"])


def show(th: TestHost, unit: str, *props: str) -> dict[str, str]:
    out = th.exec(["systemctl", "show", unit, *(f"--property={p}" for p in props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def events(th: TestHost, name: str) -> list[dict[str, Any]]:
    path = _logs[th.name] / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def last(th: TestHost, name: str, event: str, **match: object) -> dict[str, Any]:
    found = [e for e in events(th, name) if e["ev"] == event
             and all(e.get(k) == v for k, v in match.items())]
    assert found, (event, match, events(th, name)[-10:])
    return found[-1]


def since(th: TestHost, name: str, t: float) -> list[dict[str, Any]]:
    return [e for e in events(th, name) if e["t"] >= t]


def wait(what: str, cond: Callable[[], Any], th: TestHost, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}\n" + th.journal()[-3000:])
        time.sleep(0.05)


def monotonic(th: TestHost) -> float:
    return float(th.exec(["python3", "-c", "import time; print(time.monotonic())"]).stdout)


def signal_main(th: TestHost, name: str, sig: str) -> tuple[float, int]:
    """Send sig to the supervisor; the container's CLOCK_MONOTONIC just before it."""
    pid = int(show(th, f"standin@{name}.service", "MainPID")["MainPID"])
    assert pid > 0
    code = (f"import os, signal, time; t = time.monotonic(); os.kill({pid}, signal.{sig}); "
            "print(t)")
    return float(th.exec(["python3", "-c", code]).stdout), pid


def restarted(th: TestHost, name: str, n: int) -> dict[str, str]:
    """Wait for standin@name's n-th restart to be active, its supervisor ready."""
    def done() -> dict[str, str] | None:
        s = show(th, f"standin@{name}.service", "ActiveState", "SubState", "NRestarts",
                 "MainPID", "NFileDescriptorStore")
        ready = [e for e in events(th, name)
                 if e["ev"] == "sup-ready" and e["pid"] == int(s["MainPID"])]
        return s if s["NRestarts"] == str(n) and s["ActiveState"] == "active" and ready \
            else None
    return wait(f"standin@{name} restarted {n} times and ready", done, th)  # type: ignore


def pid1_order(th: TestHost, units: list[str], *messages: str) -> list[int]:
    """Where each message (a prefix) last appears among systemd's journal messages about
    units, in the order PID 1 logged them (journal timestamps are journald's receive
    times, too coarse to order against the stand-ins' own clock readings)."""
    lines = th.exec(["journalctl", "-o", "cat", "--no-pager", *(f"--unit={u}" for u in units)]
                    ).stdout.splitlines()
    found = [max((i for i, line in enumerate(lines) if line.startswith(m)), default=-1)
             for m in messages]
    assert -1 not in found, (messages, lines[-20:])
    return found


def alive(th: TestHost, pid: int) -> bool:
    r = th.exec(["sh", "-c", f"grep -q '^State:.[^Z]' /proc/{pid}/status"], check=False)
    return r.returncode == 0


def scope_state(th: TestHost, name: str) -> str:
    return show(th, f"kvm-{name}.scope", "ActiveState")["ActiveState"]


def start(th: TestHost, name: str) -> int:
    """Start standin@name; the guest's PID, which is in kvm-name.scope."""
    th.exec(["systemctl", "start", f"standin@{name}"])
    guest = int(last(th, name, "scope-started")["guest"])
    # the guest logs its own start when it runs, which may come after the scope's:
    # a test's "since" must not see it as a second start
    wait("the guest's own start", lambda: [e for e in events(th, name)
                                           if e["ev"] == "guest-start" and e["pid"] == guest], th)
    assert scope_state(th, name) == "active"
    assert f"kvm-{name}.scope" in th.exec(["cat", f"/proc/{guest}/cgroup"]).stdout
    return guest


def report(th: TestHost, what: str, value: object) -> None:
    print(f"[{th.release}] {what}: {value}")


# -- tests --------------------------------------------------------------------------------

def test_crash_keeps_the_guest_its_socket_and_runtime_dir_a_stop_ends_it_after(
        host: TestHost) -> None:
    """(a) SIGKILL and exit status 1 of the supervisor: auto-restart, same guest,
    adopted, its socket handed back by the fd store, no EOF seen by the guest, the
    runtime directory kept.  (b) `systemctl stop`: the scope is stopped only after
    the supervisor's stop ended, and the fd store is emptied."""
    th, name = host, "a"
    guest = start(th, name)
    assert show(th, "standin@a.service", "NFileDescriptorStore")["NFileDescriptorStore"] == "1"
    first = last(th, name, "sup-ready")["pid"]

    for n, sig, result in ((1, "SIGKILL", "signal"), (2, "SIGUSR1", "exit-code")):
        t_kill, old = signal_main(th, name, sig)
        s = restarted(th, name, n)
        new = int(s["MainPID"])
        begun = last(th, name, "sup-start", pid=new)
        adopted = last(th, name, "adopt", pid=new)
        assert adopted["guest"] == guest and alive(th, guest)
        assert scope_state(th, name) == "active"
        # the stored socket, handed back and still connected to the guest
        assert (begun["LISTEN_FDS"], begun["LISTEN_FDNAMES"], begun["LISTEN_PID"]) == (
            "1", "guest", str(new))
        assert last(th, name, "stored-fd", pid=new)["answer"] == f"pong {guest}"
        assert s["NFileDescriptorStore"] == "1"  # stored again by the new one: not twice
        # RuntimeDirectoryPreserve=restart: what the first supervisor left is there
        assert f"sup-{first}-0" in begun["runtime_files"]
        report(th, f"{sig}: kill -> new supervisor's first line / READY=1 (RestartSec=0), ms",
               (round((begun["t"] - t_kill) * 1000),
                round((last(th, name, "sup-ready", pid=new)["t"] - t_kill) * 1000)))
        assert begun["t"] - t_kill < 2.0
    journal = th.journal("standin@a.service")
    assert "Main process exited, code=killed, status=9/KILL" in journal
    assert "Main process exited, code=exited, status=1/FAILURE" in journal
    assert not [e for e in events(th, name) if e["ev"] in ("guest-eof", "guest-signal")]

    # (b) an explicit stop: the supervisor's stop runs while the guest lives, the
    # scope is stopped (SIGTERM) after the service is inactive; the fd store is emptied
    th.exec(["systemctl", "stop", "standin@a"])
    wait("the guest gone", lambda: not alive(th, guest), th)
    begin, end = last(th, name, "sup-stop-begin"), last(th, name, "sup-stop-end")
    signalled = last(th, name, "guest-signal")
    assert begin["guest_alive"] and end["guest_alive"]
    assert end["t"] < signalled["t"] and signalled["signal"] == "SIGTERM"
    stopped, stopping = pid1_order(th, ["standin@a.service", "kvm-a.scope"],
                                   "Stopped standin@a.service", "Stopping kvm-a.scope")
    assert stopped < stopping
    report(th, "stop: supervisor's stop ended -> guest SIGTERM, ms",
           round((signalled["t"] - end["t"]) * 1000))
    assert scope_state(th, name) == "inactive"
    assert show(th, "standin@a.service", "NFileDescriptorStore")["NFileDescriptorStore"] == "0"
    assert th.exec(["test", "-e", "/run/standin/a"], check=False).returncode == 1


def test_binds_to_and_stop_propagated_from_end_the_guest_on_auto_restart(
        host: TestHost) -> None:
    """Why not BindsTo= (today's) or StopPropagatedFrom=: with either, an auto-restart
    of the supervisor stops the scope.  On 257, BindsTo= with RestartMode=direct
    keeps it (the service never passes through failed/inactive)."""
    th = host
    cases = [("bind", "BindsTo Before", "", True), ("prop", "StopPropagatedFrom Before", "",
                                                     True)]
    if th.release != "bookworm":
        cases.append(("direct", "BindsTo Before", "RestartMode=direct\n", False))
    else:  # 252 does not know RestartMode=
        configure(th, "direct", "[Service]\nRestartMode=direct\n")
        assert "RestartMode" not in show(th, "standin@direct.service", "RestartMode")
    for name, deps, extra, killed in cases:
        configure(th, name, f'[Service]\nEnvironment="STANDIN_SCOPE_DEPS={deps}"\n{extra}')
        guest = start(th, name)
        signal_main(th, name, "SIGKILL")
        restarted(th, name, 1)
        if killed:
            assert last(th, name, "guest-signal")["signal"] == "SIGTERM", (name, deps)
            assert last(th, name, "scope-started")["guest"] != guest  # a new guest
        else:
            assert last(th, name, "adopt")["guest"] == guest and alive(th, guest), (name, deps)


def test_restart_reaches_the_guest_only_through_the_supervisor_and_a_stop_in_the_gap(
        host: TestHost) -> None:
    """(c) `systemctl restart` stops and starts the service but sends the scope no job
    through PartOf=: a supervisor that leaves the guest running on SIGTERM gets
    it back to adopt; one that ends it (as kvmagent's does) restarts the guest.
    (5) a stop while the service waits to be restarted stops the scope at once with
    SIGTERM: no supervisor runs to stop the guest gracefully; the fd store is emptied."""
    th = host
    guest = start(th, "linger")
    t0 = monotonic(th)
    th.exec(["systemctl", "restart", "standin@linger"])
    new = int(show(th, "standin@linger.service", "MainPID")["MainPID"])
    assert last(th, "linger", "adopt", pid=new)["guest"] == guest and alive(th, guest)
    assert not [e for e in since(th, "linger", t0) if e["ev"].startswith("guest-")
                and e["ev"] != "guest-msg"]
    assert "Stopping" not in th.journal("kvm-linger.scope")
    assert scope_state(th, "linger") == "active"

    configure(th, "ends", '[Service]\nEnvironment=STANDIN_STOP_GUEST=1\n')
    guest = start(th, "ends")
    th.exec(["systemctl", "restart", "standin@ends"])
    assert not alive(th, guest)
    assert last(th, "ends", "scope-started")["guest"] != guest
    assert scope_state(th, "ends") == "active"

    configure(th, "gap", "[Service]\nRestartSec=5s\n")
    guest = start(th, "gap")
    signal_main(th, "gap", "SIGKILL")
    wait("auto-restart wait", lambda: show(th, "standin@gap.service", "SubState")["SubState"]
         == "auto-restart", th)
    s = show(th, "standin@gap.service", "ActiveState", "NFileDescriptorStore")
    assert s == {"ActiveState": "activating", "NFileDescriptorStore": "1"}
    t0 = monotonic(th)
    th.exec(["systemctl", "stop", "standin@gap"])
    wait("the guest gone", lambda: not alive(th, guest), th)
    signalled = last(th, "gap", "guest-signal")
    assert signalled["signal"] == "SIGTERM" and signalled["t"] - t0 < 1.0
    assert last(th, "gap", "guest-eof")["t"] - t0 < 1.0  # the fd store let go too
    report(th, "stop in the auto-restart gap -> guest SIGTERM, ms",
           round((signalled["t"] - t0) * 1000))
    assert [e["ev"] for e in since(th, "gap", t0) if e["ev"].startswith("sup-")] == []
    assert show(th, "standin@gap.service", "ActiveState", "Result") == {
        "ActiveState": "inactive", "Result": "success"}


def test_past_the_start_limit_on_failure_stops_the_orphaned_scope(host: TestHost) -> None:
    """(2) Kills until the start limit (StartLimitBurst=3): the guest survives every
    auto-restart, then the service fails for good; the fd store lets go (the guest
    sees EOF) and OnFailure= stops the scope, which systemd by itself would leave."""
    th, name = host, "sl"
    guest = start(th, name)
    for n in (1, 2):
        signal_main(th, name, "SIGKILL")
        restarted(th, name, n)
        assert last(th, name, "adopt")["guest"] == guest and alive(th, guest)
    t_kill, _ = signal_main(th, name, "SIGKILL")
    wait("the service failed", lambda: show(th, f"standin@{name}.service", "ActiveState")
         ["ActiveState"] == "failed", th)
    wait("the guest gone", lambda: not alive(th, guest), th)
    s = show(th, f"standin@{name}.service", "Result", "NRestarts", "NFileDescriptorStore")
    assert s == {"Result": "signal", "NRestarts": "3", "NFileDescriptorStore": "0"}
    assert "Start request repeated too quickly" in th.journal(f"standin@{name}.service")
    assert scope_state(th, name) == "inactive"
    eof, signalled = last(th, name, "guest-eof"), last(th, name, "guest-signal")
    assert eof["t"] <= signalled["t"] and signalled["signal"] == "SIGTERM"
    report(th, "3rd kill -> guest EOF (fd store dropped) / guest SIGTERM (OnFailure=), ms",
           (round((eof["t"] - t_kill) * 1000), round((signalled["t"] - t_kill) * 1000)))
    seen = (_logs[th.name] / f"{name}.onfailure").read_text().splitlines()
    # 252: OnFailure= on the final failure only; 257: also before each auto-restart
    # (the scope's process survived those: the unit acted only on "failed")
    if th.release == "bookworm":
        assert seen == ["failed signal"]
    else:
        assert seen[-1] == "failed signal" and len(seen) >= 3
        assert set(seen[:-1]) == {"activating signal"}, seen

    # without the OnFailure= unit systemd leaves the scope running: the orphan
    th.exec(["systemctl", "mask", "standin-orphan@bare.service"])  # a dependency stays
    guest = start(th, "bare")
    for n in (1, 2):
        signal_main(th, "bare", "SIGKILL")
        restarted(th, "bare", n)
    signal_main(th, "bare", "SIGKILL")
    wait("the service failed", lambda: show(th, "standin@bare.service", "ActiveState")
         ["ActiveState"] == "failed", th)
    time.sleep(0.5)
    assert scope_state(th, "bare") == "active" and alive(th, guest)
    assert last(th, "bare", "guest-eof")  # the fd store did let go
    th.exec(["systemctl", "stop", "kvm-bare.scope"])


def test_shutdown_stops_the_supervisor_while_the_guest_lives(host: TestHost) -> None:
    """(d) Host shutdown (reboot): the supervisor's stop begins and ends while the
    guest lives; the scope is stopped after it."""
    th = host
    configure(th, "sd", "[Service]\nEnvironment=STANDIN_STOP_DELAY=1\n")
    guest = start(th, "sd")
    t0 = monotonic(th)
    th.reboot()
    after = since(th, "sd", t0)
    begin = last(th, "sd", "sup-stop-begin")
    end = last(th, "sd", "sup-stop-end")
    signalled = last(th, "sd", "guest-signal")
    assert begin["guest_alive"] and end["guest_alive"], after
    assert end["t"] <= signalled["t"] and signalled["pid"] == guest, after
    assert signalled["signal"] == "SIGTERM"
    report(th, "shutdown: supervisor's stop ended -> guest SIGTERM, ms",
           round((signalled["t"] - end["t"]) * 1000))


def test_reexec_is_unnoticed_and_reload_waits_only_for_a_waiting_exec_reload(
        host: TestHost) -> None:
    """(6) execv() of the supervisor: same PID, no restart, watchdog (fed by the new
    code), NotifyAccess=main and the socket still fine.  `systemctl reload`, the
    supervisor answering with RELOADING=1 ... READY=1 (Type=notify): the reload job waits
    for READY=1 only if RELOADING=1 came while the ExecReload= process still ran, on 252
    and 257 alike; with a bare `kill -HUP` that is a race (0.5 s late here: lost)."""
    th, name = host, "rx"
    reload_conf = ("[Service]\nWatchdogSec=2s\nExecReload=\nExecReload={}\n"
                   "Environment=STANDIN_RELOAD_DELAY=0.8 STANDIN_RELOADING_LAG=0.5\n")
    configure(th, name, reload_conf.format("/bin/kill -HUP $MAINPID"))
    guest = start(th, name)
    props = ("MainPID", "NRestarts", "ActiveEnterTimestampMonotonic", "ActiveState",
             "NFileDescriptorStore")
    before = show(th, f"standin@{name}.service", *props)
    signal_main(th, name, "SIGUSR2")
    wait("generation 1 ready", lambda: [e for e in events(th, name)
                                        if e["ev"] == "sup-ready" and e["generation"] == 1], th)
    time.sleep(4.5)  # > 2 x WatchdogSec
    assert show(th, f"standin@{name}.service", *props) == before
    assert show(th, f"standin@{name}.service", "StatusText")["StatusText"] == "generation 1"
    assert last(th, name, "kept-fd", generation=1)["answer"] == f"pong {guest}"

    def reload() -> tuple[float, list[dict[str, Any]]]:
        t0 = monotonic(th)
        th.exec(["systemctl", "reload", f"standin@{name}"])
        took = monotonic(th) - t0
        return took, [e for e in since(th, name, t0) if e["ev"] == "sup-ready"]

    took, ready = reload()  # kill -HUP: returns before RELOADING=1 even came
    report(th, "systemctl reload, ExecReload=kill -HUP, RELOADING=1 0.5 s late, ms",
           round(took * 1000))
    assert took < 1.0 and not ready
    wait("READY=1 after the reload", lambda: [e for e in events(th, name)
                                              if e["ev"] == "sup-ready"
                                              and e["generation"] == 2], th)
    configure(th, name, reload_conf.format(
        f"/bin/sh -c 'rm -f /run/standin/{name}/reloading; kill -HUP $MAINPID; "
        f"until [ -e /run/standin/{name}/reloading ]; do sleep 0.02; done'"))
    took, ready = reload()  # waits for the supervisor's acknowledgement: waits for READY=1
    report(th, "systemctl reload, ExecReload= waits for the supervisor's RELOADING=1, ms",
           round(took * 1000))
    assert took >= 1.3 and ready
    assert show(th, f"standin@{name}.service", *props) == before
    assert "watchdog" not in th.journal(f"standin@{name}.service").lower()
    assert alive(th, guest)
