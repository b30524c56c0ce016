"""kvmagent.host.qmp against a scripted peer on a socketpair (the protocol logic;
tests/qemu and the system tests talk to real QEMU)."""

from __future__ import annotations

import json
import socket

import pytest

from kvmagent.host.qmp import Qmp, QmpError


def _send(sock: socket.socket, *messages: dict) -> None:
    sock.sendall(b"".join(json.dumps(m).encode() + b"\n" for m in messages))


def _request(sock: socket.socket) -> dict:
    return json.loads(sock.recv(65536).splitlines()[0])


def test_a_late_reply_is_not_taken_for_the_next_commands() -> None:
    ours, qemu = socket.socketpair()
    _send(qemu, {"QMP": {"version": {}, "capabilities": []}}, {"return": {}, "id": 1})
    qmp = Qmp(ours, timeout=2)
    assert _request(qemu)["execute"] == "qmp_capabilities"
    with pytest.raises(QmpError, match="did not answer"):
        qmp.execute("query-status", timeout=0.1)  # QEMU is busy
    first = _request(qemu)
    # the late answer, an event, then the answer to the next command
    _send(qemu, {"return": {"status": "paused"}, "id": first["id"]},
          {"event": "RESET", "data": {}},
          {"return": {"status": "running"}, "id": first["id"] + 1})
    assert qmp.execute("query-status", timeout=2) == {"status": "running"}
    assert _request(qemu)["id"] == first["id"] + 1
    assert [e["event"] for e in qmp.poll()] == ["RESET"]
