"""The supervisor's control channel (kvmagent.unit.channel): typed replies,
root only, a bad request answered and refused, no answer a clear error."""

from __future__ import annotations

import json
import socket
import stat
import threading
from pathlib import Path

import pytest

from kvmagent.errors import KvmagentError
from kvmagent.unit import channel

STATUS = channel.Status("g", "0.2.0", 100, 1.7e9, 200, 1.6e9, "0.1.0", 2)


def serve(listener: socket.socket, reply: dict[str, object], seen: list[str]) -> threading.Thread:
    def one() -> None:
        import select
        select.select([listener], [], [], 5)
        request = channel.receive(listener)
        if request is not None:
            conn, command, _, fds = request
            channel.close_fds(fds)
            seen.append(command)
            channel.answer(conn, reply)
    thread = threading.Thread(target=one)
    thread.start()
    return thread


def test_status_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    listener = channel.listen(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # root only
    seen: list[str] = []
    thread = serve(listener, {"ok": True, **STATUS._asdict()}, seen)
    got = channel.Status.from_json(channel.ask(path, "status"))
    thread.join()
    listener.close()
    assert got == STATUS and seen == ["status"]


def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    channel.listen(path).close()  # left by a supervisor that was killed
    channel.listen(path).close()


def test_a_refusal_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    listener = channel.listen(path)
    thread = serve(listener, {"ok": False, "error": "the guest is stopping"}, [])
    with pytest.raises(KvmagentError, match="refused reload: the guest is stopping"):
        channel.ask(path, "reload")
    thread.join()
    listener.close()


@pytest.mark.parametrize("request_bytes", [b"nonsense", b'{"command": "format-disk"}', b"[]"])
def test_an_unknown_request_is_answered_and_refused(tmp_path: Path, request_bytes: bytes) -> None:
    path = tmp_path / "control.sock"
    listener = channel.listen(path)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client.connect(str(path))
    client.send(request_bytes)
    import select
    select.select([listener], [], [], 5)
    assert channel.receive(listener) is None
    reply = json.loads(client.recv(65536))
    assert reply["ok"] is False and "unknown request" in reply["error"]
    client.close()
    listener.close()


def test_no_supervisor_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KvmagentError) as e:
        channel.ask(tmp_path / "control.sock", "status")
    assert "no answer from the supervisor at" in e.value.message
    assert e.value.hint == "is the guest running? (systemctl status kvm@NAME)"


def test_a_status_of_another_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="qemu_pid: '200' is not int"):
        channel.Status.from_json({**STATUS._asdict(), "qemu_pid": "200"})


def test_a_request_carries_file_descriptors(tmp_path: Path) -> None:
    """SCM_RIGHTS over the channel: the receiver gets a working copy of the
    client's fd (close-on-exec), here one end of a real socketpair."""
    import os
    path = tmp_path / "control.sock"
    listener = channel.listen(path)
    ours, theirs = socket.socketpair()
    got: list[channel.Request] = []

    def one() -> None:
        import select
        select.select([listener], [], [], 5)
        request = channel.receive(listener)
        assert request is not None
        got.append(request)
        channel.answer(request.conn, {"ok": True})
    thread = threading.Thread(target=one)
    thread.start()
    assert channel.ask(path, "migrate", fds=[theirs.fileno()], uri="x") == {"ok": True}
    thread.join()
    listener.close()
    theirs.close()  # the client's copy: the receiver's stays open
    (request,) = got
    assert request.command == "migrate" and request.fields["uri"] == "x"
    (fd,) = request.fds
    assert not os.get_inheritable(fd)
    passed = socket.socket(fileno=fd)
    passed.sendall(b"stream")
    assert ours.recv(16) == b"stream"
    passed.close()
    assert ours.recv(16) == b""  # the last copy is gone: EOF
    ours.close()


def test_fds_of_a_bad_request_are_closed(tmp_path: Path) -> None:
    import os
    path = tmp_path / "control.sock"
    listener = channel.listen(path)
    ours, theirs = socket.socketpair()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client.connect(str(path))
    socket.send_fds(client, [b'{"command": "nonsense"}'], [theirs.fileno()])
    theirs.close()
    before = set(os.listdir("/proc/self/fd"))
    assert channel.receive(listener) is None
    assert set(os.listdir("/proc/self/fd")) <= before  # nothing left open here
    assert b"unknown request" in client.recv(1024)
    assert ours.recv(16) == b""  # the passed copy was closed: EOF
    for s in (client, ours, listener):
        s.close()
