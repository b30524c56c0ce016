"""`kvmagent -H HOST`: the ssh command line (kvmagent.host.ssh), what is
refused before any connection (kvmagent.cli.remote), several hosts'
listings merged (kvmagent.cli.hostlist), and the exit statuses.  Pure,
but for the last tests, which run kvmagent with a stand-in `ssh` first in
PATH that records its argv (the real ssh between two test hosts:
tests/system/test_remote_hosts.py)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from kvmagent.cli import hostlist, remote
from kvmagent.cli.parser import build_parser
from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.host import ssh

REPO = Path(__file__).resolve().parents[2]


# -- -H's value -----------------------------------------------------------------------

@pytest.mark.parametrize("text, target", [
    ("kvm1", ssh.Target("kvm1")),
    ("root@kvm1.example.org", ssh.Target("kvm1.example.org", "root")),
    ("admin@10.79.20.2:2222", ssh.Target("10.79.20.2", "admin", 2222)),
    ("fe80::1", ssh.Target("fe80::1")),
    ("[2001:db8::7]:22", ssh.Target("2001:db8::7", None, 22)),
    ("root@[2001:db8::7]", ssh.Target("2001:db8::7", "root")),
])
def test_targets(text: str, target: ssh.Target) -> None:
    assert ssh.parse_target(text) == target
    assert ssh.parse_target(str(target)) == target


@pytest.mark.parametrize("text, why", [
    ("", "no host"), ("-oProxyCommand=sh", "not a host name"), ("a b", "not a host name"),
    ("root@", "no host"), ("@kvm1", "not a user name"), ("x y@kvm1", "not a user name"),
    ("kvm1:0", "port '0'"), ("kvm1:65536", "port '65536'"), ("kvm1:ssh", "port 'ssh'"),
    ("[::1", "not an address in brackets"), ("[::1]x", "not an address in brackets"),
    ("[::1]:", "no port"), ("kvm1;reboot", "not a host name"), ("a\nb", "not a host name"),
])
def test_bad_targets_are_usage_errors(text: str, why: str) -> None:
    with pytest.raises(KvmagentError) as e:
        ssh.parse_target(text)
    assert e.value.status == ExitStatus.USAGE and why in e.value.message
    assert repr(text) in e.value.message and "[USER@]HOST[:PORT]" in str(e.value.hint)


# -- ssh's argv ------------------------------------------------------------------------

def test_ssh_argv() -> None:
    argv = ssh.ssh_argv(ssh.Target("10.79.20.2", "root", 2222), ["status", "web", "-n", "5"])
    assert argv == ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
                    "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=2",
                    "-e", "none", "-T", "-l", "root", "-p", "2222", "--", "10.79.20.2",
                    "kvmagent status web -n 5"]
    tty = ssh.ssh_argv(ssh.Target("h"), ["console", "web"], tty=True)
    assert tty[tty.index("-e"):] == ["-e", "none", "-t", "--", "h", "kvmagent console web"]


@pytest.mark.parametrize("args", [
    ["history", "web", "--since", "7d"],
    ["--config-dir", "/etc/kvm agent", "list"],
    ["status", "a'b", "$(reboot)", "`id`", "x;y", "*", "~", "", "new\nline", "--", "-x"],
])
def test_each_argument_reaches_the_remote_shell_as_one_word(args: list[str]) -> None:
    """ssh joins its words with spaces for the remote shell: each is quoted,
    and the shell's reading of the line gives them back, nothing expanded."""
    line = ssh.ssh_argv(ssh.Target("h"), args)[-1]
    assert shlex.split(line) == ["kvmagent", *args]
    checked = subprocess.run(["sh", "-c", 'printf "%s\\0" "$@"', "sh",
                              *shlex.split(line)[1:]], capture_output=True, check=True)
    assert checked.stdout.decode().split("\0")[:-1] == args


# -- the command line ------------------------------------------------------------------

@pytest.mark.parametrize("argv, hosts, rest", [
    (["list"], [], ["list"]),
    (["-H", "a", "list"], ["a"], ["list"]),
    (["list", "-H", "a", "-Hb", "--host", "c", "--host=d", "--json"],
     ["a", "b", "c", "d"], ["list", "--json"]),
    (["--config-dir", "-H", "-H", "x", "show", "g"], ["x"], ["--config-dir", "-H", "show", "g"]),
    (["validate", "--host", "g", "-H", "x"], ["x"], ["validate", "--host", "g"]),
    (["--host", "x", "validate", "--host"], ["x"], ["validate", "--host"]),
    (["history", "g", "--since", "-H"], [], ["history", "g", "--since", "-H"]),
    (["status", "g", "--", "-H", "x"], [], ["status", "g", "--", "-H", "x"]),
])
def test_split_hosts(argv: list[str], hosts: list[str], rest: list[str]) -> None:
    assert remote.split_hosts(argv) == (hosts, rest)


def test_a_missing_host_is_a_usage_error() -> None:
    with pytest.raises(KvmagentError) as e:
        remote.split_hosts(["list", "-H"])
    assert e.value.status == ExitStatus.USAGE and "-H needs a host" in e.value.message


def _subparsers() -> dict[str, object]:
    (sub,) = [a for a in build_parser()._actions if a.dest == "command"]
    return dict(sub.choices)  # type: ignore[arg-type]


def test_value_options_are_the_parsers() -> None:
    """split_hosts must know every option that takes a value (its value may
    look like -H), and no other."""
    found = {o for a in build_parser()._actions for o in a.option_strings
             if a.nargs is None and a.dest not in ("host",)}
    for sp in _subparsers().values():
        for a in sp._actions:  # type: ignore[attr-defined]
            if a.nargs is None and a.option_strings and a.const is None:
                found |= set(a.option_strings)
            for sub in getattr(a, "choices", None) or {}:
                if isinstance(a.choices, dict):
                    for b in a.choices[sub]._actions:
                        if b.nargs is None and b.option_strings and b.const is None:
                            found |= set(b.option_strings)
    assert found - {"-h", "--help", "--version"} == remote.VALUE_OPTIONS


def test_unit_commands_are_those_the_units_run() -> None:
    """Every command implemented in kvmagent.unit is refused with -H."""
    unit = {name for name, sp in _subparsers().items()
            if str(sp.get_default("func")).startswith("unit.")}  # type: ignore[attr-defined]
    assert unit == remote.UNIT_COMMANDS


def _refusal(argv: list[str], hosts: int = 1) -> KvmagentError | None:
    return remote.refusal(build_parser(argv).parse_args(argv), hosts)


@pytest.mark.parametrize("argv, hosts, words", [
    (["run", "g"], 1, "-H: run is what systemd runs"),
    (["stop-post", "g"], 1, "-H: stop-post is what systemd runs"),
    (["stop-orphan", "g"], 1, "-H: stop-orphan is what systemd runs"),
    (["start", "--transient", "try.toml"], 1, "start --transient try.toml: a file named here"),
    (["import", "xen", "dom.cfg"], 1, "import dom.cfg: a file named here"),
    (["install", "g", "--iso", "d.iso"], 1, "install --iso d.iso: a file named here"),
    (["status", "g"], 2, "-H given 2 times: only list"),
    (["console", "g"], 3, "-H given 3 times"),
])
def test_refused(argv: list[str], hosts: int, words: str) -> None:
    refused = _refusal(argv, hosts)
    assert refused is not None and refused.status == ExitStatus.USAGE
    assert words in refused.message and refused.hint


@pytest.mark.parametrize("argv, hosts", [
    (["list"], 3), (["list", "--json"], 1), (["status", "g"], 1), (["start", "g"], 1),
    (["stop", "--force", "g"], 1), (["console", "g"], 1), (["history", "g"], 1),
    (["validate", "--host"], 1), (["kernel", "g", "--from-host"], 1), (["bridge", "show"], 1),
])
def test_allowed(argv: list[str], hosts: int) -> None:
    assert _refusal(argv, hosts) is None


# -- several hosts' listings -----------------------------------------------------------

def _row(name: str, state: str = "running", **more: object) -> dict[str, object]:
    return {"name": name, "state": state, "uptime_seconds": 3725, "restarts": 0, "cpus": 1,
            "memory_bytes": 256 << 20, "qemu_pid": 4242, "enabled": True,
            "taps": ["kvm-" + name + "-0"], **more}


def _listing(host: str, rows: list[dict[str, object]], stderr: str = "",
             status: int = 0) -> hostlist.HostListing:
    return hostlist.HostListing(host, status, json.dumps(rows), stderr)


def test_merge_puts_the_host_first_in_order_given() -> None:
    merged = hostlist.merge([_listing("b", [_row("web"), _row("db")]), _listing("a", [_row("x")])])
    assert [(r["host"], r["name"]) for r in merged.rows] == [("b", "web"), ("b", "db"), ("a", "x")]
    assert list(merged.rows[0])[0] == "host" and merged.status == 0 and merged.notes == []


def test_a_host_field_from_a_host_is_replaced() -> None:
    merged = hostlist.merge([_listing("a", [_row("x", host="evil")])])
    assert merged.rows[0]["host"] == "a"


def test_an_unreachable_host_is_named_and_the_others_listed() -> None:
    merged = hostlist.merge([
        _listing("a", [_row("web")]),
        hostlist.HostListing("10.79.20.3", 255, "", "ssh: connect to host 10.79.20.3 port 22: "
                             "Connection timed out\n"),
        _listing("c", [_row("db")], stderr="kvmagent: no uptime record: damaged\n")])
    assert [r["host"] for r in merged.rows] == ["a", "c"]
    assert merged.status == ExitStatus.UNREACHABLE == 255
    assert merged.notes == [
        "10.79.20.3: cannot reach it over ssh (exit status 255): ssh: connect to host "
        "10.79.20.3 port 22: Connection timed out",
        "c: no uptime record: damaged"]


def test_a_failing_kvmagent_gives_its_status() -> None:
    merged = hostlist.merge([
        hostlist.HostListing("a", 127, "", "sh: 1: kvmagent: not found\n"),
        hostlist.HostListing("b", 0, "Traceback (most recent call last)", ""),
        _listing("c", [_row("web")])])
    assert merged.status == 127 and [r["host"] for r in merged.rows] == ["c"]
    assert merged.notes == ["a: sh: 1: kvmagent: not found",
                            "a: kvmagent list failed (exit status 127)",
                            "b: kvmagent list --json gave no listing"]
    assert hostlist.merge([hostlist.HostListing("b", 0, "{}", "")]).status == 1
    # unreachable wins over a failure
    assert hostlist.merge([hostlist.HostListing("a", 4, "", ""),
                           hostlist.HostListing("b", 255, "", "")]).status == 255


def test_table_with_hosts() -> None:
    rows = hostlist.merge([_listing("kvm1", [_row("web"), _row("bad", "invalid")]),
                           _listing("root@kvm-long-name.example.org", [_row("db")])]).rows
    lines = hostlist.table(rows, hosts=True)
    assert lines[0].split() == ["HOST", "NAME", "STATE", "UPTIME", "RESTARTS", "CPUS", "MEMORY",
                                "PID", "BOOT", "TAPS"]
    assert lines[1].split() == ["kvm1", "web", "running", "1h", "02m", "0", "1", "256M", "4242",
                                "yes", "kvm-web-0"]
    assert lines[2].split() == ["kvm1", "bad", "invalid", "(kvmagent", "validate", "bad)"]
    # a host wider than its column: host and name on a line of their own
    assert lines[3] == "root@kvm-long-name.example.org db"
    assert lines[4].split()[0] == "running"
    assert all(len(line) <= 80 for line in lines)
    assert "\x1b[" not in "".join(lines) and "\x1b[32m" in "".join(
        hostlist.table(rows, hosts=True, color=True))
    assert hostlist.table(rows)[0].startswith("NAME ")


# -- through kvmagent's entry, with a stand-in ssh -------------------------------------

FAKE_SSH = """#!/usr/bin/python3
# ssh's stand-in: records argv; its answer from $FAKE_SSH_ANSWERS, by host
import json, os, sys
with open(os.environ["FAKE_SSH_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
host = sys.argv[sys.argv.index("--") + 1]
status, out, err = json.loads(os.environ["FAKE_SSH_ANSWERS"])[host]
sys.stdout.write(out)
sys.stderr.write(err)
sys.exit(status)
"""


def _kvmagent(tmp_path: Path, answers: dict[str, list[object]],
              *argv: str) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "ssh").write_text(FAKE_SSH)
    (bin_dir / "ssh").chmod(0o755)
    log = tmp_path / "ssh.log"
    log.unlink(missing_ok=True)
    env = {"PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO),
           "FAKE_SSH_LOG": str(log), "FAKE_SSH_ANSWERS": json.dumps(answers),
           "KVMAGENT_CONFIG_DIR": str(tmp_path / "nowhere")}
    r = subprocess.run([sys.executable, "-m", "kvmagent", *argv], capture_output=True,
                       text=True, env=env, stdin=subprocess.DEVNULL, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return r, calls


def test_one_host_passes_output_and_status(tmp_path: Path) -> None:
    r, calls = _kvmagent(tmp_path, {"kvm2": [7, "web: stopped\n", "kvmagent: not running\n"]},
                         "status", "-H", "root@kvm2", "web", "-n", "3")
    assert (r.returncode, r.stdout, r.stderr) == (7, "web: stopped\n", "kvmagent: not running\n")
    assert calls == [[*ssh.OPTIONS, "-e", "none", "-T", "-l", "root", "--", "kvm2",
                      "kvmagent status web -n 3"]]


def test_one_host_unreachable_is_255_and_said(tmp_path: Path) -> None:
    r, _ = _kvmagent(tmp_path, {"kvm2": [255, "", "ssh: connect to host kvm2: refused\n"]},
                     "-H", "kvm2", "stop", "web")
    assert r.returncode == 255
    assert r.stderr == ("ssh: connect to host kvm2: refused\nkvmagent: kvm2: ssh could not "
                        "reach it, or lost the connection (exit status 255)\n")


def test_console_without_a_terminal_asks_for_none(tmp_path: Path) -> None:
    _, calls = _kvmagent(tmp_path, {"kvm2": [0, "", ""]}, "console", "-H", "kvm2", "web",
                         "--timeout", "1")
    assert calls[0][calls[0].index("-e"):] == ["-e", "none", "-T", "--", "kvm2",
                                               "kvmagent console web --timeout 1"]


def test_list_on_three_hosts(tmp_path: Path) -> None:
    answers = {"a": [0, json.dumps([_row("web")]), ""],
               "b": [0, json.dumps([_row("db", "stopped", qemu_pid=None)]), ""],
               "c": [255, "", "ssh: connect to host c port 22: No route to host\n"]}
    r, calls = _kvmagent(tmp_path, answers, "list", "-H", "a", "-H", "b", "-H", "c")
    assert sorted(c[-2:] for c in calls) == [["a", "kvmagent list --json"],
                                             ["b", "kvmagent list --json"],
                                             ["c", "kvmagent list --json"]]
    assert r.returncode == 255
    assert [line.split()[:3] for line in r.stdout.splitlines()] == [
        ["HOST", "NAME", "STATE"], ["a", "web", "running"], ["b", "db", "stopped"]]
    assert r.stderr == ("kvmagent: c: cannot reach it over ssh (exit status 255): ssh: connect "
                        "to host c port 22: No route to host\n")
    r, _ = _kvmagent(tmp_path, answers, "--config-dir", "/etc/kvm", "list", "--json",
                     "-H", "a", "-H", "b")
    assert r.returncode == 0 and r.stderr == ""
    assert [(g["host"], g["name"]) for g in json.loads(r.stdout)] == [("a", "web"), ("b", "db")]


def test_refusals_and_bad_lines_run_no_ssh(tmp_path: Path) -> None:
    for argv in (["-H", "a", "run", "g"], ["-H", "a", "-H", "b", "status", "g"],
                 ["-H", "a", "import", "xen", "f"], ["-H", "a", "status"],
                 ["-H", "-oProxyCommand=x", "list"], ["-H", "a", "frobnicate"]):
        r, calls = _kvmagent(tmp_path, {}, *argv)
        assert r.returncode == ExitStatus.USAGE and calls == [], argv
        assert "kvmagent: " in r.stderr and "Traceback" not in r.stderr


def test_no_ssh_client_is_host_not_ready(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path), "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "kvmagent", "-H", "a", "status", "g"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == ExitStatus.HOST_NOT_READY and "apt-get install openssh-client" \
        in r.stderr


def test_validate_host_runs_here_without_ssh(tmp_path: Path) -> None:
    """`validate --host` is validate's own option, run here."""
    code = ("import sys; from kvmagent.cli.main import main; main(['validate', '--host', 'x']); "
            "print(sorted(m for m in sys.modules if 'ssh' in m or m.endswith('remote')))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "KVMAGENT_CONFIG_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.stdout.strip() == "['kvmagent.cli.remote']"  # looked, found no host, ran here
