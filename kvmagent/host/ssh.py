"""kvmagent on another host, over ssh (`kvmagent -H [USER@]HOST[:PORT] ...`, as
`systemctl -H`): the ssh command line, and running it.

ssh is given an argv list, never a shell string; but ssh joins the words of
the remote command with spaces and hands that line to the remote user's
shell, so each word is quoted for it (shlex.quote).  BatchMode: no password
or host-key question (an unknown host key is an error, as in scripts);
ConnectTimeout and ServerAliveInterval: a dead host or link is noticed
within seconds.  Options the admin sets in ~/.ssh/config (User, Port,
IdentityFile, ControlMaster) apply too; those given here win."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from typing import NamedTuple

from kvmagent.errors import ExitStatus, KvmagentError

SSH = "ssh"
UNREACHABLE = ExitStatus.UNREACHABLE  # ssh's own status when it could not connect, or lost it
CONNECT_TIMEOUT = 10  # seconds to set up the connection
ALIVE_INTERVAL = 5  # seconds between keepalives once connected ...
ALIVE_COUNT = 2  # ... of which this many unanswered end the connection (10 s)
REMOTE_COMMAND = "kvmagent"  # found in the remote user's PATH (/usr/bin with the package)
OPTIONS = ("-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT}",
           "-o", f"ServerAliveInterval={ALIVE_INTERVAL}",
           "-o", f"ServerAliveCountMax={ALIVE_COUNT}")
TARGET_FORM = "[USER@]HOST[:PORT] (an IPv6 address with a port: [ADDR]:PORT)"
_WORD = re.compile(r"[A-Za-z0-9._%+~-]+")  # a user or host name ssh takes as such
_ADDRESS6 = re.compile(r"[0-9A-Fa-f:.]*:[0-9A-Fa-f:.%A-Za-z]*")


class Target(NamedTuple):
    """Where -H points: HOST as given, USER and PORT when given."""

    host: str
    user: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and self.port else self.host
        return f"{self.user + '@' if self.user else ''}{host}{f':{self.port}' if self.port else ''}"


def parse_target(text: str) -> Target:
    """`-H`'s value; KvmagentError (usage, exit 2) for anything ssh could take
    for an option or that is not one host."""
    def bad(why: str) -> KvmagentError:
        return KvmagentError(f"-H {text!r}: {why}", f"give {TARGET_FORM}", ExitStatus.USAGE)

    user, at, rest = text.rpartition("@")
    if at and not _WORD.fullmatch(user):
        raise bad("not a user name before '@'")
    port: str | None = None
    if rest.startswith("["):  # [ADDR] or [ADDR]:PORT
        host, close, tail = rest[1:].partition("]")
        if not close or (tail and not tail.startswith(":")) or not _ADDRESS6.fullmatch(host):
            raise bad("not an address in brackets")
        port = tail[1:] if tail else None
        if tail and not port:
            raise bad("no port after ':'")
    elif rest.count(":") == 1:
        host, _, port = rest.partition(":")
    else:  # a name, an IPv4 address, or an IPv6 address without a port
        host = rest
    if not host:
        raise bad("no host")
    if ":" not in host and (host.startswith("-") or not _WORD.fullmatch(host)):
        raise bad("not a host name or address")
    if ":" in host and not _ADDRESS6.fullmatch(host):
        raise bad("not a host name or address")
    number: int | None = None
    if port is not None:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise bad(f"port {port!r} is not a number from 1 to 65535")
        number = int(port)
    return Target(host, user or None, number)


def remote_line(args: list[str]) -> str:
    """The command line the remote shell runs: `kvmagent ARGS...`, each quoted."""
    return shlex.join([REMOTE_COMMAND, *args])


def ssh_argv(target: Target, args: list[str], tty: bool = False) -> list[str]:
    """ssh's argv that runs kvmagent ARGS on target.  tty: a terminal for
    the remote command (`-t`, the console); `-e none` in every case, so
    that no ssh escape (`~.`) is taken from a console's keys."""
    return [SSH, *OPTIONS, "-e", "none", "-t" if tty else "-T",
            *(["-l", target.user] if target.user else []),
            *(["-p", str(target.port)] if target.port else []),
            "--", target.host, remote_line(args)]


def _ssh_path() -> str:
    path = shutil.which(SSH)
    if path is None:
        raise KvmagentError("-H needs the ssh client, and there is no ssh in PATH",
                            "apt-get install openssh-client", ExitStatus.HOST_NOT_READY)
    return path


def run(target: Target, args: list[str], tty: bool = False) -> int:
    """Run kvmagent ARGS on target, its input, output and errors ours; its exit status
    (UNREACHABLE: ssh failed, and said why on stderr)."""
    argv = ssh_argv(target, args, tty)
    return subprocess.run(argv, executable=_ssh_path(), check=False).returncode


def start(target: Target, args: list[str], input: bool = False) -> subprocess.Popen[bytes]:
    """Start kvmagent ARGS on target, its output and errors captured, no
    input (with INPUT, a pipe: Popen.communicate's input)."""
    return subprocess.Popen(ssh_argv(target, args), executable=_ssh_path(),
                            stdin=subprocess.PIPE if input else subprocess.DEVNULL,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
