"""`kvmagent migrate` between two real test hosts (tests/harness/hostpair.py,
two Debian 12 hosts on a private link, sshd, root's keys, this checkout
installed): the tiny guest, its kernel, initrd and a raw disk on the shared
storage (/srv/shared), with a NIC on br-kvm on both hosts.

It moves from host 0 to host 1 and back while it runs: the same guest (one
GUEST-INIT on its console in all, on host 0's first boot; a line typed on
the destination's console is in that host's journal), the source's unit
inactive and not failed with no QEMU left, the destination's active, the
record's `stopped` event with reason `migrated`.  Then what must fail
cleanly: a bridge missing on the destination (refused, nothing started
there), the destination's QEMU killed mid-migration and Ctrl-C of the
command (slowed with --bandwidth), and (between two Debian 13 hosts) a
move that cannot end within its downtime limit (a guest writing its memory
faster than a slowed link sends it): each time the guest runs on at host 0 and host 1 has no unit
running, no QEMU and no tap.  The measured downtime
and total time are printed.

The record follows the guest: on the host it moved to, its uptime goes on
from its first boot (at least what it was before the move), no restart is
counted, and `history` on both hosts shows the move with its downtime.
The same moves over plain TCP (--transport tcp...), after a cancelled
slow one whose --bandwidth must not stay in QEMU; and the link cut during
a TCP move, as during an ssh one."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmagent.render.migration import MAX_PASSES
from tests.harness import HarnessError
from tests.harness.hostpair import LINK, HostPair, shared_path
from tests.harness.install import guest_toml
from tests.harness.testhost import TestHost, nsenter_argv
from tests.system.conftest import require_system
from tests.system.guestview import Guest, install, qemus, wait

pytestmark = pytest.mark.system
GUEST = Guest("mig")
NAME, UNIT = GUEST.name, GUEST.unit
console, runs_on, types = GUEST.console, GUEST.runs_on, GUEST.answers
SLOW = "1M"  # --bandwidth that makes the tiny guest's move last ~10 s or more
# A slow move that must end gets a downtime limit its first pass meets: a
# guest that writes its memory about as fast as 1M (a shell loop starting a
# process three times a second did) never meets QEMU's 300 ms.  The moves
# stay short besides: QEMU 7.2's TCG can lose a guest's writes during a long
# pass (a QEMU bug, fixed in 9.0; bare QEMU crashed the guest once in 40
# moves of ~100 s here), which runs_on names as a fault on the console
SLOW_END = ["--bandwidth", SLOW, "--max-downtime", "2000"]


def hosts(tmp_path_factory: pytest.TempPathFactory, guest_image,  # type: ignore[no-untyped-def]
          releases: tuple[str, str]) -> Iterator[HostPair]:
    require_system()
    from tests.harness.install import REPO
    work = tmp_path_factory.mktemp("migrate")
    shared = work / "shared"
    shared.mkdir(mode=0o755)
    shutil.copyfile(guest_image.kernel, shared / "vmlinuz")
    shutil.copyfile(guest_image.initrd, shared / "initrd.gz")
    with open(shared / f"{NAME}.img", "wb") as f:  # its disk, on the shared storage
        f.truncate(16 << 20)
    try:
        with HostPair(releases, shared=shared, src=REPO,
                      journal_dir=work / "journal") as hosts:
            image = dataclasses.replace(guest_image, kernel=Path(shared_path("vmlinuz")),
                                        initrd=Path(shared_path("initrd.gz")))
            for th in hosts:
                install(th)
                th.write_file(f"/etc/kvmagent/guests/{NAME}.toml", guest_toml(
                    image, nics=1, extra=f'[[disk]]\npath = "{shared_path(NAME + ".img")}"\n'))
                th.exec(["systemctl", "daemon-reload"])  # the generator: the image writable
            # a guest whose bridge is on host 0 alone
            hosts[0].run(["kvmagent", "bridge", "ensure", "br-only0"])
            for th in hosts:
                th.write_file("/etc/kvmagent/guests/nobr.toml", guest_toml(
                    image, nics=0, extra='[[nic]]\nbridge = "br-only0"\n'))
            yield hosts
    except HarnessError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory,
         guest_image) -> Iterator[HostPair]:  # type: ignore[no-untyped-def]
    yield from hosts(tmp_path_factory, guest_image, ("bookworm", "bookworm"))


def state(th: TestHost, unit: str = UNIT) -> tuple[str, str]:
    return GUEST.state(th, unit)


def taps(th: TestHost) -> str:
    return str(th.exec(["ip", "-o", "link", "show", "type", "tun"], check=False).stdout)


def clean(th: TestHost) -> None:
    """No unit running, no QEMU, no tap, no request left."""
    assert state(th)[0] == "inactive", state(th)
    assert qemus(th) == [], th.exec(["ps", "axf"]).stdout
    assert f"kvm-{NAME}-0" not in taps(th)
    assert th.exec(["test", "-e", f"/run/kvmagent/{NAME}/incoming.json"],
                   check=False).returncode != 0


def migrate(th: TestHost, to: str, *args: str) -> subprocess.CompletedProcess[str]:
    return th.exec(["kvmagent", "migrate", NAME, to, "--json", *args], check=False, timeout=300)


def listed(th: TestHost) -> dict:  # type: ignore[type-arg]
    (row,) = [g for g in json.loads(th.exec(["kvmagent", "list", "--json"]).stdout)
              if g["name"] == NAME]
    return row  # type: ignore[no-any-return]


def uptime(th: TestHost) -> tuple[int, float]:
    """The guest's uptime as `list` shows it there, and when it was asked."""
    return listed(th)["uptime_seconds"], time.monotonic()


def record_follows(src: TestHost, dst: TestHost, to: str, done: dict,  # type: ignore[type-arg]
                   before: tuple[int, float]) -> None:
    """After a move from SRC to DST (named TO): the uptime goes on there
    (what it was BEFORE the move, on SRC, and the time since: not the time
    since the guest arrived), no restart on either host, the move in both
    histories with its downtime."""
    uptime_before, asked = before
    row = listed(dst)
    since = int(time.monotonic() - asked)
    assert row["uptime_seconds"] >= uptime_before + since - 1, (row, uptime_before, since)
    assert row["restarts"] == 0, row
    assert listed(src)["restarts"] == 0
    status = json.loads(dst.exec(["kvmagent", "status", NAME, "--json"]).stdout)
    assert status["uptime_seconds"] >= uptime_before, status
    history = json.loads(src.exec(["kvmagent", "history", NAME, "--json"]).stdout)
    last = [e for e in history["events"] if e["event"] == "stopped"][-1]
    assert last["reason"] == "migrated", last
    assert last["detail"] == f"to {to}, downtime {done['downtime_ms']} ms", last
    arrived = json.loads(dst.exec(["kvmagent", "history", NAME, "--json"]).stdout)
    starting = [e for e in arrived["events"] if e["event"] == "starting"][-1]
    running = [e for e in arrived["events"] if e["event"] == "running"][-1]
    assert starting["reason"] == "migrated", starting
    assert re.fullmatch(rf"migrated here from \S+, downtime {done['downtime_ms']} ms",
                        running["detail"] or ""), running
    assert running["booted"] is not None and running["booted"] < running["time"], running
    assert arrived["uptime_seconds"] >= uptime_before and arrived["restarts"] == 0, arrived
    text = dst.exec(["kvmagent", "history", NAME]).stdout
    assert re.search(r"running +QEMU pid \d+; migrated here from \S+, downtime \d+ ms; "
                     r"booted \d{4}-", text), text
    print(f"uptime on {src.name} before the move {uptime_before} s; on {dst.name}, {since} s "
          f"later, {row['uptime_seconds']} s")


def test_why_the_stream_is_handed_in(pair: HostPair) -> None:
    """The constraints the design answers, measured: kvm@NAME.service may
    open no IP socket, and QEMU under its -sandbox may not run exec:'s
    command; so the command opens ssh and hands the stream in."""
    a = pair[0]
    families = a.exec(["systemctl", "show", UNIT, "--property=RestrictAddressFamilies",
                       "--value"]).stdout.split()
    assert sorted(families) == ["AF_NETLINK", "AF_UNIX"], families
    r = a.exec(["systemd-run", "--wait", "--pipe", "--quiet",
                "--property=RestrictAddressFamilies=AF_UNIX AF_NETLINK", "python3", "-c",
                "import socket; socket.socket(socket.AF_INET)"], check=False)
    assert r.returncode != 0 and "Address family not supported" in r.stderr, r
    qemu = ["timeout", "10", "qemu-system-x86_64", "-machine", "none", "-nodefaults",
            "-display", "none", "-incoming", "exec:cat /dev/null"]
    sandboxed = a.exec([*qemu, "-sandbox", "on,spawn=deny"], check=False)
    free = a.exec(qemu, check=False)
    print(f"\nexec: migration, sandboxed: exit {sandboxed.returncode} "
          f"{sandboxed.stderr.strip()[:200]!r}; without the sandbox: exit {free.returncode} "
          f"{free.stderr.strip()[:200]!r}")
    assert sandboxed.returncode == -signal.SIGSYS  # the fork of exec: is a forbidden call
    assert free.returncode == 124  # ran its command, and waits: only the sandbox stops it


def test_there_and_back(pair: HostPair) -> None:
    a, b = pair
    a.exec(["systemctl", "enable", "--now", UNIT], timeout=180)
    wait(lambda: "GUEST-READY" in console(a), 120, "the guest booted on host 0")
    assert re.search(r"GUEST-READY .*disks=vda", console(a)), console(a)
    assert types(a, "before")
    for src, dst, to in ((a, b, "host1"), (b, a, "host0")):
        before = uptime(src)
        r = migrate(src, to)
        assert r.returncode == 0, (r.stdout, r.stderr, dst.journal(UNIT)[-3000:])
        # Debian 12's QEMU 7.2, the guest under TCG: said before it moves
        assert f"warning: guest {NAME} runs without KVM (TCG) on QEMU 7.2." in r.stderr, \
            r.stderr
        events = [json.loads(line) for line in r.stdout.splitlines()]
        done = events[-1]
        assert done["event"] == "migrated" and done["enabled_there"] is True, events
        print(f"\n{src.name} -> {dst.name}: downtime {done['downtime_ms']} ms (QEMU), "
              f"the guest paused {done['paused_ms']} ms (until it ran there), "
              f"QEMU's total {done['qemu_total_ms']} ms, the command's total "
              f"{done['total_seconds']} s")
        # one clock for both test hosts: the pause holds QEMU's downtime
        assert done["paused_ms"] >= done["downtime_ms"] - 5, done
        assert state(src) == ("inactive", "success"), state(src)
        assert qemus(src) == [] and f"kvm-{NAME}-0" not in taps(src)
        assert state(src, f"kvm-{NAME}.scope")[0] == "inactive"
        assert NAME not in src.exec(["machinectl", "list"], check=False).stdout
        runs_on(dst)
        assert f"kvm-{NAME}-0" in taps(dst)
        assert src.exec(["systemctl", "is-enabled", UNIT], check=False).stdout.strip() \
            == "disabled"
        assert dst.exec(["systemctl", "is-enabled", UNIT], check=False).stdout.strip() \
            == "enabled"
        assert f"migrated to {to}" in src.journal(UNIT)
        assert re.search(r"arrived from \S+ and runs here", dst.journal(UNIT))
        assert types(dst, f"on-{dst.name}")  # the console goes on in the journal there
        # the disk: written by the guest on the host it moved to, read back here
        dst.exec(["kvmagent", "console", NAME, "--timeout", "3"], check=False, timeout=60,
                 input=f"echo disk-{dst.name} | dd of=/dev/vda conv=fsync\n")
        data = dst.exec(["head", "-c", "64", shared_path(NAME + ".img")], text=False).stdout
        assert data.startswith(f"disk-{dst.name}\n".encode()), data
        record_follows(src, dst, to, done, before)
    # the same guest throughout: one boot, on host 0, before it moved
    assert console(a).count("GUEST-INIT") == 1
    assert "GUEST-INIT" not in console(b)


def test_refusals_change_nothing(pair: HostPair) -> None:
    """A bridge missing on the destination, a guest file that differs there,
    a guest that does not run here: refused before anything starts."""
    a, b = pair
    a.exec(["systemctl", "start", "kvm@nobr.service"], timeout=180)
    r = a.exec(["kvmagent", "migrate", "nobr", "host1"], check=False, timeout=120)
    assert r.returncode == 5, r
    assert 'nic[0].bridge = "br-only0": no such bridge' in r.stderr, r.stderr
    assert state(a, "kvm@nobr.service") == ("active", "success")
    assert state(b, "kvm@nobr.service")[0] == "inactive"
    assert "kvm@nobr" not in b.journal("kvm@nobr.service").replace("No entries", "")
    # the same guest file on both hosts, or the keys that differ are named
    b.run(["kvmagent", "bridge", "ensure", "br-only0"])
    toml = b.exec(["cat", "/etc/kvmagent/guests/nobr.toml"]).stdout
    b.write_file("/etc/kvmagent/guests/nobr.toml", toml.replace('"256M"', '"300M"'))
    r = a.exec(["kvmagent", "migrate", "nobr", "host1"], check=False, timeout=120)
    assert r.returncode == 6 and "configuration on host1 differs in: memory" in r.stderr, r
    assert state(b, "kvm@nobr.service")[0] == "inactive"
    b.write_file("/etc/kvmagent/guests/nobr.toml", toml)
    b.exec(["ip", "link", "del", "br-only0"])
    a.exec(["systemctl", "stop", "kvm@nobr.service"], timeout=120)
    r = a.exec(["kvmagent", "migrate", "nobr", "host1"], check=False, timeout=120)
    assert r.returncode == 7 and "guest nobr is not running here" in r.stderr, r


def test_copy_config(pair: HostPair) -> None:
    """--copy-config: the guest file and its drop-ins go to host 1 as they
    are, host 1's own kept beside as .old; but only once nothing else
    refuses the move (a missing bridge): until then host 1's files stay."""
    a, b = pair
    guests = "/etc/kvmagent/guests"
    mine = a.exec(["cat", f"{guests}/nobr.toml"]).stdout
    theirs = mine.replace('"256M"', '"300M"')
    b.exec(["ip", "link", "del", "br-only0"], check=False)
    b.write_file(f"{guests}/nobr.toml", theirs)
    a.write_file(f"{guests}/nobr.toml.d/50-cpus.toml", "# two, for the test\ncpus = 2\n")
    a.exec(["systemctl", "start", "kvm@nobr.service"], timeout=180)
    try:
        r = a.exec(["kvmagent", "migrate", "nobr", "host1", "--copy-config"], check=False,
                   timeout=120)
        assert r.returncode == 5 and "br-only0" in r.stderr and "copied" not in r.stderr, r
        assert b.exec(["cat", f"{guests}/nobr.toml"]).stdout == theirs
        assert b.exec(["ls", "-A", guests]).stdout.split() == ["mig.toml", "nobr.toml"]
        b.run(["kvmagent", "bridge", "ensure", "br-only0"])
        r = a.exec(["kvmagent", "migrate", "nobr", "host1", "--copy-config"], check=False,
                   timeout=120)
        print(f"\n--copy-config: {r.stderr.strip()}")
        assert r.returncode == 0, (r.stdout, r.stderr, b.journal("kvm@nobr.service")[-3000:])
        assert ("copied guests/nobr.toml and its drop-ins to host1; its own kept as "
                "nobr.toml.old") in r.stderr, r.stderr
        assert state(b, "kvm@nobr.service") == ("active", "success")
        assert state(a, "kvm@nobr.service")[0] == "inactive"
        assert b.exec(["cat", f"{guests}/nobr.toml"]).stdout == mine
        assert b.exec(["cat", f"{guests}/nobr.toml.old"]).stdout == theirs
        assert b.exec(["cat", f"{guests}/nobr.toml.d/50-cpus.toml"]).stdout.startswith("# two")
        assert "2 vCPU, 256M" in b.exec(["kvmagent", "status", "nobr"]).stdout
        # and back: the same files on both hosts now, nothing to copy
        r = b.exec(["kvmagent", "migrate", "nobr", "host0", "--copy-config"], check=False,
                   timeout=120)
        assert r.returncode == 0 and "copied" not in r.stderr, (r.stdout, r.stderr)
        assert state(a, "kvm@nobr.service") == ("active", "success")
    finally:
        for th in pair:
            th.exec(["systemctl", "stop", "kvm@nobr.service"], check=False, timeout=120)
            th.exec(["rm", "-rf", f"{guests}/nobr.toml.d", f"{guests}/nobr.toml.old"])
            th.write_file(f"{guests}/nobr.toml", mine)
        b.exec(["ip", "link", "del", "br-only0"], check=False)


def qemu_here(th: TestHost) -> str:
    (pid,) = qemus(th)
    return pid


def on_host0(a: TestHost, b: TestHost) -> None:
    """The guest running on host 0 (started there if need be), and nowhere
    else: an earlier test that failed may have left it on host 1, which a
    start on host 0 would meet at the shared disk's lock."""
    if state(b)[0] != "inactive":
        b.exec(["systemctl", "stop", UNIT], timeout=180)
        b.exec(["systemctl", "reset-failed", UNIT], check=False)
    if state(a)[0] != "active":
        a.exec(["systemctl", "start", UNIT], timeout=180)
        wait(lambda: "GUEST-READY" in console(a), 120, "the guest booted on host 0")


def slow_migration(a: TestHost, b: TestHost,
                   *extra: str) -> tuple[subprocess.Popen[str], str]:
    """kvmagent migrate from host 0, slowed down (EXTRA: more options);
    returns once the state flows (and host 0's QEMU pid)."""
    on_host0(a, b)
    pid = qemu_here(a)
    proc = subprocess.Popen(nsenter_argv(a.leader, ["kvmagent", "migrate", NAME, "host1",
                                                    "--json", "--bandwidth", SLOW, *extra]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert json.loads(first or "{}").get("event") == "started", (first, proc.stderr.read())
    time.sleep(3)  # well into the transfer
    assert len(qemus(b)) == 1
    return proc, pid


def still_here(a: TestHost, b: TestHost, proc: subprocess.Popen[str], pid: str,
               tag: str) -> None:
    """The migration failed; the guest runs on at host 0, in the same QEMU."""
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, (out, err)
    assert '"event": "cancelled"' in out, (out, err)
    runs_on(a)
    assert qemu_here(a) == pid
    assert types(a, tag)  # the guest answers on host 0
    wait(lambda: state(b)[0] == "inactive" and qemus(b) == [], 60, "host 1 clean")
    clean(b)


def test_the_destinations_qemu_killed_mid_migration(pair: HostPair) -> None:
    a, b = pair
    proc, pid = slow_migration(a, b)
    (there,) = qemus(b)
    b.exec(["kill", "-9", there])
    still_here(a, b, proc, pid, "after-kill")


def test_ctrl_c_mid_migration(pair: HostPair) -> None:
    a, b = pair
    proc, pid = slow_migration(a, b)
    (command,) = a.exec(["pgrep", "-f", f"kvmagent migrate {NAME} host1"]).stdout.split()
    a.exec(["kill", "-INT", command])
    still_here(a, b, proc, pid, "after-ctrl-c")


@pytest.mark.parametrize("transport", ["ssh", "tcp"])
def test_the_link_cut_mid_migration(pair: HostPair, transport: str) -> None:
    """The link between the hosts goes down (no reset, no word): ssh's
    keepalives end the source's side, the destination sees its stream stall
    (ssh) or its TCP keepalives end it (tcp)."""
    a, b = pair
    proc, pid = slow_migration(a, b, "--transport", transport)
    t0 = time.monotonic()
    a.exec(["ip", "link", "set", LINK, "down"])
    try:
        out, err = proc.communicate(timeout=120)
        noticed = time.monotonic() - t0
        assert proc.returncode == 1 and '"event": "cancelled"' in out, (out, err)
        print(f"\nlink cut ({transport}): the source noticed in {noticed:.1f} s")
        runs_on(a)
        assert qemu_here(a) == pid
        assert types(a, "after-cut")
        wait(lambda: state(b)[0] == "inactive" and qemus(b) == [], 60, "host 1 clean")
        print(f"link cut ({transport}): host 1 clean {time.monotonic() - t0:.1f} s after "
              "the cut")
        clean(b)
    finally:
        a.exec(["ip", "link", "set", LINK, "up"])


def frozen_arrival(src: TestHost, dst: TestHost, to: str) -> subprocess.Popen[str]:
    """kvmagent migrate from SRC to DST (named TO), slowed down, with DST's
    `migrate-incoming` stopped (SIGSTOP) once the state flows: the guest
    arrives and runs there (its supervisor needs no help), but SRC never
    hears it from the session.  Returns once SRC says so ("unconfirmed")."""
    proc = subprocess.Popen(nsenter_argv(src.leader, ["kvmagent", "migrate", NAME, to, "--json",
                                                      *SLOW_END]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert json.loads(first or "{}").get("event") == "started", (first, proc.stderr.read())
    dst.exec(["pkill", "-STOP", "-f", f"kvmagent migrate-incoming {NAME}"])
    while (line := proc.stdout.readline()):
        if json.loads(line).get("event") == "unconfirmed":
            return proc
    raise AssertionError(f"no unconfirmed event: {proc.stderr.read()}")


def test_a_lost_confirmation_never_runs_the_guest_twice(pair: HostPair) -> None:
    """The destination's last word lost after the whole guest went there:
    the source's copy stays paused, is never resumed on a guess, and ends
    only on the destination's word, asked anew.  First host 1 answers (a new
    ssh session): the move ends as any other.  Then the guest moves back
    with the link cut as well: host 1 cannot ask, holds the guest paused
    (exit status 1, "held"), and `kvmagent migrate` again, once the link is
    back, settles it: the guest runs on host 0 alone, booted once."""
    a, b = pair
    on_host0(a, b)
    boots = console(a).count("GUEST-INIT") + console(b).count("GUEST-INIT")
    resumed = a.journal(UNIT).count("(resumed)"), b.journal(UNIT).count("(resumed)")
    proc = frozen_arrival(a, b, "host1")
    t0 = time.monotonic()
    b.exec(["pkill", "-KILL", "-f", f"kvmagent migrate-incoming {NAME}"])
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, (out, err)
    assert json.loads(out.splitlines()[-1])["event"] == "migrated", out
    print(f"\nthe confirmation lost: host 0 asked host 1 and ended its copy "
          f"{time.monotonic() - t0:.1f} s later")
    assert state(a) == ("inactive", "success") and qemus(a) == []
    runs_on(b)
    assert "stays paused here" in a.journal(UNIT)
    assert types(b, "after-lost-word")
    # back, the link cut too: held paused on host 1, not resumed
    proc = frozen_arrival(b, a, "host0")
    b.exec(["ip", "link", "set", LINK, "down"])
    try:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 1, (out, err)
        assert json.loads(out.splitlines()[-1])["event"] == "held", out
        assert f"run `kvmagent migrate {NAME} host0` again" in err, err
        said = b.exec(["systemctl", "show", UNIT, "--property=StatusText", "--value"]).stdout
        print(f"held on host 1: {said.strip()}; {err.strip()}")
        assert state(b)[0] == "active" and len(qemus(b)) == 1  # paused, kept
        assert said.startswith("paused: its state went to host0"), said
        assert "paused: its state went to host0" in b.exec(["kvmagent", "status", NAME]).stdout
        runs_on(a)  # the copy that runs: host 0's
    finally:
        b.exec(["ip", "link", "set", LINK, "up"])
        a.exec(["pkill", "-KILL", "-f", f"kvmagent migrate-incoming {NAME}"], check=False)
    r = migrate(b, "host0")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert json.loads(r.stdout.splitlines()[-1])["event"] == "migrated", r.stdout
    assert state(b) == ("inactive", "success") and qemus(b) == []
    runs_on(a)
    assert types(a, "after-held")
    assert (a.journal(UNIT).count("(resumed)"), b.journal(UNIT).count("(resumed)")) == resumed
    assert console(a).count("GUEST-INIT") + console(b).count("GUEST-INIT") == boots


def test_over_tcp_there_and_back(pair: HostPair) -> None:
    """Plain TCP, asked for: first a slow move (--bandwidth 1M) cancelled by
    Ctrl-C, whose bandwidth must not stay in QEMU; then host 0 -> host 1 on
    its address in the hosts' network (tcp:CIDR) and back on the address
    ssh reached (tcp): said loudly, the guest the same, the record on."""
    a, b = pair
    proc, pid = slow_migration(a, b, "--transport", "tcp:10.79.20.0/24")
    (command,) = a.exec(["pgrep", "-f", f"kvmagent migrate {NAME} host1"]).stdout.split()
    a.exec(["kill", "-INT", command])
    still_here(a, b, proc, pid, "after-tcp-ctrl-c")
    # a network host 1 has no address in: said, exit status 5, nothing left there
    r = migrate(a, "host1", "--transport", "tcp:10.99.0.0/24")
    assert r.returncode == 5 and "has no address in 10.99.0.0/24" in r.stderr, r
    assert "WARNING" not in r.stderr  # nothing went
    clean(b)
    r = migrate(a, "host1", "--transport", "udp")  # not a transport: asked nothing
    assert r.returncode == 2 and "--transport 'udp'" in r.stderr, r
    boots = console(a).count("GUEST-INIT")
    for src, dst, to, transport in ((a, b, "host1", "tcp:10.79.20.0/24"),
                                    (b, a, "host0", "tcp")):
        before = uptime(src)
        r = migrate(src, to, "--transport", transport)
        assert r.returncode == 0, (r.stdout, r.stderr, dst.journal(UNIT)[-3000:])
        assert "WARNING" in r.stderr and "plain TCP, UNENCRYPTED" in r.stderr, r.stderr
        assert re.search(rf"go to {re.escape(pair.address(1 if to == 'host1' else 0))}:\d+ ",
                         r.stderr), r.stderr
        events = [json.loads(line) for line in r.stdout.splitlines()]
        started, done = events[0], events[-1]
        # QEMU's defaults again, not the cancelled move's 1M
        assert started["event"] == "started" and started["transport"] == transport, started
        assert (started["max_bandwidth"], started["downtime_limit_ms"]) == (128 << 20, 300)
        assert done["event"] == "migrated", events
        print(f"\n{src.name} -> {dst.name} over {transport}: downtime {done['downtime_ms']} ms "
              f"(QEMU), QEMU's total {done['qemu_total_ms']} ms, the command's total "
              f"{done['total_seconds']} s")
        assert state(src)[0] == "inactive" and qemus(src) == []
        runs_on(dst)
        record_follows(src, dst, to, done, before)
        assert types(dst, f"tcp-on-{dst.name}")
    assert console(a).count("GUEST-INIT") == boots  # no reboot on the way
    assert "GUEST-INIT" not in console(b)


def test_from_debian_12_to_13(tmp_path_factory: pytest.TempPathFactory,
                              guest_image) -> None:  # type: ignore[no-untyped-def]
    """The way users upgrade their hosts: the guest moves from a Debian 12
    host (QEMU 7.2) to a Debian 13 one (QEMU 10.0), with QEMU 7.2's machine
    type pinned there (-machine pc-i440fx-7.2, not 10.0's "pc")."""
    made = hosts(tmp_path_factory, guest_image, ("bookworm", "trixie"))
    a, b = next(made)
    try:
        a.exec(["systemctl", "start", UNIT], timeout=180)
        wait(lambda: "GUEST-READY" in console(a), 120, "the guest booted on host 0")
        r = migrate(a, "host1")
        assert r.returncode == 0, (r.stdout, r.stderr, b.journal(UNIT)[-3000:])
        done = json.loads(r.stdout.splitlines()[-1])
        print(f"\nDebian 12 -> 13: downtime {done['downtime_ms']} ms (QEMU), the command's "
              f"total {done['total_seconds']} s")
        runs_on(b)
        argv = b.exec(["cat", f"/proc/{qemu_here(b)}/cmdline"]).stdout.split("\0")
        assert argv[argv.index("-machine") + 1] == "pc-i440fx-7.2"
        # its next start there keeps the hardware it arrived with
        shown = b.exec(["kvmagent", "show", NAME]).stdout
        assert 'machine "pc" is pinned to pc-i440fx-7.2' in shown, shown
        assert types(b, "on-trixie")
        assert "GUEST-INIT" not in console(b)
        b.exec(["systemctl", "stop", UNIT], timeout=180)
    finally:
        made.close()


def test_a_move_that_cannot_converge_is_cancelled(
        tmp_path_factory: pytest.TempPathFactory,
        guest_image) -> None:  # type: ignore[no-untyped-def]
    """A guest that rewrites part of its memory with random bytes over and
    over, asked to move at 10M within 1 ms of downtime: what it writes
    during one pass never fits in the limit (10 kB), and after MAX_PASSES
    passes (or a few more: the command looks every 0.25 s, a pass may be
    shorter) the move is cancelled, saying why; the guest runs on at host
    0, in the same QEMU, and host 1 is clean.  (At QEMU's default of 128M
    the tiny guest under TCG moved within 1 ms even with such a writer, in
    about a second: the test slows the link to keep the guest ahead.)

    Between two Debian 13 hosts: Debian 12's QEMU 7.2 under TCG loses some
    of the guest's writes in a move of many passes (the bug the command
    warns of, fixed in 9.0): in one CI run it saw the guest's memory all
    but sent, completed the move, and the guest's kernel crashed on host 1."""
    made = hosts(tmp_path_factory, guest_image, ("trixie", "trixie"))
    a, b = next(made)
    try:
        on_host0(a, b)
        pid = qemu_here(a)
        writer = GUEST.busy(a, "writer", "dd if=/dev/urandom of=/dev/null bs=64k")
        r = migrate(a, "host1", "--bandwidth", "10M", "--max-downtime", "1")
        events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
        assert r.returncode == 1 and events and events[-1]["event"] == "cancelled", (
            r.stdout[-3000:], r.stderr)
        why = events[-1]["why"]
        passes = re.search(r"after (\d+) passes over the guest's memory", why)
        assert passes and int(passes[1]) >= MAX_PASSES, why
        assert "(limit 1 ms)" in why and "--max-downtime" in why, why
        assert "warning" not in r.stderr, r.stderr  # QEMU 10.0
        progress = [e for e in events if e["event"] == "progress" and "ram" in e]
        print(f"\nnot converging: cancelled after {progress[-1]['total-time'] / 1000:.1f} s, "
              f"{progress[-1]['ram']['dirty-sync-count']} passes, "
              f"{progress[-1]['ram']['transferred'] >> 20} MiB sent: {why}")
        runs_on(a)
        assert qemu_here(a) == pid
        wait(lambda: state(b)[0] == "inactive" and qemus(b) == [], 60, "host 1 clean")
        clean(b)
        GUEST.typed(a, f"kill {writer}\n")
        assert types(a, "after-busy")  # the guest answers on host 0
    finally:
        made.close()
