"""The plain-TCP stream of `kvmagent migrate --transport tcp...` (#20): the
sockets, outside the sandbox of kvm@NAME.service, handed to the
supervisors as file descriptors like the ssh stream is.

The control stays on ssh: the source makes two one-time random tokens
and sends them on the ssh session's standard input (never on a command
line, which any local user reads in ps).  The destination
(migrate-incoming) listens on its address (kvmagent.render.transport),
says where on its standard output ("tcp", with address and port), and
takes the first connection that sends the client token within
HANDSHAKE_TIMEOUT: a stranger who connects first, sends something else or
nothing at all is dropped, never becomes the guest's stream, and holds
up nothing (up to MAX_PENDING connections are heard at once, the oldest
dropped for a new one).  It answers with the server token, so that the
source hands its guest's memory to no one else who listens there; then
the listening socket closes: one connection, once.

Both ends get TCP keepalives and a user timeout: a link that dies without
a word ends the stream within ~15 s, on the side that reads (QEMU on the
destination waits for data that will never come) and on the side that
writes.  Nothing here encrypts: the command says so, loudly."""

from __future__ import annotations

import hmac
import json
import secrets
import select
import socket
import time
from collections.abc import Callable
from typing import IO, NamedTuple

from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.render.migration import Said

HANDSHAKE_TIMEOUT = 5.0  # seconds a connection has to send the token
MAX_PENDING = 16  # connections heard at once
KEEPIDLE, KEEPINTVL, KEEPCNT = 5, 2, 3  # seconds, seconds, probes: ~11 s to notice
USER_TIMEOUT_MS = 15_000  # data unacknowledged this long ends the connection
_TOKEN_HEX = 64
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)  # Linux's, not in typeshed


class Tokens(NamedTuple):
    """One migration's: the source says CLIENT, the destination SERVER."""
    client: str
    server: str

    @classmethod
    def new(cls) -> Tokens:
        return cls(secrets.token_hex(_TOKEN_HEX // 2), secrets.token_hex(_TOKEN_HEX // 2))

    def line(self) -> bytes:
        """As the source writes them to the ssh session."""
        return (json.dumps(self._asdict()) + "\n").encode()

    @classmethod
    def read(cls, stream: IO[bytes]) -> Tokens:
        """From the ssh session's standard input (migrate-incoming)."""
        text = stream.readline(1024)
        try:
            data = json.loads(text)
            tokens = cls(data["client"], data["server"])
        except (ValueError, KeyError, TypeError):
            tokens = cls("", "")
        if not all(isinstance(t, str) and len(t) == _TOKEN_HEX and t.isascii() and t.isalnum()
                   for t in tokens):
            raise KvmagentError("--transport tcp: no tokens on standard input (it is run by "
                                "kvmagent migrate)", None, ExitStatus.USAGE)
        return tokens


def _said(token: str) -> bytes:
    return token.encode() + b"\n"


def tune(sock: socket.socket) -> None:
    """Keepalives and a user timeout (see above); blocking, as QEMU takes it."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPIDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPINTVL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPCNT)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(True)


class Listener:
    """The destination's listening socket, for one connection."""

    def __init__(self, address: str, port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((address, port))
            self.sock.listen(MAX_PENDING)
        except OSError as e:
            self.sock.close()
            where = f"[{address}]:{port}" if family == socket.AF_INET6 else f"{address}:{port}"
            raise KvmagentError(f"cannot listen on {where} for the migration stream: "
                                f"{e.strerror}", "another port (tcp:ADDR:PORT), or a free one "
                                "(no PORT)", ExitStatus.HOST_NOT_READY) from None
        self.sock.setblocking(False)
        self.address, self.port = address, int(self.sock.getsockname()[1])
        self.strangers: list[str] = []  # peers dropped: wrong token, none, or too late

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def accept(self, tokens: Tokens, timeout: float,
               stopped: Callable[[], bool] = lambda: False) -> socket.socket:
        """The connection that says the client token (answered with the
        server token); KvmagentError when none does within TIMEOUT seconds
        or STOPPED says so."""
        expected = _said(tokens.client)
        deadline = time.monotonic() + timeout
        pending: dict[socket.socket, tuple[bytearray, float, str]] = {}

        def drop(conn: socket.socket) -> None:
            self.strangers.append(pending.pop(conn)[2])
            conn.close()

        try:
            while True:
                now = time.monotonic()
                for conn in [c for c, (_, until, _) in pending.items() if now > until]:
                    drop(conn)
                if now > deadline or stopped():
                    raise KvmagentError(
                        "no migration stream came to "
                        f"{self.address}:{self.port} within {timeout:g} s"
                        + (f" ({len(self.strangers)} other connections dropped)"
                           if self.strangers else ""), None, ExitStatus.FAILURE)
                wait = min([deadline, *(until for _, until, _ in pending.values())]) - now
                ready, _, _ = select.select([self.sock, *pending], [], [],
                                            max(0.0, min(wait, 0.5)))
                if self.sock in ready:
                    try:
                        conn, peer = self.sock.accept()
                    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                        pass
                    else:
                        if len(pending) >= MAX_PENDING:
                            drop(min(pending, key=lambda c: pending[c][1]))
                        conn.setblocking(False)
                        pending[conn] = (bytearray(), now + HANDSHAKE_TIMEOUT, str(peer[0]))
                for conn in [c for c in ready if c in pending]:
                    buf = pending[conn][0]
                    try:
                        data = conn.recv(len(expected) - len(buf))
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        data = b""
                    buf += data
                    if not data or (len(buf) < len(expected) and b"\n" not in buf):
                        if not data:
                            drop(conn)
                        continue
                    if not hmac.compare_digest(bytes(buf), expected):
                        drop(conn)
                        continue
                    del pending[conn]
                    try:
                        tune(conn)
                        conn.sendall(_said(tokens.server))
                    except OSError:
                        conn.close()
                        self.strangers.append("the right token, then gone")
                        continue
                    return conn
        finally:
            for conn in list(pending):
                drop(conn)


def connect(address: str, port: int, tokens: Tokens, timeout: float = 10.0) -> socket.socket:
    """The source's end: connected to the destination, which answered with
    the server token.  KvmagentError otherwise (nothing was sent but the
    client token)."""
    where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    try:
        sock = socket.create_connection((address, port), timeout=timeout)
    except OSError as e:
        raise KvmagentError(f"cannot connect to {where} for the migration stream: "
                            f"{e.strerror or e}", "is that address reachable from here, and "
                            "not filtered?", ExitStatus.FAILURE) from None
    try:
        sock.sendall(_said(tokens.client))
        expected, answer = _said(tokens.server), b""
        while len(answer) < len(expected):
            data = sock.recv(len(expected) - len(answer))
            if not data:
                break
            answer += data
        if not hmac.compare_digest(answer, expected):
            raise KvmagentError(f"{where} did not answer as the destination: the migration "
                                "stream goes to no one else", None, ExitStatus.FAILURE)
        tune(sock)
    except OSError as e:
        sock.close()
        raise KvmagentError(f"the migration stream to {where} failed: {e.strerror or e}",
                            None, ExitStatus.FAILURE) from None
    except KvmagentError:
        sock.close()
        raise
    return sock


def listening(events: list[Said]) -> tuple[str, int] | None:
    """The destination's "tcp" event among its EVENTS: where it listens."""
    for event in events:
        if event.event == "tcp" and event.address and event.port:
            return event.address, event.port
    return None


def outgoing(events: list[Said], ended: Callable[[], bool], tokens: Tokens,
             stopped: Callable[[], bool], timeout: float) -> socket.socket:
    """The source: once the destination said where it listens (its EVENTS,
    as they come), connected there.  KvmagentError when it failed, its ssh
    session ENDED, STOPPED says so (Ctrl-C) or TIMEOUT passed."""
    deadline = time.monotonic() + timeout
    while (where := listening(events)) is None:
        failed = [e for e in events if e.event == "failed"]
        if failed:  # with the destination's exit status (no address there: 5)
            status = failed[0].status
            raise KvmagentError(failed[0].error or "?", None,
                                ExitStatus(status) if status in set(ExitStatus)
                                else ExitStatus.FAILURE)
        if stopped() or ended() or time.monotonic() > deadline:
            raise KvmagentError("interrupted" if stopped() else "the destination did not "
                                "listen for the stream", None, ExitStatus.FAILURE)
        time.sleep(0.05)
    return connect(*where, tokens)


def incoming(transport: str, emit: Callable[..., None], stopped: list[int],
             timeout: float) -> socket.socket:
    """The destination (migrate-incoming): the tokens from standard input,
    the address to listen on (kvmagent.render.transport), the stream once
    the source connected.  From then on, the end of standard input (the
    source's ssh session gone) counts as a stop (SIGHUP in STOPPED)."""
    import os
    import signal
    import sys
    import threading
    from kvmagent.host import netlink
    from kvmagent.render.transport import listen_address, parse_transport
    wanted = parse_transport(transport)
    tokens = Tokens.read(sys.stdin.buffer)

    def hung_up() -> None:
        while os.read(sys.stdin.fileno(), 4096):
            pass
        stopped.append(signal.SIGHUP)

    threading.Thread(target=hung_up, daemon=True).start()
    address = listen_address(wanted, netlink.host_addresses(), os.environ.get("SSH_CONNECTION"))
    with Listener(address, wanted.port) as listener:
        emit("tcp", address=address, port=listener.port)
        sock = listener.accept(tokens, timeout, lambda: bool(stopped))
        emit("tcp-connected", peer=str(sock.getpeername()[0]), dropped=list(listener.strangers))
    return sock
