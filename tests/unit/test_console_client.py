"""`kvmagent console`'s client side when the supervisor closes the console
with the viewer's input unread (the guest stopped): the end of the
console, not a traceback (ConnectionResetError)."""

from __future__ import annotations

import io
import socket
import sys
import threading

import pytest

from kvmagent.cli import console


def test_a_reset_connection_is_the_console_closing(monkeypatch: pytest.MonkeyPatch,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    ours, supervisor = socket.socketpair()

    def close_unread() -> None:
        supervisor.recv(1)  # the client has written; the rest stays unread
        supervisor.sendall(b"last words\r\n")
        supervisor.close()

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"typed " * 50000)))
    t = threading.Thread(target=close_unread)
    t.start()
    console._scripted(ours, timeout=5)  # must return, not raise
    t.join()
    ours.close()
    assert "Traceback" not in capfd.readouterr().err
