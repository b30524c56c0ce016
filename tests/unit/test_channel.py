"""The supervisor's control channel (kvmagent.unit.channel) and its typed
requests and replies (kvmagent.unit.protocol): root only, a bad request
answered and refused, a reply of another shape or no answer a clear
error, older and newer records read alike."""

from __future__ import annotations

import json
import socket
import stat
import threading
import types
import typing
from pathlib import Path
from typing import Any

import pytest

from kvmagent.errors import KvmagentError
from kvmagent.unit import channel, protocol

STATUS = protocol.Status("g", "0.2.0", 100, 1.7e9, 200, 1.6e9, "0.1.0", 2)


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
    got = protocol.call(path, protocol.StatusAsk(), protocol.Status)
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
        protocol.read(protocol.Status, {**STATUS._asdict(), "qemu_pid": "200"})
    with pytest.raises(ValueError, match="version: None is not str"):
        protocol.read(protocol.Status, {k: v for k, v in STATUS._asdict().items()
                                        if k != "version"})


def test_a_reply_of_another_shape_is_a_clear_error(tmp_path: Path) -> None:
    """A supervisor whose reply is not the record asked for (another
    kvmagent's): an error naming the command and the field, and a hint."""
    path = tmp_path / "control.sock"
    listener = channel.listen(path)
    thread = serve(listener, {"ok": True, "resumed": "yes"}, [])
    with pytest.raises(KvmagentError) as e:
        protocol.call(path, protocol.ThawAsk(), protocol.Thawed)
    thread.join()
    listener.close()
    assert "answered thaw with" in e.value.message and "resumed: 'yes' is not bool" in \
        e.value.message
    assert e.value.hint and "kvmagent reload" in e.value.hint


def test_every_command_has_its_request_record() -> None:
    assert sorted(protocol.COMMAND.values()) == sorted(channel.COMMANDS)
    assert len(set(protocol.COMMAND.values())) == len(protocol.COMMAND)


def sample(hint: Any) -> object:
    """A value of type HINT (not None)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return sample(next(a for a in typing.get_args(hint) if a is not types.NoneType))
    if origin is list:
        return [sample(typing.get_args(hint)[0])]
    if origin is dict:
        return {"a": 1}
    return {str: "x", int: 7, float: 1.5, bool: True}[hint]


@pytest.mark.parametrize("record", [*protocol.COMMAND, protocol.Done, protocol.Status,
                                    protocol.Frozen, protocol.Thawed, protocol.MigrationStatus,
                                    protocol.Started, protocol.Cancelled, protocol.Ended,
                                    protocol.Copying])
def test_every_record_reads_back_what_it_writes(record: type) -> None:
    """Each record, its fields given values of their types, crosses JSON
    and is read back equal."""
    values = {field: sample(hint) for field, hint in typing.get_type_hints(record).items()}
    sent = record(**values)
    got = protocol.read(record, json.loads(json.dumps(protocol.reply(sent))))
    assert got == sent


def test_an_older_or_newer_record_is_read() -> None:
    """A field with a default may be missing (an older kvmagent's), a
    field unknown is ignored (a newer one's); ints read as floats where a
    float is meant; a missing field without a default is an error."""
    assert protocol.read(protocol.MigrationStatus, {"ok": True, "phase": "incoming",
                                                    "incoming": "waiting"}) == \
        protocol.MigrationStatus(phase="incoming", incoming="waiting")
    assert protocol.read(protocol.Copying, {"ok": True}).sync == "full"
    assert protocol.read(protocol.CancelAsk, {"command": "migrate-cancel", "why": "w",
                                              "colour": "blue"}) == protocol.CancelAsk(why="w")
    ended = protocol.read(protocol.Ended, {"paused_at": 1700000000})
    assert ended.paused_at == 1.7e9 and isinstance(ended.paused_at, float)
    with pytest.raises(ValueError, match="disk: None is not str"):
        protocol.read(protocol.CopyAsk, {"host": "b"})
    with pytest.raises(ValueError, match=r"disks\[1\]: 1 is not str"):
        protocol.read(protocol.ServeAsk, {"disks": ["disk0", 1]})
    with pytest.raises(ValueError, match=r"bandwidth: True is not int \| None"):
        protocol.read(protocol.MigrateAsk, {"bandwidth": True})
    with pytest.raises(ValueError, match="not a JSON object"):
        protocol.read(protocol.Done, [])


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


def hand_made(module: str) -> list[str]:
    """Where MODULE builds or reads the channel's JSON by hand."""
    import ast
    from tests import importgraph
    found = []
    for node in ast.walk(ast.parse(importgraph.source(module).read_text())):
        if (isinstance(node, ast.Attribute) and node.attr == "ask"
                and isinstance(node.value, ast.Name) and node.value.id == "channel"):
            found.append(f"{module} line {node.lineno}: channel.ask")
        if isinstance(node, ast.Dict) and any(
                isinstance(k, ast.Constant) and k.value == "ok" for k in node.keys):
            found.append(f'{module} line {node.lineno}: a reply {{"ok": ...}}')
    return found


def test_what_crosses_the_channel_is_typed() -> None:
    """The command line asks only with protocol.call (a request record,
    its reply read into a record) and the supervisor answers only with
    protocol.reply or refuse: no module but the channel's and the
    protocol's builds or reads the channel's JSON by hand."""
    from tests import importgraph
    found = [where for module in importgraph.modules()
             if module not in ("kvmagent.unit.channel", "kvmagent.unit.protocol")
             for where in hand_made(module)]
    assert not found, "\n".join(found)
    assert hand_made("kvmagent.unit.channel")  # the rule sees its refusal of a bad request
