"""The command line as an admin meets it: /usr/bin/python3 -m kvmagent in a
throwaway configuration directory.  Exit statuses are the documented ones,
and failures print one message, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmagent import __version__
from kvmagent.cli.main import NAME, SHORT_WAYS
from kvmagent.errors import EXIT_STATUS_HELP, ExitStatus

REPO = Path(__file__).resolve().parents[2]


def kvmagent(conf, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO),
           "KVMAGENT_CONFIG_DIR": str(conf.paths.config_dir),
           "KVMAGENT_STATE_DIR": str(conf.paths.state_dir),
           "KVMAGENT_RUNTIME_DIR": str(conf.paths.runtime_dir)}
    return subprocess.run([sys.executable, "-m", "kvmagent", *args], env=env, text=True,
                          capture_output=True, timeout=60)


def test_version_and_help(conf):
    r = kvmagent(conf, "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"kvmagent {__version__}"
    r = kvmagent(conf, "--help")
    assert r.returncode == 0 and EXIT_STATUS_HELP in r.stdout
    for sub in ("validate", "show", "list"):
        r = kvmagent(conf, sub, "--help")
        assert r.returncode == 0, sub
        assert "6  configuration error" in r.stdout


def test_usage_error(conf):
    r = kvmagent(conf, "frobnicate")
    assert r.returncode == ExitStatus.USAGE
    assert "invalid choice: 'frobnicate'" in r.stderr
    r = kvmagent(conf, "show")
    assert r.returncode == ExitStatus.USAGE


def test_validate_ok_and_bad(conf):
    conf.write("guests/good.toml", "cpus = 2\n")
    bad = conf.write("guests/bad.toml", 'memory = "lots"\n')
    r = kvmagent(conf, "validate")
    assert r.returncode == ExitStatus.CONFIG
    assert "good: ok" in r.stdout
    assert f'{bad}: memory = "lots": expected a size' in r.stderr
    assert "Traceback" not in r.stderr
    r = kvmagent(conf, "validate", "good")
    assert r.returncode == 0 and r.stdout == "good: ok\n"


def test_validate_unknown_guest(conf):
    r = kvmagent(conf, "validate", "nosuch")
    assert r.returncode == ExitStatus.UNKNOWN_GUEST
    assert "unknown guest 'nosuch'" in r.stderr


def test_validate_catches_clash_with_another_guest(conf):
    conf.write("guests/a.toml", '[[nic]]\nmac = "52:54:00:00:00:01"\n')
    conf.write("guests/b.toml", '[[nic]]\nmac = "52:54:00:00:00:01"\n')
    r = kvmagent(conf, "validate", "b")
    assert r.returncode == ExitStatus.CONFIG
    assert "is also a MAC of guest a" in r.stderr


def test_validate_host_checks(conf, tmp_path: Path):
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * 4096)
    conf.write("guests/g.toml", f'accel = "tcg"\n[[disk]]\npath = "{img}"\n'
               f'[[disk]]\npath = "{tmp_path}/missing.img"\n')
    r = kvmagent(conf, "validate", "--host", "g")
    assert r.returncode == ExitStatus.HOST_NOT_READY
    assert f'disk[1].path = "{tmp_path}/missing.img": disk does not exist' in r.stderr
    r = kvmagent(conf, "validate", "g")
    assert r.returncode == 0


def test_show(conf, tmp_path: Path):
    # a bridge no host has (br-kvm, the default, may well exist where this runs)
    conf.write("kvmagent.toml", f'accel = "tcg"\nbridge = "nob{os.getpid()}"\n')
    main = conf.write("guests/web.toml", 'cpus = 2\nmemory = "1G"\n[[nic]]\n')
    conf.write("guests/web.toml.d/10-mem.toml", 'memory = "2G"\n')
    r = kvmagent(conf, "show", "web")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"# guest web: {main}" in out
    assert 'memory = "2G"' in out and "# guests/web.toml.d/10-mem.toml" in out
    assert 'accel = "tcg"' in out and "# kvmagent.toml" in out
    assert "-accel tcg,split-wx=on \\" in out and "-m 2048M \\" in out
    assert "MemoryMax=2415919104" in out
    assert f'bridge = "nob{os.getpid()}": no such bridge' in out  # reported, not fatal
    doc = json.loads(kvmagent(conf, "show", "web", "--json").stdout)
    assert doc["argv"][0] == "/usr/bin/qemu-system-x86_64"
    assert doc["config"]["memory"] == "2G" and doc["accel"] == "tcg"
    assert doc["origin"]["memory"].endswith("10-mem.toml")
    assert doc["scope"]["settings"]["MemoryMax"] == 2415919104
    assert not any(tmp_path.joinpath("run").glob("*")), "show must not create anything"


def test_show_bad_config_changes_nothing(conf, tmp_path: Path):
    conf.write("guests/g.toml", 'cpus = "many"\n')
    before = sorted(tmp_path.rglob("*"))
    r = kvmagent(conf, "show", "g")
    assert r.returncode == ExitStatus.CONFIG
    assert r.stdout == ""
    assert sorted(tmp_path.rglob("*")) == before


def test_list(conf):
    conf.write("guests/a.toml", 'description = "mail server"\ncpus = 2\nmemory = "1G"\n[[nic]]\n')
    conf.write("guests/b.toml", "cpus = 0\n")
    r = kvmagent(conf, "list")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "UPTIME", "RESTARTS", "CPUS", "MEMORY", "PID",
                                "BOOT", "TAPS"]
    # no systemd here (states unknown) or a host where guest a never ran (stopped)
    assert lines[1].split()[2:] == ["-", "0", "2", "1G", "-"] + lines[1].split()[7:]
    assert lines[1].split()[1] in ("unknown", "stopped") and lines[1].endswith(" kvm-a-0")
    assert lines[2].startswith("b ") and "invalid" in lines[2]
    rows = json.loads(kvmagent(conf, "list", "--json").stdout)
    assert rows[0]["memory_bytes"] == 1 << 30 and rows[0]["taps"] == ["kvm-a-0"]
    assert rows[0]["description"] == "mail server" and rows[0]["restarts"] == 0
    assert rows[1]["state"] == "invalid"


def test_config_dir_option(conf, tmp_path: Path):
    other = tmp_path / "other"
    (other / "guests").mkdir(parents=True)
    (other / "guests" / "x.toml").write_text("")
    r = kvmagent(conf, "--config-dir", str(other), "list")
    assert r.returncode == 0 and r.stdout.splitlines()[1].startswith("x ")


def test_no_guests(conf):
    r = kvmagent(conf, "list")
    assert r.returncode == 0 and "no guests defined" in r.stdout


@pytest.mark.parametrize("argv", [
    ["list"], ["list", "--json"], ["--config-dir", "/x", "show", "g", "--json"],
    ["--config-dir=/x", "validate", "a", "b", "--host"], ["stop", "--force", "g"],
    ["start", "--transient", "/x/g.toml"], ["bridge", "ensure", "br0", "--uplink", "eth0"],
    ["bridge", "show"], ["run", "--file", "/x/g.toml", "g"], ["stop-post", "g"],
    ["status", "g", "-n", "3"], ["history", "g", "--since", "7d"], ["console", "g"],
    ["install", "g", "--iso", "/x/i.iso", "--vnc", "127.0.0.1:1"],
    ["install", "g", "--iso", "/x/i.iso", "--console"],
    ["run", "--install", "/x/i.iso", "--vnc", "127.0.0.1:1", "g"],
])
def test_parser_of_one_command_parses_as_the_whole(argv: list[str]) -> None:
    """build_parser(argv) builds only argv's command: same result."""
    from kvmagent.cli.parser import build_parser
    assert build_parser(argv).parse_args(argv) == build_parser().parse_args(argv)


def _short_way_argvs(name: str) -> list[list[str]]:
    return sorted([name if a == NAME else a for a in key] for key in SHORT_WAYS)


@pytest.mark.parametrize("argv", _short_way_argvs("g"))
def test_short_ways_parse_as_argparse_would(argv: list[str]) -> None:
    """A command line that cli.main() takes without argparse gets the same
    function and arguments as the parser would give it."""
    from kvmagent.cli.main import _short_way
    from kvmagent.cli.parser import build_parser
    func, values = _short_way(argv) or ("", {})
    parsed = vars(build_parser().parse_args(argv))
    assert parsed.pop("func") == func and parsed.pop("config_dir") is None
    assert parsed.pop("host") is None  # -H: taken by kvmagent.cli.remote, never parsed here
    parsed.pop("command", None)
    assert parsed == values


def test_short_ways_take_names_as_names() -> None:
    """A guest may be called NAME, or like a command; an option is never a name."""
    from kvmagent.cli.main import _short_way
    assert _short_way(["stop", "--force", "NAME"]) == (
        "cli.hardstop:cmd_stop", {"force": True, "no_block": False, "name": "NAME"})
    assert _short_way(["start", "list"]) == (
        "cli.control:cmd_start", {"no_block": False, "transient": None, "name": "list"})
    for argv in (["start", "-h"], ["start", "--no-block", "g"], ["stop", "g", "--force"],
                 ["stop", "--force"], ["start"], ["list", "g"], ["start", "g", "h"]):
        assert _short_way(argv) is None, argv


# A name no guest can have: the command fails the way its function says,
# before D-Bus (the unit tests have no systemd), as it does through argparse
# (--config-dir first: not a short way); argparse is not imported.
@pytest.mark.parametrize("argv", _short_way_argvs("bad..name"))
def test_short_ways_leave_argparse_unimported(conf, argv: list[str]) -> None:
    code = ("import sys, io; from kvmagent.cli.main import main; out = io.StringIO(); "
            "sys.stdout, real = out, sys.stdout; status = main(sys.argv[1:]); sys.stdout = real; "
            "print(status, 'argparse' in sys.modules or 'kvmagent.cli.parser' in sys.modules); "
            "print(out.getvalue())")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO),
           "KVMAGENT_CONFIG_DIR": str(conf.paths.config_dir),
           "KVMAGENT_STATE_DIR": str(conf.paths.state_dir),
           "KVMAGENT_RUNTIME_DIR": str(conf.paths.runtime_dir)}
    short, long = (subprocess.run([sys.executable, "-c", code, *pre, *argv], env=env,
                                  capture_output=True, text=True)
                   for pre in ([], ["--config-dir", str(conf.paths.config_dir)]))
    assert short.returncode == 0, short.stderr
    status, parsed = short.stdout.split("\n")[0].split()
    assert parsed == "False", "argparse imported"
    assert (status, short.stderr) == (long.stdout.split()[0], long.stderr)
    assert int(status) == (ExitStatus.UNKNOWN_GUEST if "bad..name" in argv else 0)
    assert ("[]" in short.stdout) == ("--json" in argv), short.stdout


def test_main_help_before_a_command_lists_every_command(conf) -> None:
    for argv in (["-h", "list"], ["--config-dir", "/x", "--help", "list"]):
        out = kvmagent(conf, *argv).stdout
        assert "reset-counters" in out and "bridge" in out, argv


@pytest.mark.parametrize("option, value, said", [
    ("--max-downtime", "0", "--max-downtime 0: not from 1 to 2000000 ms"),
    ("--max-downtime", "2000001", "--max-downtime 2000001: not from 1 to 2000000 ms"),
    ("--bandwidth", "0", "--bandwidth '0': no bytes per second"),
    ("--bandwidth", "fast", "--bandwidth 'fast'"),
])
def test_migrate_refuses_bad_limits_before_anything(conf, option: str, value: str,
                                                    said: str) -> None:
    """Usage errors, said before any guest file is read or host is asked
    (there is neither here: no ssh is run)."""
    r = kvmagent(conf, "migrate", "nosuchguest", "root@192.0.2.1", option, value)
    assert r.returncode == ExitStatus.USAGE, r.stderr
    assert said in r.stderr and "hint:" in r.stderr and "Traceback" not in r.stderr
