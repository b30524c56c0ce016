"""A guest as a Pacemaker resource (ocf:kvmagent:guest, #21), in a two-node
cluster of two real Debian 12 test hosts (tests/harness/hostpair.py: a
private link 10.79.20.1/.2, sshd and root's keys both ways, this checkout
installed, shared storage at /srv/shared holding the tiny guest's kernel,
initrd and disk).

The cluster stack (corosync 3, Pacemaker 2.1, crmsh, resource-agents) is
installed at test time from its own offline repository
(tests/harness/clusterdebs.py).  Corosync runs over the private link with
`two_node: 1`; STONITH is off, in these tests only (the output says so: a
real cluster needs fencing, docs/pacemaker.md).  Node names are host0 and
host1, as in corosync's nodelist.

First ocf-tester (resource-agents) runs against the agent, its output
printed; the agent's stop while the unit's own stop job waits behind
another unit's (as at shutdown behind pacemaker.service's) stops the guest
at once.  Then the cluster: the guest starts on host0 as kvm@NAME.service;
`crm resource move` moves it live to host1 (no second GUEST-INIT on its
console; the guest's pings of its bridge every 100 ms, counted across the
move); host1 in standby moves it back live; its supervisor killed (systemd
restarts it, unseen) and its QEMU killed (Pacemaker sees, counts and
recovers it; systemd does not restart it); host0's container killed
(SIGKILL of its PID 1) while it runs the guest: the guest starts on host1.
Last, in a second cluster of two new hosts, host0's own orderly shutdown
(systemctl poweroff) while it runs the guest: Pacemaker moves it live to
host1 first, and the shutdown's time is printed."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import HarnessError, clusterdebs
from tests.harness.hostpair import ADDRESSES, HostPair, shared_path
from tests.harness.install import APT_ENV, OFFLINE_APT, guest_toml
from tests.harness.testhost import TestHost
from tests.system.conftest import require_system
from tests.system.guestview import RUNTIME_DEPENDS, Guest, qemus, wait

pytestmark = pytest.mark.system
GUEST = Guest("ha")
NAME, UNIT = GUEST.name, GUEST.unit
console = GUEST.console
AGENT = "/usr/lib/ocf/resource.d/kvmagent/guest"
NODES = ("host0", "host1")
GUEST_IP, BRIDGE_IP, BRIDGE_MAC = "10.77.0.2", "10.77.0.1", "02:4b:56:4d:00:01"
PING_EVERY = 0.1  # seconds between the guest's pings of its bridge
SHUTDOWN_LIMIT = 150  # seconds host0's orderly shutdown may take, its guest moved away first
JOURNAL = "host0-shutdown-journal.txt"  # on the shared storage
DOWNTIME = re.compile(r"migrated to host\d, downtime (\d+) ms")
COROSYNC_CONF = f"""\
totem {{
    version: 2
    cluster_name: kvmagent-test
    transport: knet
    crypto_cipher: aes256
    crypto_hash: sha256
}}
nodelist {{
    node {{
        name: {NODES[0]}
        nodeid: 1
        ring0_addr: {ADDRESSES[0]}
    }}
    node {{
        name: {NODES[1]}
        nodeid: 2
        ring0_addr: {ADDRESSES[1]}
    }}
}}
quorum {{
    provider: corosync_votequorum
    two_node: 1
}}
logging {{
    to_syslog: yes
    to_logfile: no
}}
"""
PRIMITIVE = (f"primitive {NAME} ocf:kvmagent:guest params name={NAME} "
             "meta allow-migrate=true "
             "op monitor interval=5s timeout=30s op start timeout=120s "
             "op stop timeout=180s op migrate_to timeout=300s op migrate_from timeout=120s")


@contextlib.contextmanager
def two_nodes(tmp_path_factory: pytest.TempPathFactory,
              guest_image) -> Iterator[HostPair]:  # type: ignore[no-untyped-def]
    """Two test hosts with kvmagent and the cluster stack installed, the
    guest defined on both (its NIC on br-kvm, 10.77.0.2 pinging the bridge's
    10.77.0.1: the same address and MAC on both hosts, as one network would
    be), corosync configured but not running."""
    require_system()
    from tests.harness.install import REPO
    work = tmp_path_factory.mktemp("pacemaker")
    shared = work / "shared"
    shared.mkdir(mode=0o755)
    shutil.copyfile(guest_image.kernel, shared / "vmlinuz")
    shutil.copyfile(guest_image.initrd, shared / "initrd.gz")
    with open(shared / f"{NAME}.img", "wb") as f:
        f.truncate(16 << 20)
    try:
        repo = clusterdebs.cached("bookworm")
        with HostPair(("bookworm", "bookworm"), shared=shared, src=REPO,
                      journal_dir=work / "journal",
                      bind_ro=[(repo, "/mnt/cluster-debs")]) as hosts:
            image = dataclasses.replace(guest_image, kernel=Path(shared_path("vmlinuz")),
                                        initrd=Path(shared_path("initrd.gz")))
            authkey = os.urandom(256)
            for name, th in zip(NODES, hosts):
                th.write_file("/etc/apt/offline.list", "deb [trusted=yes] file:/mnt/debs ./\n"
                              "deb [trusted=yes] file:/mnt/cluster-debs ./\n")
                th.exec(["mkdir", "-p", "/var/tmp/offline-lists/partial"])
                th.run(["apt-get", *OFFLINE_APT, "update", "-q"])
                t0 = time.monotonic()
                th.run(["apt-get", *OFFLINE_APT, "install", "-y", "-q",
                        "--no-install-recommends", *RUNTIME_DEPENDS, *clusterdebs.PACKAGES],
                       env=APT_ENV, timeout=900)
                print(f"\n{th.name}: kvmagent's and the cluster stack's packages installed "
                      f"with apt in {time.monotonic() - t0:.1f} s")
                # a container's host name is its machine's; the cluster's node names
                th.write_file("/etc/hostname", name + "\n")
                th.exec(["hostname", name])
                th.run(["kvmagent", "bridge", "ensure", "br-kvm"])
                th.exec(["ip", "link", "set", "br-kvm", "address", BRIDGE_MAC])
                th.exec(["ip", "address", "add", f"{BRIDGE_IP}/24", "dev", "br-kvm"])
                th.write_file(f"/etc/kvmagent/guests/{NAME}.toml", guest_toml(
                    image, nics=1, cmdline=f"guest.ip={GUEST_IP}/24",
                    extra=f'[[disk]]\npath = "{shared_path(NAME + ".img")}"\n'))
                th.exec(["systemctl", "daemon-reload"])
                th.write_file("/etc/corosync/corosync.conf", COROSYNC_CONF)
                th.write_file("/etc/corosync/authkey", authkey, 0o400)
                # the packages started both with Debian's one-node default: stopped
                th.exec(["systemctl", "stop", "pacemaker.service", "corosync.service"],
                        timeout=120)
            yield hosts
    except HarnessError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory,
         guest_image) -> Iterator[HostPair]:  # type: ignore[no-untyped-def]
    with two_nodes(tmp_path_factory, guest_image) as hosts:
        yield hosts


BOOTS: dict[str, int] = {}  # GUEST-INITs on host0's console: before the cluster, after its start


def active(th: TestHost) -> str:
    return str(th.exec(["systemctl", "is-active", UNIT], check=False).stdout.strip())


def test_ocf_tester(pair: HostPair) -> None:
    """resource-agents' ocf-tester: meta-data against ra-api-1.dtd (xmllint),
    validate-all, probe and monitor stopped and started, start and stop
    twice, migrate_to/migrate_from advertised."""
    th = pair[0]
    r = th.run(["ocf-tester", "-v", "-n", NAME, "-o", f"name={NAME}", AGENT], check=False,
               timeout=600)
    print(f"\nocf-tester -v -n {NAME} -o name={NAME} {AGENT} (exit {r.returncode}):\n"
          f"{r.stdout}{r.stderr}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{AGENT} passed all tests" in r.stdout
    assert active(th) == "inactive"
    # the guest enabled at boot: validate-all refuses (OCF_ERR_CONFIGURED)
    th.exec(["systemctl", "enable", UNIT])
    try:
        r = th.exec([AGENT, "validate-all"], env={"OCF_RESKEY_name": NAME}, check=False)
    finally:
        th.exec(["systemctl", "disable", UNIT])
    assert r.returncode == 6 and "must not be started by systemd at boot" in r.stderr, r


HOLD = """\
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/true
ExecStop=/bin/sleep 300
"""


def test_stop_does_not_wait_on_a_queued_stop_job(pair: HostPair) -> None:
    """The agent's stop while kvm@NAME's own stop job waits behind another
    unit's stop (as at a node's shutdown behind pacemaker.service's, which
    is the agent's caller; here a unit whose stop takes 5 minutes): the
    guest is stopped through its supervisor at once, and the waiting job
    ends with it."""
    th = pair[0]
    env = {"OCF_RESKEY_name": NAME}
    th.write_file("/run/systemd/system/hold.service", HOLD)
    th.write_file(f"/run/systemd/system/{UNIT}.d/60-test-hold.conf",
                  "[Unit]\nBefore=hold.service\n")
    th.exec(["systemctl", "daemon-reload"])
    try:
        assert th.exec([AGENT, "start"], env=env, check=False, timeout=150).returncode == 0
        th.exec(["systemctl", "start", "hold.service"])
        th.exec(["systemctl", "stop", "--no-block", "hold.service", UNIT])
        jobs = th.exec(["systemctl", "list-jobs", "--no-legend"]).stdout
        assert re.search(rf"{re.escape(UNIT)}\s+stop\s+waiting", jobs), jobs
        t0 = time.monotonic()
        r = th.exec([AGENT, "stop"], env=env, check=False, timeout=200)
        took = time.monotonic() - t0
        jobs_after = th.exec(["systemctl", "list-jobs", "--no-legend"]).stdout
        print(f"\nthe agent's stop with kvm@{NAME}'s stop job waiting behind another unit's "
              f"stop: exit {r.returncode} in {took:.1f} s ({r.stderr.strip()}); jobs left: "
              f"{jobs_after.strip() or 'none'}")
        assert r.returncode == 0 and took < 120, r
        assert "supervisor is told" in r.stderr
        assert active(th) == "inactive" and UNIT not in jobs_after
    finally:
        th.exec(["systemctl", "kill", "hold.service"], check=False)
        th.exec(["systemctl", "stop", UNIT], check=False, timeout=200)
        th.exec(["rm", "-f", "/run/systemd/system/hold.service",
                 f"/run/systemd/system/{UNIT}.d/60-test-hold.conf"])
        th.exec(["systemctl", "daemon-reload"])
        th.exec(["systemctl", "reset-failed"], check=False)


def crm(th: TestHost, *args: str, check: bool = True) -> str:
    r = th.exec(["crm", *args], check=False, timeout=120)
    if check:
        assert r.returncode == 0, (args, r.stdout, r.stderr)
    return str(r.stdout)


def located(th: TestHost) -> str:
    """Where Pacemaker says the guest runs (crm_resource --locate)."""
    r = th.exec(["crm_resource", "--locate", "--resource", NAME], check=False)
    found = re.findall(r"is running on: (\S+)", r.stdout)
    return " ".join(found)


def form_cluster(pair: HostPair) -> HostPair:
    """Corosync over the private link (two_node: 1), Pacemaker on both, the
    guest's resource defined (it prefers host0; stickiness keeps it where it
    runs)."""
    t0 = time.monotonic()
    for th in pair:
        th.exec(["systemctl", "start", "corosync.service"], timeout=120)
    for th in pair:
        th.exec(["systemctl", "start", "pacemaker.service"], timeout=120)
    online = f"Online: [ {' '.join(NODES)} ]"
    wait(lambda: online in pair[0].exec(["crm_mon", "-1"], check=False).stdout, 120,
         "both nodes online")
    print(f"\nthe cluster formed in {time.monotonic() - t0:.1f} s:\n"
          + pair[0].exec(["corosync-quorumtool", "-s"], check=False).stdout)
    print("STONITH DISABLED (stonith-enabled=false) in this test only: a real cluster "
          "needs fencing, see docs/pacemaker.md")
    crm(pair[0], "configure", "property", "stonith-enabled=false")
    crm(pair[0], "configure", "rsc_defaults", "resource-stickiness=200")
    BOOTS["before"] = console(pair[0]).count("GUEST-INIT")  # ocf-tester's boots
    crm(pair[0], "configure", *PRIMITIVE.split())
    crm(pair[0], "configure", "location", f"{NAME}-prefers-host0", NAME, "100:", NODES[0])
    return pair


@pytest.fixture(scope="module")
def cluster(pair: HostPair) -> HostPair:
    return form_cluster(pair)


def test_starts_on_node1(cluster: HostPair) -> None:
    a, b = cluster
    took = wait(lambda: located(a) == NODES[0] and active(a) == "active", 180,
                "the guest runs on host0")
    # (ocf-tester's starts may have been stopped before their GUEST-READY)
    wait(lambda: console(a).count("GUEST-INIT") > BOOTS["before"] and
         "GUEST-READY" in console(a).rsplit("GUEST-INIT", 1)[1], 120,
         "the guest booted on host0")
    BOOTS[NODES[0]] = console(a).count("GUEST-INIT")
    assert BOOTS[NODES[0]] == BOOTS["before"] + 1
    print(f"\nthe resource started on host0 in {took:.1f} s: "
          + a.exec(["systemctl", "show", UNIT, "--property=ActiveState,SubState,MainPID"]
                   ).stdout.replace("\n", " "))
    assert active(b) == "inactive"
    assert NAME in a.exec(["kvmagent", "list"]).stdout
    # enabled at boot on host1, where the CIB has it: validate --host warns
    b.exec(["systemctl", "enable", UNIT])
    try:
        wait(lambda: "Pacemaker runs guest ha as a resource" in b.exec(
            ["kvmagent", "validate", "--host", NAME], check=False).stderr, 30,
            "validate --host warned")
    finally:
        b.exec(["systemctl", "disable", UNIT])
    assert "Pacemaker" not in b.exec(["kvmagent", "validate", "--host", NAME]).stderr


def typed(th: TestHost, keys: str) -> None:
    """KEYS typed on the guest's serial console (its shell) on TH."""
    th.exec(["kvmagent", "console", NAME, "--timeout", "1"], input=keys, check=False,
            timeout=60)


SEQ = re.compile(r"64 bytes from [\d.]+: seq=(\d+) ")


def start_pinging(th: TestHost, tag: str) -> None:
    """The guest pings its bridge (10 a second, busybox's ping on its
    console) from now on; each answer's line goes to the console's journal."""
    marker = f"PINGING-{tag}"
    for _ in range(10):
        typed(th, f"echo {marker}; ping -i {PING_EVERY} -w 600 {BRIDGE_IP}\n")
        try:
            wait(lambda: len(SEQ.findall(console(th).rsplit(marker, 1)[-1])) >= 10, 15,
                 "the guest's pings answered")
            return
        except AssertionError:
            typed(th, "\x03")
    raise AssertionError(f"the guest does not ping {BRIDGE_IP}: {console(th)[-2000:]}")


def pings_lost(before: str, b: TestHost, tag: str) -> tuple[int, int]:
    """The guest's pings across its move to B, ended here (Ctrl-C on B's
    console): (answered, lost), from the answers' sequence numbers on both
    consoles (BEFORE: the source's), one ping process moved with the guest."""
    wait(lambda: len(SEQ.findall(console(b))) >= 20, 60, "the guest's pings answered on B")
    typed(b, "\x03")
    seqs = {int(n) for n in SEQ.findall(before.rsplit(f"PINGING-{tag}", 1)[-1])}
    seqs |= {int(n) for n in SEQ.findall(console(b))}
    lost = set(range(min(seqs), max(seqs) + 1)) - seqs
    return len(seqs), len(lost)


def test_move_is_live(cluster: HostPair) -> None:
    a, b = cluster
    start_pinging(a, "move")
    t0 = time.monotonic()
    crm(a, "resource", "move", NAME, NODES[1])
    took = wait(lambda: located(a) == NODES[1] and active(b) == "active" and
                active(a) == "inactive", 300, "the guest moved to host1")
    crm(a, "resource", "clear", NAME)
    answered, lost = pings_lost(console(a), b, "move")
    print(f"\ncrm resource move {NAME} {NODES[1]}: done in {time.monotonic() - t0:.1f} s "
          f"(seen after {took:.1f} s); the guest's pings of its bridge every "
          f"{PING_EVERY * 1000:.0f} ms across the move: {answered} answered, {lost} lost "
          f"({lost * PING_EVERY:.1f} s without an answer); the guest's downtime (QEMU's): "
          f"{'/'.join(DOWNTIME.findall(a.journal(UNIT)))} ms")
    assert f"migrated to {NODES[1]}" in a.journal(UNIT)  # kvmagent migrate, not stop + start
    assert console(a).count("GUEST-INIT") == BOOTS[NODES[0]]
    assert "GUEST-INIT" not in console(b)  # the same boot goes on there
    assert lost * PING_EVERY < 10, lost  # a live move: a few pings, not a boot's worth
    for th in (a, b):  # kvmagent migrate kept it disabled at boot on both
        assert th.exec(["systemctl", "is-enabled", UNIT], check=False).stdout.strip() \
            == "disabled"


def test_standby_moves_it_back_live(cluster: HostPair) -> None:
    a, b = cluster
    t0 = time.monotonic()
    crm(a, "node", "standby", NODES[1])
    try:
        wait(lambda: located(a) == NODES[0] and active(a) == "active" and
             active(b) == "inactive", 300, "the guest moved back to host0")
    finally:
        crm(a, "node", "online", NODES[1])
    print(f"\ncrm node standby {NODES[1]}: the guest back on host0 in "
          f"{time.monotonic() - t0:.1f} s")
    assert f"migrated to {NODES[0]}" in b.journal(UNIT)
    assert console(a).count("GUEST-INIT") == BOOTS[NODES[0]]  # no boot since
    assert "GUEST-INIT" not in console(b)
    time.sleep(5)
    assert located(a) == NODES[0]  # stickiness: it stays


def restarts(th: TestHost) -> int:
    return int(th.exec(["systemctl", "show", UNIT, "--property=NRestarts", "--value"]
                       ).stdout.strip() or 0)


def failcount(th: TestHost) -> str:
    out = th.exec(["crm_failcount", "--query", "--resource", NAME, "--node", NODES[0]],
                  check=False).stdout
    return m.group(1) if (m := re.search(r"value=(\S+)", out)) else out


def test_supervisor_killed_systemd_restarts_it_unseen(cluster: HostPair) -> None:
    """The supervisor killed (SIGKILL): systemd restarts it, the new one
    takes the running guest over; no new boot, nothing for Pacemaker."""
    a, _ = cluster
    before, boots = restarts(a), console(a).count("GUEST-INIT")
    qemu = qemus(a)
    main = a.exec(["systemctl", "show", UNIT, "--property=MainPID", "--value"]).stdout.strip()
    a.exec(["kill", "-KILL", main])
    wait(lambda: restarts(a) == before + 1 and active(a) == "active", 60,
         "systemd restarted the supervisor")
    time.sleep(12)  # two more monitors
    print(f"\nsupervisor killed (SIGKILL) on host0: kvm@{NAME} NRestarts {before} -> "
          f"{restarts(a)}, Pacemaker's fail count {failcount(a)}, QEMU {qemu} -> {qemus(a)}")
    assert qemus(a) == qemu and console(a).count("GUEST-INIT") == boots
    assert failcount(a) == "0" and located(a) == NODES[0]


def test_qemu_killed_pacemaker_recovers_it(cluster: HostPair) -> None:
    """QEMU killed with SIGKILL on host0: the unit ends failed and systemd
    leaves it so (the agent's drop-in: Restart=on-abnormal); Pacemaker's
    monitor sees it, counts it, and starts the guest again."""
    a, b = cluster
    assert located(a) == NODES[0]
    boots, before = console(a).count("GUEST-INIT"), restarts(a)
    since = a.exec(["date", "+%Y-%m-%d %H:%M:%S"]).stdout.strip()
    [pid] = qemus(a)
    t0 = time.monotonic()
    a.exec(["kill", "-KILL", pid])
    wait(lambda: failcount(a) == "1", 60, "Pacemaker counted the failure")
    seen = time.monotonic() - t0
    took = wait(lambda: len(qemus(a)) == 1 and active(a) == "active" and
                console(a).count("GUEST-INIT") == boots + 1, 180, "the guest runs again")
    time.sleep(12)  # two more monitors: nothing else happens
    ops = re.findall(r"Result of (\w+) operation for ha on (host\d+): (\w+)", a.exec(
        ["journalctl", "--since", since, "-u", "pacemaker.service", "-o", "cat",
         "--no-pager"], check=False).stdout)
    print(f"\nQEMU killed (SIGKILL) on host0: Pacemaker counted it after {seen:.1f} s, the "
          f"guest booted again on {located(a)} {seen + took:.1f} s after the kill; "
          f"kvm@{NAME} NRestarts {before} -> {restarts(a)}; fail count {failcount(a)}; "
          f"Pacemaker's operations since: {ops}")
    # systemd did not restart it (that would make NRestarts before + 1): Pacemaker's
    # start did, which begins the count anew
    assert restarts(a) == 0
    assert ("stop", "host0", "ok") in ops and ("start", "host0", "ok") in ops, ops
    assert len(qemus(a)) + len(qemus(b)) == 1 and located(a) == NODES[0]
    crm(a, "resource", "cleanup", NAME)  # the fail count gone: probed again
    wait(lambda: located(a) == NODES[0] and failcount(a) == "0", 60, "cleaned up")


def test_node_killed_guest_starts_on_the_other(cluster: HostPair) -> None:
    a, b = cluster
    wait(lambda: located(b) == NODES[0], 60, "host1 sees it on host0")  # after a re-probe
    t0 = time.monotonic()
    os.kill(a.leader, signal.SIGKILL)  # host0's PID 1: the whole container dies at once
    took = wait(lambda: located(b) == NODES[1] and active(b) == "active", 180,
                "the guest started on host1")
    wait(lambda: "GUEST-READY" in console(b), 120, "the guest booted on host1")
    print(f"\nhost0 killed (SIGKILL of its PID 1): the guest ran on host1 after {took:.1f} s, "
          f"booted there after {time.monotonic() - t0:.1f} s\n"
          + b.exec(["crm_mon", "-1"], check=False).stdout)


@pytest.fixture
def second_cluster(pair: HostPair, tmp_path_factory: pytest.TempPathFactory,
                   guest_image) -> Iterator[HostPair]:  # type: ignore[no-untyped-def]
    """A cluster of two new hosts: the first pair has done its part (its
    host0 was killed), and is torn down first."""
    pair.close()
    with two_nodes(tmp_path_factory, guest_image) as hosts:
        yield form_cluster(hosts)


def test_node_shutdown_moves_the_guest_live(second_cluster: HostPair) -> None:
    """host0's own orderly shutdown (systemctl poweroff) while it runs the
    guest: Pacemaker moves it live to host1 before systemd stops kvm@NAME
    (the agent's drop-in orders the unit Before=pacemaker.service); the same
    boot goes on there, and host0's shutdown is not held up."""
    a, b = second_cluster
    wait(lambda: located(a) == NODES[0] and active(a) == "active" and
         "GUEST-READY" in console(a), 240, "the guest runs on host0")
    assert "pacemaker.service" in a.exec(["systemctl", "show", UNIT, "--property=Before"]
                                         ).stdout  # the agent's drop-in
    start_pinging(a, "shutdown")
    before = console(a)
    # host0's journal while it shuts down, by a unit there that only the
    # shutdown's last kill ends, into the shared storage
    a.exec(["systemd-run", "--quiet", "--unit=shutdown-journal",
            "--property=DefaultDependencies=no",
            f"--property=StandardOutput=file:{shared_path(JOURNAL)}", "--",
            "journalctl", "-f", "-n", "0", "-o", "short-precise", "--no-pager"])
    took = a.poweroff(timeout=SHUTDOWN_LIMIT + 120)
    shutdown_log = (second_cluster.shared / JOURNAL).read_text(errors="replace")
    moved = wait(lambda: located(b) == NODES[1] and active(b) == "active", 120,
                 "the guest runs on host1")
    answered, lost = pings_lost(before + shutdown_log, b, "shutdown")
    ops = re.findall(r"Result of (\w+) operation for ha on (host\d+): (\w+)", b.exec(
        ["journalctl", "-u", "pacemaker.service", "-o", "cat", "--no-pager"],
        check=False).stdout)
    ops_a = re.findall(r"Result of (\w+) operation for ha on (host\d+): (\w+)", shutdown_log)
    seen = [line for line in shutdown_log.splitlines()
            if re.search(r"kvm@ha|guest ha|operation for ha|Stopp(ed|ing) (Pacemaker|"
                         r"Corosync)|Powering off|Reached target.*Power", line)]
    print(f"\nhost0 powered off (systemctl poweroff) while it ran the guest: its shutdown "
          f"took {took:.1f} s (limit {SHUTDOWN_LIMIT} s); the guest ran on host1 "
          f"{moved:.1f} s after; the guest's pings of its bridge: {answered} answered, "
          f"{lost} lost; its downtime (QEMU's): "
          f"{'/'.join(DOWNTIME.findall(shutdown_log))} ms; Pacemaker's operations on "
          f"host0: {ops_a}, on host1: {ops}\n"
          "host0's journal during its shutdown (the guest's lines):\n  "
          + "\n  ".join(seen[-40:]))
    assert took < SHUTDOWN_LIMIT, shutdown_log[-5000:]
    assert ("migrate_to", "host0", "ok") in ops_a and ("stop", "host0", "ok") in ops_a, \
        (ops_a, shutdown_log[-5000:])
    assert ("migrate_from", "host1", "ok") in ops, ops
    assert "GUEST-INIT" not in console(b)  # the same boot goes on there
    assert len(qemus(b)) == 1
    assert lost * PING_EVERY < 10, lost
