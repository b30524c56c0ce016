"""`kvmagent console NAME`: attach to a guest's serial console.

The supervisor serves the console on $KVMAGENT_RUNTIME_DIR/NAME/console.sock
(0600, root) while the journal keeps logging it.  On a terminal: raw mode,
restored on every way out; the guest's escape key (default Ctrl-]) or
Ctrl-Q (as in the seed's socat script) leaves.  Without a terminal, for
scripts: what stdin holds is typed, then the output is copied for
--timeout seconds (`printf 'uname -a\\n' | kvmagent console NAME --timeout 5`)."""

from __future__ import annotations

import argparse
import os
import select
import socket
import sys
import termios
import time
import tty

from kvmagent.config.guests import load_guest, load_host_config
from kvmagent.config.values import parse_escape
from kvmagent.errors import ExitStatus, KvmagentError, config_error
from kvmagent.paths import Paths

CTRL_Q = b"\x11"


def _connect(paths: Paths, name: str) -> socket.socket:
    path = paths.console_socket(name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise KvmagentError(f"guest {name} is not running (no console at {path})",
                            f"systemctl start kvm@{name}", ExitStatus.NOT_RUNNING) from None
    except PermissionError:
        sock.close()
        raise KvmagentError(f"cannot open the console of guest {name}: permission denied",
                            "run as root", ExitStatus.NOPERMISSION) from None
    return sock


def _interactive(sock: socket.socket, name: str, escapes: bytes) -> None:
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    keys = " or ".join(f"Ctrl-{chr(c + 64)}" for c in escapes)
    try:
        # Raw before the greeting, and without discarding what was typed
        # ahead (TCSAFLUSH would): once the greeting shows, every key reaches
        # the guest.  (Typed between the two, a line was echoed by the local
        # terminal and then dropped: seen under load in tests/net.)
        tty.setraw(fd, termios.TCSADRAIN)
        sys.stderr.write(f"Connected to the console of {name}; leave with {keys}.\r\n")
        try:
            while True:
                ready, _, _ = select.select([fd, sock], [], [])
                if sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        break
                    os.write(sys.stdout.fileno(), data)
                if fd in ready:
                    data = os.read(fd, 1024)
                    cut = min((data.index(bytes([e])) for e in escapes if bytes([e]) in data),
                              default=-1)
                    if cut >= 0:
                        sock.sendall(data[:cut])
                        return
                    if not data:
                        return
                    sock.sendall(data)
        except ConnectionError:  # reset by the supervisor (the guest stopped), typed input unread
            pass
        sys.stderr.write(f"\r\nThe console of {name} closed.\r\n")
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)
        sys.stderr.write("\n")


def _scripted(sock: socket.socket, timeout: float) -> None:
    try:
        sock.sendall(sys.stdin.buffer.read())
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            data = sock.recv(65536)
            if not data:
                break
            os.write(sys.stdout.fileno(), data)
    except ConnectionError:  # the console closed (the guest stopped): what came is out
        pass


def _running_escape(paths: Paths, name: str) -> str | None:
    """The escape key of the running guest NAME, as its supervisor left it
    beside the socket (Paths.console_key); None if it is not running.  Works for
    one-off guests too, which have no guests/NAME.toml."""
    from kvmagent.names import valid_guest_name
    if not valid_guest_name(name):
        return None
    try:
        spec = paths.console_key(name).read_text().strip()
        parse_escape(spec)
    except (OSError, ValueError):
        return None
    return spec


def cmd_console(args: argparse.Namespace, paths: Paths) -> int:
    spec = _running_escape(paths, args.name)
    if spec is None:  # not running, or no console: the configuration says why
        guest = load_guest(paths, args.name, load_host_config(paths))
        if not guest.console.serial:
            raise config_error(f"{guest.origin_of('console.serial')}: console.serial = false: "
                               f"guest {guest.name} has no serial console")
        spec = guest.console.escape
    escape = parse_escape(spec).encode()
    escapes = escape + (CTRL_Q if escape != CTRL_Q else b"")
    sock = _connect(paths, args.name)
    try:
        if sys.stdin.isatty() and args.timeout is None:
            _interactive(sock, args.name, escapes)
        else:
            _scripted(sock, 5.0 if args.timeout is None else args.timeout)
    finally:
        sock.close()
    return ExitStatus.OK
