"""The console hub's viewers (kvmagent.unit.viewers) on real unix sockets:
a viewer that falls behind by a burst of small writes — what a guest's
serial console is, a few bytes at a time — is kept, and one that stops
reading for good is dropped, never the guest."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from kvmagent.unit.viewers import VIEWER_SNDBUF, ConsoleHub

LINE = b"LOST-12345\r\n"


def hub_with_viewer(tmp_path: Path) -> tuple[ConsoleHub, socket.socket, socket.socket]:
    guest, qemu = socket.socketpair()
    hub = ConsoleHub(tmp_path / "console.sock", guest, "^]", tmp_path / "console.key")
    viewer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    viewer.connect(str(tmp_path / "console.sock"))
    hub.handle([hub.listener])
    assert len(hub.viewers) == 1
    return hub, viewer, qemu


def test_a_viewer_behind_by_thousands_of_small_writes_is_kept(tmp_path: Path) -> None:
    """As root (the supervisor) the viewer's buffer is VIEWER_SNDBUF, which
    holds 3000 small writes (the default buffer: 278); as another user (a
    package build's tests) what net.core.wmem_max allows, and as many."""
    hub, viewer, _ = hub_with_viewer(tmp_path)
    try:
        room = hub.viewers[0].getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        wmem_max = int(Path("/proc/sys/net/core/wmem_max").read_text())
        # the kernel doubles what it is asked for (its bookkeeping's share)
        assert room >= 2 * (VIEWER_SNDBUF if os.geteuid() == 0 else
                            min(VIEWER_SNDBUF, wmem_max)), room
        writes = 3000 if room >= 2 * VIEWER_SNDBUF else room // 1600
        for _ in range(writes):
            hub.broadcast(LINE)
        assert len(hub.viewers) == 1
        viewer.setblocking(False)
        got = b""
        while len(got) < writes * len(LINE):
            got += viewer.recv(1 << 16)
        assert got == LINE * writes
    finally:
        hub.close()
        viewer.close()


def test_a_viewer_that_stops_reading_is_dropped(tmp_path: Path) -> None:
    hub, viewer, _ = hub_with_viewer(tmp_path)
    try:
        for _ in range(200_000):
            hub.broadcast(LINE)
            if not hub.viewers:
                break
        assert hub.viewers == []
    finally:
        hub.close()
        viewer.close()
