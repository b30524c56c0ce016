"""kvmagent.host.sdnotify.Journal with a backlog (the supervisor's): never waits
for a journald that does not read; keeps the order; counts what it lost."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from kvmagent.host.sdnotify import Journal


def test_a_journal_that_does_not_read_never_blocks(tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    journald = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journald.bind(path)
    journal = Journal(path, backlog=50)
    # journald does not read: the socket's queue fills (net.unix.max_dgram_qlen
    # datagrams: 10 by the kernel's default, 512 where systemd set it), then
    # the backlog, then lines are lost; 100 more after the first loss
    t0 = time.monotonic()
    sent = 0
    while journal.lost < 100:
        assert sent < 100_000, f"nothing lost after {sent} lines"
        journal.send(f"line {sent}", 6, GUEST="g")
        sent += 1
    assert time.monotonic() - t0 < 2
    queued = sent - len(journal.backlog) - journal.lost
    assert len(journal.backlog) == 50 and journal.lost == sent - 50 - queued == 100
    assert queued > 0
    lost = journal.lost
    assert journal.flush() == 0  # nothing read yet: nothing more sent, nothing said
    got, said = [], 0
    journald.setblocking(False)
    deadline = time.monotonic() + 30
    while len(got) < queued + 50:
        assert time.monotonic() < deadline, f"{len(got)} of {queued + 50} messages came"
        try:
            got.append(journald.recv(65536))
        except BlockingIOError:
            said += journal.flush()
    said += journal.flush()
    messages = [g.split(b"\n")[0] for g in got]
    assert messages == [f"MESSAGE=line {i}".encode() for i in range(queued + 50)]
    assert said == lost and journal.lost == 0  # the loss is told once, when all is sent
    journald.close()


def test_what_waits_is_sent_before_what_comes_next(tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    journald = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journald.bind(path)
    journal = Journal(path, backlog=1000)
    n = 0
    while not journal.backlog:  # fill journald's queue
        assert n < 100_000, "sending never blocked: no backlog"
        journal.send(f"m{n}")
        n += 1
    journal.send(f"m{n}")
    journald.setblocking(False)
    got = []
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline, f"{len(journal.backlog)} messages still wait"
        try:
            got.append(journald.recv(65536).split(b"\n")[0])
        except BlockingIOError:
            if not journal.backlog:
                break
            journal.flush()
    journal.send("last")
    got.append(journald.recv(65536).split(b"\n")[0])
    assert got == [f"MESSAGE=m{i}".encode() for i in range(n + 1)] + [b"MESSAGE=last"]


def test_a_journal_about_a_unit_names_it_in_every_message(tmp_path: Path) -> None:
    """journalctl -u UNIT matches OBJECT_SYSTEMD_UNIT=UNIT in root's messages:
    a sender that exits before journald reads it is still shown there."""
    path = str(tmp_path / "journal")
    journald = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journald.bind(path)
    Journal(path, unit="kvm@a.service").send("one", 5, GUEST="a")
    Journal(path).send("two")
    assert journald.recv(65536).split(b"\n") == [
        b"MESSAGE=one", b"PRIORITY=5", b"OBJECT_SYSTEMD_UNIT=kvm@a.service", b"GUEST=a", b""]
    assert b"OBJECT_SYSTEMD_UNIT" not in journald.recv(65536)
    journald.close()
