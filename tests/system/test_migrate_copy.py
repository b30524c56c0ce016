"""`kvmagent migrate --copy-storage` between two real test hosts
(tests/harness/hostpair.py: a private link, sshd, root's keys, this checkout
installed): the tiny guest's disk is on host 0's own storage
(/srv/local/cp.img, 64 MiB of random bytes, raw), not on the shared one.

What must fail cleanly first: a disk of another size on host 1 (refused
before anything starts, exit 5, naming the disk, its path and both sizes;
host 1's disk untouched), the destination's QEMU killed mid-copy, the link
cut mid-copy, Ctrl-C of the command mid-copy (slowed with --bandwidth): each time the guest runs on at
host 0 in the same QEMU, and host 1 has no unit running, no QEMU, no tap and
no disk (kvmagent made it, and removed it again).  Then the move: host 1
has no disk, kvmagent makes it (root's, 0600, 64 MiB); meanwhile the guest
writes a numbered block after block ("seq N" into block N, "last N" into
block 0) as fast as it can, across the copy and the switch; afterwards
host 1's image has every block the guest wrote before the switch, host 0's
image (its last state) and host 1's differ only in blocks the guest wrote
after the switch, on host 1, and in nothing else; the guest did not boot
again.  Then back, the state over plain TCP (--transport tcp), the disk
over ssh onto the copy left there.  Then another guest's qcow2 overlay,
made on host 1 on the backing file both have, refused first while host 1
lacks it or has another file there.  Last, a move from Debian 12 to
Debian 13 with --copy-storage.  The
measured downtime and total time are printed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import HarnessError
from tests.harness.hostpair import LINK, HostPair, shared_path
from tests.harness.install import guest_toml
from tests.harness.testhost import TestHost, nsenter_argv
from tests.system.conftest import require_system
from tests.system.guestview import Guest, install, qemus, wait

pytestmark = pytest.mark.system
GUEST = Guest("cp")
NAME, UNIT = GUEST.name, GUEST.unit
console, runs_on, booted = GUEST.console, GUEST.runs_on, GUEST.booted
DISK = "/srv/local/cp.img"
SIZE = 64 << 20  # a mirror sends its first 16 MiB at once, whatever --bandwidth says
BLOCK = 4096
SLOW = "1M"  # --bandwidth: the disk's copy lasts ~50 s
WRITES = 3000  # the most blocks the guest's writer numbers (of 4096)
# The guest's writer: block N gets "seq N", block 0 "last N", each synced
# before the next, until it is killed or has written WRITES blocks.
WRITER = ("n=0; while [ $n -lt %d ]; do n=$((n+1)); "
          "echo seq $n | dd of=/dev/vda bs=4096 seek=$n conv=notrunc 2>/dev/null; sync; "
          "echo last $n | dd of=/dev/vda bs=4096 conv=notrunc 2>/dev/null; sync; "
          "done &\n" % WRITES)


def hosts(tmp_path_factory: pytest.TempPathFactory, guest_image,  # type: ignore[no-untyped-def]
          releases: tuple[str, str], *, disk: str = DISK,
          host_bind: tuple[list[tuple[Path, str]], ...] = ()) -> Iterator[HostPair]:
    """The pair, guest NAME defined on both with DISK as its disk (host 0's
    image made here; another disk, as a block device of HOST_BIND, is the
    caller's), guest sh on the shared storage."""
    require_system()
    from tests.harness.install import REPO
    work = tmp_path_factory.mktemp("migrate-copy")
    shared = work / "shared"
    shared.mkdir(mode=0o755)
    shutil.copyfile(guest_image.kernel, shared / "vmlinuz")
    shutil.copyfile(guest_image.initrd, shared / "initrd.gz")
    with open(shared / "sh.img", "wb") as f:  # a disk both hosts share
        f.write(os.urandom(16 << 20))
    try:
        with HostPair(releases, shared=shared, src=REPO, journal_dir=work / "journal",
                      host_bind=host_bind) as pair:
            image = dataclasses.replace(guest_image, kernel=Path(shared_path("vmlinuz")),
                                        initrd=Path(shared_path("initrd.gz")))
            for th in pair:
                install(th)
                th.exec(["mkdir", "-p", "/srv/local"])
                th.write_file(f"/etc/kvmagent/guests/{NAME}.toml", guest_toml(
                    image, nics=1, extra=f'[[disk]]\npath = "{disk}"\n'))
                th.write_file("/etc/kvmagent/guests/sh.toml", guest_toml(
                    image, nics=0, extra=f'[[disk]]\npath = "{shared_path("sh.img")}"\n'))
                th.exec(["systemctl", "daemon-reload"])  # the generator: the image writable
            if disk == DISK:  # the disk on host 0's own storage alone
                pair[0].exec(["dd", "if=/dev/urandom", f"of={DISK}", "bs=1M",
                              f"count={SIZE >> 20}", "status=none"])
            yield pair
    except HarnessError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory,
         guest_image) -> Iterator[HostPair]:  # type: ignore[no-untyped-def]
    yield from hosts(tmp_path_factory, guest_image, ("bookworm", "bookworm"))


def state(th: TestHost, unit: str = UNIT) -> tuple[str, str]:
    return GUEST.state(th, unit)


def has_disk(th: TestHost) -> bool:
    return th.exec(["test", "-e", DISK], check=False).returncode == 0


def typed(th: TestHost, line: str) -> None:
    GUEST.typed(th, line, 2)


def answers(th: TestHost, tag: str) -> bool:
    return GUEST.answers(th, tag, 2)


def clean(th: TestHost) -> None:
    """No unit running, no QEMU, no tap, no disk, no request and no NBD socket left."""
    assert state(th)[0] == "inactive", state(th)
    assert qemus(th) == [], th.exec(["ps", "axf"]).stdout
    assert f"kvm-{NAME}-0" not in th.exec(["ip", "-o", "link", "show", "type", "tun"],
                                          check=False).stdout
    assert not has_disk(th), th.exec(["ls", "-l", "/srv/local"]).stdout
    assert th.exec(["sh", "-c", f"ls /run/kvmagent/{NAME}/ 2>/dev/null"],
                   check=False).stdout.split() in ([], ["supervisor.lock"])


def disk(th: TestHost) -> bytes:
    data: bytes = th.exec(["cat", DISK], text=False, timeout=60).stdout
    assert len(data) == SIZE, len(data)
    return data


def test_a_disk_of_another_size_there_is_refused(pair: HostPair) -> None:
    a, b = pair
    booted(a)
    # without --copy-storage: the disk is not there, and the hint says how
    r = a.exec(["kvmagent", "migrate", NAME, "host1"], check=False, timeout=120)
    assert r.returncode == 5, r
    assert f'disk[0].path = "{DISK}": disk does not exist' in r.stderr, r.stderr
    assert "--copy-storage" in r.stderr
    b.exec(["truncate", "-s", "8M", DISK])
    r = a.exec(["kvmagent", "migrate", NAME, "host1", "--copy-storage"], check=False,
               timeout=120)
    assert r.returncode == 5, r
    assert (f'host1: disk[0].path = "{DISK}" is 8388608 bytes (8.0 MiB), here 67108864 bytes '
            "(64.0 MiB)") in r.stderr, r.stderr
    assert state(b)[0] == "inactive" and qemus(b) == []
    assert b.exec(["stat", "-c", "%s", DISK]).stdout.strip() == "8388608"  # untouched
    b.exec(["rm", DISK])
    runs_on(a)


def test_a_disk_both_hosts_share_is_not_copied_onto_itself(pair: HostPair) -> None:
    """--copy-storage given for a disk on shared storage: the other QEMU
    cannot take the image's write lock (the source's QEMU holds it; QEMU
    then says the image is read-only), so the copy never starts, and the
    disk is as it was."""
    a, b = pair
    shared = shared_path("sh.img")
    a.exec(["systemctl", "start", "kvm@sh.service"], timeout=180)
    before = hashlib.sha256(a.exec(["cat", shared], text=False).stdout).hexdigest()
    r = a.exec(["kvmagent", "migrate", "sh", "host1", "--copy-storage"], check=False,
               timeout=180)
    print(f"\n--copy-storage onto a shared disk: exit {r.returncode}: {r.stderr.strip()}")
    assert r.returncode == 1 and "QEMU here cannot write it" in r.stderr, r
    assert "storage both hosts share" in r.stderr and "may hold a part" not in r.stderr
    assert state(a, "kvm@sh.service") == ("active", "success")
    wait(lambda: state(b, "kvm@sh.service")[0] == "inactive" and qemus(b) == [], 60,
         "host 1 clean")
    a.exec(["systemctl", "stop", "kvm@sh.service"], timeout=180)
    assert hashlib.sha256(a.exec(["cat", shared], text=False).stdout).hexdigest() == before


def slow_copy(a: TestHost, b: TestHost) -> tuple[subprocess.Popen[str], str]:
    """kvmagent migrate --copy-storage from host 0, slowed down; returns once
    the disk is being copied (and host 0's QEMU pid)."""
    booted(a)
    (pid,) = qemus(a)
    proc = subprocess.Popen(nsenter_argv(a.leader, ["kvmagent", "migrate", NAME, "host1",
                                                    "--copy-storage", "--json", "--bandwidth",
                                                    SLOW]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        event = json.loads(line)
        if event.get("event") == "progress" and event.get("copied", 0) > 0:
            break
    assert not event["ready"], event
    assert len(qemus(b)) == 1 and has_disk(b)
    return proc, pid


def still_here(a: TestHost, b: TestHost, proc: subprocess.Popen[str], pid: str,
               tag: str) -> float:
    """The migration failed; the guest runs on at host 0, in the same QEMU;
    host 1 clean (returns when, after the call)."""
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, (out, err)
    assert '"event": "cancelled"' in out, (out, err)
    noticed = time.monotonic() - t0
    runs_on(a)
    assert qemus(a) == [pid]
    assert answers(a, tag)
    wait(lambda: state(b)[0] == "inactive" and qemus(b) == [] and not has_disk(b), 90,
         "host 1 clean")
    clean(b)
    return noticed


def test_the_destinations_qemu_killed_mid_copy(pair: HostPair) -> None:
    a, b = pair
    proc, pid = slow_copy(a, b)
    (there,) = qemus(b)
    b.exec(["kill", "-9", there])
    still_here(a, b, proc, pid, "after-kill")


def test_ctrl_c_mid_copy(pair: HostPair) -> None:
    a, b = pair
    proc, pid = slow_copy(a, b)
    (command,) = a.exec(["pgrep", "-f", f"kvmagent migrate {NAME} host1"]).stdout.split()
    a.exec(["kill", "-INT", command])
    still_here(a, b, proc, pid, "after-ctrl-c")


def test_the_link_cut_mid_copy(pair: HostPair) -> None:
    """The link goes down without a word: ssh's keepalives end the source's
    side, the destination misses the source's heartbeat."""
    a, b = pair
    proc, pid = slow_copy(a, b)
    t0 = time.monotonic()
    a.exec(["ip", "link", "set", LINK, "down"])
    try:
        still_here(a, b, proc, pid, "after-cut")
        print(f"\nlink cut mid-copy: host 1 clean {time.monotonic() - t0:.1f} s after the cut")
    finally:
        a.exec(["ip", "link", "set", LINK, "up"])


def numbered(data: bytes) -> int:
    """The last block the guest's writer numbered in DATA, checked: "last N"
    in block 0 and "seq I" in every block I up to N."""
    m = re.match(rb"last (\d+)\n", data[:BLOCK])
    assert m, data[:32]
    last = int(m.group(1))
    for i in range(1, last + 1):
        assert data[i * BLOCK:].startswith(b"seq %d\n" % i), (i, last, data[i * BLOCK:][:16])
    return last


def test_the_disk_moves_with_the_guest(pair: HostPair) -> None:
    a, b = pair
    booted(a)
    assert not has_disk(b)
    original = disk(a)
    typed(a, WRITER)
    wait(lambda: disk(a)[:5] == b"last ", 60, "the guest writes its disk")
    r = a.exec(["kvmagent", "migrate", NAME, "host1", "--copy-storage", "--json"],
               check=False, timeout=300)
    assert r.returncode == 0, (r.stdout, r.stderr, b.journal(UNIT)[-3000:])
    events = [json.loads(line) for line in r.stdout.splitlines()]
    done = events[-1]
    assert done["event"] == "migrated" and done["copied"] == ["disk0"], events
    copying = [e for e in events if e.get("phase") == "copy" and "copied" in e]
    print(f"\n--copy-storage, 64 MiB: downtime {done['downtime_ms']} ms (QEMU), QEMU's total "
          f"{done['qemu_total_ms']} ms, the command's total {done['total_seconds']} s, "
          f"{len(copying)} progress events while copying")
    assert copying and copying[-1]["ready"] is True
    runs_on(b)
    assert state(a) == ("inactive", "success") and qemus(a) == []
    assert b.exec(["stat", "-c", "%s %a %U", DISK]).stdout.split() == [str(SIZE), "600", "root"]
    # the guest's writer goes on there; stopped, its blocks are all there
    typed(b, "kill $!; sync\n")
    time.sleep(2)
    typed(b, "sync\n")
    here, there = disk(a), disk(b)
    last_here, last_there = numbered(here), numbered(there)
    print(f"the guest numbered {last_here} blocks on host 0 and {last_there - last_here} "
          "more on host 1")
    assert last_here > 0 and last_there >= last_here
    for i in range(1, SIZE // BLOCK):
        block = slice(i * BLOCK, (i + 1) * BLOCK)
        if here[block] != there[block]:  # written on host 1 after the switch, nothing else
            assert last_here < i <= last_there + 1, i  # (+ 1: numbered, "last" not yet)
        if i > last_there + 1:  # (the block after the last may have its number)
            assert there[block] == original[block], i
    assert answers(b, "on-host1")
    assert console(a).count("GUEST-INIT") == 1 and "GUEST-INIT" not in console(b)
    b.exec(["systemctl", "stop", UNIT], timeout=180)


def test_back_over_plain_tcp(pair: HostPair) -> None:
    """--transport tcp: the state over plain TCP, the disk still over ssh,
    onto the copy the last move left on host 0 (the admin's disk now: of the
    same size, copied onto, not made)."""
    a, b = pair
    booted(b)
    r = b.exec(["kvmagent", "migrate", NAME, "host0", "--copy-storage", "--json",
                "--transport", "tcp:10.79.20.0/24"], check=False, timeout=300)
    assert r.returncode == 0, (r.stdout, r.stderr, a.journal(UNIT)[-3000:])
    assert "UNENCRYPTED" in r.stderr
    done = json.loads(r.stdout.splitlines()[-1])
    assert done["event"] == "migrated" and done["copied"] == ["disk0"], done
    print(f"\nback over tcp, --copy-storage: downtime {done['downtime_ms']} ms (QEMU), the "
          f"command's total {done['total_seconds']} s")
    runs_on(a)
    assert answers(a, "back-on-host0")
    a.exec(["systemctl", "stop", UNIT], timeout=180)
    assert disk(a) == disk(b)  # the guest wrote nothing since it left host 1


OVERLAY, BASE = "/srv/local/ov.qcow2", "/srv/local/base.img"
OV = Guest("ov")


def move_overlay(a: TestHost, b: TestHost) -> subprocess.CompletedProcess[str]:
    return a.exec(["kvmagent", "migrate", OV.name, "host1", "--copy-storage", "--json"],
                  check=False, timeout=300)


def test_a_qcow2_overlay_moves_as_one_onto_the_backing_file_both_hosts_have(
        pair: HostPair, guest_image) -> None:  # type: ignore[no-untyped-def]
    """Guest ov's disk is a qcow2 overlay on a raw image (a clone on its
    template), both on host 0's own storage.  Host 1 with another file
    at the backing file's path, then with none: refused (exit 5) naming it,
    host 1 left without an overlay.  With the same file there (cp):
    kvmagent makes the overlay on host 1 on it, and copies what the overlay
    holds alone; the overlay there names its backing file as the one here
    does (relative to its directory); the guest reads the same disk there
    (its sha256 of /dev/vda, in the guest, before and after)."""
    a, b = pair
    image = dataclasses.replace(guest_image, kernel=Path(shared_path("vmlinuz")),
                                initrd=Path(shared_path("initrd.gz")))
    for th in pair:
        th.write_file(f"/etc/kvmagent/guests/{OV.name}.toml", guest_toml(
            image, nics=0, extra=f'[[disk]]\npath = "{OVERLAY}"\nformat = "qcow2"\n'))
        th.exec(["systemctl", "daemon-reload"])
        th.exec(["dd", "if=/dev/urandom", f"of={BASE}", "bs=1M", "count=32", "status=none"])
    # named beside it, as a clone's overlay often names its template: kept so there
    a.exec(["qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.basename(BASE), "-F",
            "raw", OVERLAY])
    OV.booted(a)
    OV.typed(a, "echo written-on-host0 | dd of=/dev/vda bs=4096 seek=7 conv=notrunc; sync\n")
    before = OV.disk_sum(a, "before")

    def refused(said: str) -> None:
        r = move_overlay(a, b)
        print(f"\n{said}: exit {r.returncode}: {r.stderr.strip()}")
        assert r.returncode == 5 and said in r.stderr, (r.stdout, r.stderr)
        assert f"backing file {BASE}" in r.stderr and "rsync" in r.stderr
        assert OV.state(b)[0] == "inactive" and qemus(b) == []
        assert b.exec(["test", "-e", OVERLAY], check=False).returncode == 1
        OV.runs_on(a)

    refused("is another file there (other contents: the checksums of samples")
    b.exec(["rm", BASE])
    refused("which host1 lacks")
    a.exec(["cp", BASE, shared_path("base.img")])
    b.exec(["cp", shared_path("base.img"), BASE])
    r = move_overlay(a, b)
    assert r.returncode == 0, (r.stdout, r.stderr, b.journal(OV.unit)[-3000:])
    events = [json.loads(line) for line in r.stdout.splitlines()]
    done = events[-1]
    assert done["event"] == "migrated" and done["copied"] == ["disk0"], events
    sent = max(e["total"] for e in events if e.get("phase") == "copy" and "total" in e)
    print(f"overlay on a 32 MiB image: {sent >> 10} KiB copied, downtime "
          f"{done['downtime_ms']} ms, the command's total {done['total_seconds']} s")
    assert 0 < sent < 8 << 20  # what the overlay holds, not the 32 MiB below it
    OV.runs_on(b)
    info = json.loads(b.exec(["qemu-img", "info", "-U", "--output=json", OVERLAY]).stdout)
    assert (info["format"], info["backing-filename"], info["virtual-size"]) == (
        "qcow2", os.path.basename(BASE), 32 << 20), info
    assert OV.disk_sum(b, "after") == before
    assert OV.console(a).count("GUEST-INIT") == 1 and "GUEST-INIT" not in OV.console(b)
    # a new template moved over the old one on host 1: its QEMU reads the old
    b.exec(["sh", "-c", f"cp {BASE} {BASE}.new && mv {BASE}.new {BASE}"])
    r = b.exec(["kvmagent", "migrate", OV.name, "host0", "--copy-storage"], check=False,
               timeout=120)
    print(f"replaced under the guest: exit {r.returncode}: {r.stderr.strip()}")
    assert r.returncode == 1 and "the file at that path now is another one" in r.stderr, r
    OV.runs_on(b)
    b.exec(["systemctl", "stop", OV.unit], timeout=180)


def test_from_debian_12_to_13(tmp_path_factory: pytest.TempPathFactory,
                              guest_image) -> None:  # type: ignore[no-untyped-def]
    made = hosts(tmp_path_factory, guest_image, ("bookworm", "trixie"))
    a, b = next(made)
    try:
        booted(a)
        before = disk(a)
        r = a.exec(["kvmagent", "migrate", NAME, "host1", "--copy-storage", "--json"],
                   check=False, timeout=300)
        assert r.returncode == 0, (r.stdout, r.stderr, b.journal(UNIT)[-3000:])
        done = json.loads(r.stdout.splitlines()[-1])
        print(f"\nDebian 12 -> 13, --copy-storage: downtime {done['downtime_ms']} ms (QEMU), "
              f"the command's total {done['total_seconds']} s")
        runs_on(b)
        assert answers(b, "on-trixie")
        assert "GUEST-INIT" not in console(b)
        b.exec(["systemctl", "stop", UNIT], timeout=180)
        assert disk(b) == before  # the guest did not write it
    finally:
        made.close()
