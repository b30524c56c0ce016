"""The plain-TCP migration stream (kvmagent.cli.tcpstream) on real sockets,
in a fresh network namespace with an address of its own (a dummy
interface, 10.9.0.2/24): the one connection that says the token is the
stream, and nobody else, whoever connects first; the source hands its
guest to nobody who does not answer with the other token."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import pytest
from pyroute2 import IPRoute

from kvmagent.cli import tcpstream
from kvmagent.cli.tcpstream import Listener, Tokens
from kvmagent.errors import KvmagentError
from kvmagent.host.netlink import host_addresses
from kvmagent.render.transport import listen_address, parse_transport

pytestmark = pytest.mark.net
ADDR = "10.9.0.2"


@pytest.fixture
def address(ipr: IPRoute, add_dummy: Callable[[IPRoute, str], str]) -> str:
    """The namespace's lo up and a dummy with ADDR: what a migration network
    gives a host."""
    ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    add_dummy(ipr, "mig0")
    index = ipr.link_lookup(ifname="mig0")[0]
    ipr.addr("add", index=index, address=ADDR, prefixlen=24)
    ipr.link("set", index=index, state="up")
    return ADDR


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as e:  # handed to the test
            out.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_the_destination_picks_its_address_on_the_network(address: str) -> None:
    local = host_addresses()
    assert ADDR in local and "127.0.0.1" not in local  # lo's is no host's to listen on
    assert listen_address(parse_transport("tcp:10.9.0.0/24"), local, None) == ADDR
    with pytest.raises(KvmagentError, match="no address in 10.8.0.0/24"):
        listen_address(parse_transport("tcp:10.8.0.0/24:4444"), local, None)


def test_the_token_admits_the_stream_and_both_ends_are_tuned(address: str) -> None:
    tokens = Tokens.new()
    with Listener(address) as listener:
        t, got = in_thread(lambda: listener.accept(tokens, 10))
        src = tcpstream.connect(address, listener.port, tokens)
        t.join(10)
        (dst,) = got
        assert isinstance(dst, socket.socket), dst
    with src, dst:
        for sock in (src, dst):
            assert sock.getblocking()  # as QEMU takes it
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == tcpstream.KEEPIDLE
            assert sock.getsockopt(socket.IPPROTO_TCP, tcpstream.TCP_USER_TIMEOUT) \
                == tcpstream.USER_TIMEOUT_MS
        # nothing of the handshake is left in the stream: the first byte is the guest's
        src.sendall(b"QEVM" + bytes(100_000))
        data = b""
        while len(data) < 100_004:
            data += dst.recv(65536)
        assert data[:4] == b"QEVM" and len(data) == 100_004
    # one connection, once: the listening socket is gone
    with pytest.raises(KvmagentError, match="cannot connect"):
        tcpstream.connect(address, listener.port, tokens, timeout=2)


def test_strangers_who_connect_first_never_become_the_stream(address: str) -> None:
    """Three strangers first: one says a wrong token, one says nothing and
    holds on, one sends the guest-sized garbage; then the source.  The
    source's connection is the stream; each stranger's is closed."""
    tokens = Tokens.new()
    with Listener(address) as listener:
        wrong = socket.create_connection((address, listener.port))
        wrong.sendall(Tokens.new().client.encode() + b"\n")
        silent = socket.create_connection((address, listener.port))
        garbage = socket.create_connection((address, listener.port))
        garbage.sendall(b"QEVM" + bytes(1000))
        time.sleep(0.3)  # they are first, by far
        t, got = in_thread(lambda: listener.accept(tokens, 10))
        time.sleep(0.3)
        t0 = time.monotonic()
        src = tcpstream.connect(address, listener.port, tokens)
        t.join(10)
        (dst,) = got
        assert isinstance(dst, socket.socket), dst
        assert time.monotonic() - t0 < tcpstream.HANDSHAKE_TIMEOUT  # the silent one held nothing up
        assert dst.getpeername() == src.getsockname()
        assert len(listener.strangers) == 3 and set(listener.strangers) == {ADDR}
    for s in (wrong, silent, garbage):
        s.settimeout(5)
        try:
            assert s.recv(100) == b""  # closed on them, no token said to them
        except ConnectionResetError:
            pass
        s.close()
    with src, dst:
        src.sendall(b"guest")
        assert dst.recv(5) == b"guest"


def test_a_flood_of_silent_strangers_holds_up_nothing(address: str) -> None:
    tokens = Tokens.new()
    with Listener(address) as listener:
        t, got = in_thread(lambda: listener.accept(tokens, 15))
        flood = [socket.create_connection((address, listener.port))
                 for _ in range(tcpstream.MAX_PENDING * 2)]
        time.sleep(0.5)
        src = tcpstream.connect(address, listener.port, tokens)
        t.join(15)
        (dst,) = got
        assert isinstance(dst, socket.socket), dst
        assert len(listener.strangers) >= tcpstream.MAX_PENDING
    for s in flood:
        s.close()
    src.close()
    dst.close()


def test_the_source_gives_its_guest_to_no_one_else(address: str) -> None:
    """Someone else listens where the destination said: it gets the client
    token and nothing more; the source refuses it."""
    tokens = Tokens.new()
    with socket.create_server((address, 0)) as fake:
        port = fake.getsockname()[1]

        def impostor() -> bytes:
            conn, _ = fake.accept()
            with conn:
                conn.settimeout(5)
                heard = conn.recv(1000)
                conn.sendall(Tokens.new().server.encode() + b"\n")
                time.sleep(0.5)
                try:
                    return heard + conn.recv(1000)
                except OSError:
                    return heard
        t, got = in_thread(impostor)
        with pytest.raises(KvmagentError, match="did not answer as the destination"):
            tcpstream.connect(address, port, tokens, timeout=5)
        t.join(10)
    assert got == [tokens.client.encode() + b"\n"]


def test_no_source_within_the_time_or_a_stop_ends_the_wait(address: str) -> None:
    tokens = Tokens.new()
    with Listener(address) as listener:
        t0 = time.monotonic()
        with pytest.raises(KvmagentError, match="no migration stream came"):
            listener.accept(tokens, 1.0)
        assert 1.0 <= time.monotonic() - t0 < 3
        stop: list[int] = []
        threading.Timer(0.5, lambda: stop.append(1)).start()
        with pytest.raises(KvmagentError, match="no migration stream came"):
            listener.accept(tokens, 30, lambda: bool(stop))
        assert time.monotonic() - t0 < 5


def test_a_port_taken_is_said(address: str) -> None:
    with Listener(address) as first:
        with pytest.raises(KvmagentError, match=f"cannot listen on {ADDR}:{first.port}"):
            Listener(address, first.port)


def test_the_tokens_cross_the_ssh_session_as_one_line() -> None:
    import io
    tokens = Tokens.new()
    assert Tokens.read(io.BytesIO(tokens.line())) == tokens
    assert tokens.client != tokens.server and len(tokens.client) == 64
    for bad in (b"", b"{}\n", b'{"client": "x", "server": "y"}\n', b"not json\n"):
        with pytest.raises(KvmagentError, match="no tokens on standard input"):
            Tokens.read(io.BytesIO(bad))
