"""kvmagent list|status|history|reset-counters|stop-post as an admin meets
them, on a state database written in tmp_path: aligned output within 80
columns, stable JSON, documented exit statuses, no tracebacks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from kvmagent.host import state
from kvmagent.errors import ExitStatus
from kvmagent.unit.stoppost import stop_jobs, stop_reason
from kvmagent.cli.tracking import duration, enabled_guests, parse_since

from test_cli import REPO

# What kvmagent makes of its own records, wherever these tests run: kvmagent
# runs as on a host where systemd is not PID 1 (sd_booted(3) false), so a
# guest's state is "unknown" and its uptime comes from the record alone.
# What systemd says of a guest is checked against the real one in
# tests/system/test_tracking.py.
NO_SYSTEMD = """
import os, sys
isdir = os.path.isdir
os.path.isdir = lambda p: os.fspath(p) != "/run/systemd/system" and isdir(p)
from kvmagent.cli.main import main
sys.exit(main())
"""


def _argv(*args: str) -> list[str]:
    return [sys.executable, "-c", NO_SYSTEMD, *args]


def kvmagent(conf, *args: str) -> subprocess.CompletedProcess[str]:
    """test_cli.kvmagent, without systemd."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO),
           "KVMAGENT_CONFIG_DIR": str(conf.paths.config_dir),
           "KVMAGENT_STATE_DIR": str(conf.paths.state_dir),
           "KVMAGENT_RUNTIME_DIR": str(conf.paths.runtime_dir)}
    return subprocess.run(_argv(*args), env=env, text=True, capture_output=True, timeout=60)


def _record(conf, guest: str, rows: list[tuple[str, str | None, float]]) -> None:
    conn = state.connect(conf.paths.state_dir)
    now = state.now()
    # this boot as the kvmagent runs below name it (their runtime directory:
    # /run/kvmagent/boot-id of a host with kvmagent installed is not theirs)
    boot = state.boot_id(conf.paths.runtime_dir)
    for event, reason, ago in rows:
        at = state.Now(now.realtime - ago, now.boottime - ago, boot)
        state.insert(conn, guest, event, reason=reason, at=at, pid=os.getpid()
                     if event == "running" else None, detail="QEMU was killed by signal 9"
                     if reason == state.CRASHED else None)
    conn.close()


def _crashy(conf) -> None:
    conf.write("guests/web.toml", 'cpus = 4\nmemory = "2G"\n[[nic]]\n[[nic]]\n'
               'mode = "user"\n[[nic]]\n')
    _record(conf, "web", [("starting", None, 5000), ("running", None, 4990),
                          ("stopped", state.CRASHED, 3990), ("starting", None, 3988),
                          ("running", None, 3980), ("stopped", state.CRASHED, 2000),
                          ("starting", None, 1998), ("running", None, 1990)])


def test_list_shows_restarts_and_fits_80_columns(conf) -> None:
    _crashy(conf)
    conf.write("guests/a-guest-with-a-rather-long-name.toml", "")
    r = kvmagent(conf, "list")
    assert r.returncode == 0 and "Traceback" not in r.stderr
    lines = r.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    assert lines[1] == "a-guest-with-a-rather-long-name"  # on a line of its own
    assert lines[2].startswith(" " * 12 + " ")
    # without systemd the state is unknown, and the uptime the record's
    assert "systemd is not running on this host (not PID 1): states unknown" in r.stderr
    assert re.match(r"web +unknown +33m 1[01]s +2 +4 +2G ", lines[3]), lines[3]
    assert lines[3].endswith("kvm-web-0 +1")
    rows = {r["name"]: r for r in json.loads(kvmagent(conf, "list", "--json").stdout)}
    assert rows["web"]["restarts"] == 2 and rows["web"]["taps"] == ["kvm-web-0", "kvm-web-2"]
    assert rows["web"]["memory_bytes"] == 2 << 30 and rows["web"]["cpus"] == 4
    assert rows["web"]["state"] == "unknown" and rows["web"]["active_state"] is None
    assert rows["web"]["uptime_seconds"] in (1990, 1991)
    assert set(rows["web"]) >= {"name", "state", "active_state", "sub_state", "enabled",
                                "uptime_seconds", "restarts", "qemu_pid", "cpus",
                                "memory_bytes", "taps", "description"}


def test_list_fits_80_columns_with_extreme_values(conf) -> None:
    """The longest valid name (invalid guest), memory that is not a round
    number of G, an uptime of over a thousand days."""
    longest = "a" * 30 + "-" + "b" * 33
    conf.write(f"guests/{longest}.toml", 'cpus = "x"\n')
    conf.write("guests/big.toml", 'cpus = 255\nmemory = "100000M"\n' + "[[nic]]\n" * 8)
    _record(conf, "big", [("starting", None, 1200 * 86400), ("running", None, 1200 * 86400)])
    lines = kvmagent(conf, "list").stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    assert lines[2].split() == ["invalid", "(kvmagent", "validate", "NAME)"]
    assert re.match(r"big +unknown +1200d +0 +255 +97\.7G +(\d+|-) +- +kvm-big-0 \+7$",
                    lines[3]), lines[3]


@pytest.mark.parametrize("since", ["", "\u00b2d", "9" * 400 + "d", "9" * 5000, "0001-01-01",
                                   "7x", "-7d"])
def test_history_since_refused_with_a_message(conf, since: str) -> None:
    _crashy(conf)
    r = kvmagent(conf, "history", "web", "--since", since)
    assert r.returncode == ExitStatus.USAGE and "Traceback" not in r.stderr, r.stderr
    assert "--since" in r.stderr


def test_history_after_a_reset_fits_80_columns(conf) -> None:
    _crashy(conf)
    kvmagent(conf, "reset-counters", "web")
    lines = kvmagent(conf, "history", "web").stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    assert lines[-1].startswith("(restarts counted since ")


def test_list_reads_drop_ins(conf) -> None:
    conf.write("guests/d.toml", "cpus = 2\n[[nic]]\n")
    conf.write("guests/d.toml.d/50-more.toml", 'cpus = 3\nmemory = "1G"\nnic = []\n')
    (row,) = json.loads(kvmagent(conf, "list", "--json").stdout)
    assert row["cpus"] == 3 and row["memory_bytes"] == 1 << 30 and row["taps"] == []


def test_list_without_a_readable_database_degrades(conf) -> None:
    conf.write("guests/g.toml", "")
    conf.paths.state_dir.mkdir(parents=True)
    (conf.paths.state_dir / "state.db").write_text("this is not a database" * 100)
    r = kvmagent(conf, "list")
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert "no uptime record" in r.stderr and r.stdout.splitlines()[1].split()[3] == "-"


def test_json_says_null_when_the_record_cannot_be_read(conf) -> None:
    """Zero restarts is a statement; an unreadable database makes none."""
    conf.write("guests/g.toml", "")
    for cmd in ("status", "history"):  # nothing recorded yet: zero
        doc = json.loads(kvmagent(conf, cmd, "g", "--json").stdout)
        assert doc["restarts"] == 0 and doc["runs"] == 0, cmd
    conf.paths.state_dir.mkdir(parents=True, exist_ok=True)
    (conf.paths.state_dir / "state.db").write_text("this is not a database" * 100)
    for cmd in ("status", "history"):
        r = kvmagent(conf, cmd, "g", "--json")
        doc = json.loads(r.stdout)
        assert r.returncode == 0 and "no uptime record" in r.stderr, cmd
        assert doc["restarts"] is None and doc["runs"] is None, cmd
        assert doc["cumulative_uptime_seconds"] is None, cmd


def test_list_json_rows_have_the_same_fields(conf) -> None:
    conf.write("guests/good.toml", "cpus = 2\n")
    conf.write("guests/bad.toml", 'cpus = "x"\n')
    rows = {r["name"]: r for r in json.loads(kvmagent(conf, "list", "--json").stdout)}
    assert set(rows["good"]) == set(rows["bad"])
    assert rows["good"]["error"] is None and rows["bad"]["error"]
    assert rows["bad"]["cpus"] is None and rows["bad"]["taps"] is None


def test_history_and_reset_counters(conf) -> None:
    _crashy(conf)
    r = kvmagent(conf, "history", "web")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["TIME", "EVENT", "DETAIL"]
    assert sum("crashed: QEMU was killed by signal 9" in ln for ln in lines) == 2
    assert "runs 3, cumulative uptime 1h 22m, longest 33m 10s, restarts after failures 2" \
        in r.stdout  # 1000 + 1980 + 1990 s
    doc = json.loads(kvmagent(conf, "history", "web", "--json").stdout)
    assert doc["restarts"] == 2 and len(doc["events"]) == 8
    assert doc["longest_uptime_seconds"] == 1990 or doc["longest_uptime_seconds"] == 1991
    assert doc["last_failure"]["reason"] == "crashed"
    recent = json.loads(kvmagent(conf, "history", "web", "--since", "1h", "--json").stdout)
    assert [e["event"] for e in recent["events"]] == ["stopped", "starting", "running"]
    r = kvmagent(conf, "reset-counters", "web")
    assert r.returncode == 0 and "restart counter reset" in r.stdout
    doc = json.loads(kvmagent(conf, "history", "web", "--json").stdout)
    assert doc["restarts"] == 0 and len(doc["events"]) == 8 and doc["restarts_counted_since"]


def test_history_shows_takeovers_and_reloads_as_events_of_the_run(conf) -> None:
    """A supervisor killed and one reloaded: lines of their own, with QEMU's
    pid and what happened; one run, no restart, the uptime unbroken."""
    _record(conf, "web", [("starting", None, 1000), ("running", None, 990)])
    conn = state.connect(conf.paths.state_dir)
    boot = state.boot_id(conf.paths.runtime_dir)
    now = state.now()
    for event, detail, ago in [(state.TAKEN_OVER, "supervisor pid 41 ended; pid 57 took over "
                                "(kvmagent 1.0)", 500),
                               (state.RELOADED, "kvmagent 1.0 -> 1.1, supervisor pid 57", 100)]:
        state.insert(conn, "web", event, detail=detail, pid=4242,
                     at=state.Now(now.realtime - ago, now.boottime - ago, boot))
    conn.close()
    conf.write("guests/web.toml", "")
    r = kvmagent(conf, "history", "web")
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and lines[0].split() == ["TIME", "EVENT", "DETAIL"], r.stderr
    assert re.search(r"  taken-over  QEMU pid 4242; supervisor pid 41 ended; pid 57 took over "
                     r"\(kvmagent 1\.0\)$", lines[3]), lines
    assert lines[4].endswith("  reloaded    QEMU pid 4242; kvmagent 1.0 -> 1.1, supervisor pid 57")
    assert lines[-1].startswith("runs 1, cumulative uptime 16m 3") and \
        lines[-1].endswith("restarts after failures 0"), lines[-1]
    doc = json.loads(kvmagent(conf, "history", "web", "--json").stdout)
    assert [e["event"] for e in doc["events"]] == ["starting", "running", "taken-over",
                                                   "reloaded"]
    assert doc["events"][2]["qemu_pid"] == 4242 and doc["runs"] == 1 and doc["restarts"] == 0
    assert doc["uptime_seconds"] in (990, 991)
    (row,) = json.loads(kvmagent(conf, "list", "--json").stdout)
    assert row["restarts"] == 0 and row["uptime_seconds"] in (990, 991)


def test_a_running_guest_without_a_record_is_shown_as_systemd_knows_it() -> None:
    """The record was damaged and started anew: QEMU's pid and the uptime
    come from the guest's scope (fed here as systemd's answer would be)."""
    from kvmagent.cli.tracking import from_systemd, qemu_of
    from kvmagent.host.systemd import Scope

    qemu = "/usr/bin/qemu-system-x86_64 -name guest=web,debug-threads=on -uuid 1"
    assert qemu_of("web", [(7, "/bin/helper"), (42, qemu)]) == 42
    assert qemu_of("we", [(42, qemu)]) == 42  # the scope's only process
    assert qemu_of("we", [(7, "/bin/helper"), (42, qemu)]) is None
    assert qemu_of("web", []) is None
    rows = [{"name": n, "qemu_pid": None, "uptime_seconds": None} for n in ("web", "gone", "db")]
    rows[2]["uptime_seconds"] = 5  # the record knows its run, not its QEMU
    asked: list[list[str]] = []

    def scopes(units: list[str]) -> dict[str, Scope]:
        asked.append(units)
        return {"kvm-web.scope": Scope("active", 1000.0, [(42, qemu)]),
                "kvm-db.scope": Scope("active", 900.0, [(43, "qemu -name guest=db")])}
    assert from_systemd(rows, 1100.5, scopes) == ""
    assert asked == [["kvm-web.scope", "kvm-gone.scope", "kvm-db.scope"]]
    assert rows[0] == {"name": "web", "qemu_pid": 42, "uptime_seconds": 100}
    assert rows[1] == {"name": "gone", "qemu_pid": None, "uptime_seconds": None}
    assert rows[2] == {"name": "db", "qemu_pid": 43, "uptime_seconds": 5}

    def no_bus(units: list[str]) -> dict[str, Scope]:
        from kvmagent.errors import KvmagentError
        raise KvmagentError("cannot connect to the system bus")
    assert from_systemd(rows, 0.0, no_bus) == "QEMU unknown: cannot connect to the system bus"


def test_unknown_guest_and_no_state_yet(conf) -> None:
    for cmd in ("status", "history", "reset-counters"):
        r = kvmagent(conf, cmd, "nosuch")
        assert r.returncode == ExitStatus.UNKNOWN_GUEST, (cmd, r.stderr)
        assert "unknown guest 'nosuch'" in r.stderr and "Traceback" not in r.stderr
    conf.write("guests/fresh.toml", "")
    r = kvmagent(conf, "history", "fresh")
    assert r.returncode == 0 and "no events recorded for guest fresh" in r.stdout
    assert not (conf.paths.state_dir / "state.db").exists()  # reading creates nothing
    r = kvmagent(conf, "history", "fresh", "--since", "last tuesday")
    assert r.returncode == ExitStatus.USAGE and "--since 'last tuesday'" in r.stderr


def test_status(conf) -> None:
    _crashy(conf)
    r = kvmagent(conf, "status", "web")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    out = r.stdout
    assert out.startswith("web - KVM guest web\n")
    assert "  Restarts: 2 after failures" in out
    assert "crashed: QEMU was killed by signal 9" in out
    assert "kvm-web-0 on br-kvm" in out and "user-mode network" in out
    assert all(len(line) <= 80 for line in out.splitlines() if "Config:" not in line)
    doc = json.loads(kvmagent(conf, "status", "web", "--json").stdout)
    assert doc["restarts"] == 2 and doc["cpus"] == 4 and doc["unit"] == "kvm@web.service"
    assert [n["tap"] for n in doc["nics"]] == ["kvm-web-0", None, "kvm-web-2"]
    conf.write("guests/bad.toml", "cpus = 0\n")
    r = kvmagent(conf, "status", "bad")
    assert r.returncode == 0 and "Config: invalid" in r.stdout


def test_no_color_and_no_tty_means_no_escapes(conf) -> None:
    _crashy(conf)
    for cmd in ("list", "status"):
        args = [cmd] if cmd == "list" else [cmd, "web"]
        assert "\x1b[" not in kvmagent(conf, *args).stdout


def test_color_on_a_terminal_unless_no_color(conf) -> None:
    import pty
    _crashy(conf)
    conf.write("guests/bad.toml", "cpus = 0\n")

    def on_tty(extra: dict[str, str]) -> str:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO),
               "KVMAGENT_CONFIG_DIR": str(conf.paths.config_dir),
               "KVMAGENT_STATE_DIR": str(conf.paths.state_dir), "TERM": "xterm", **extra}
        main, sub = pty.openpty()
        p = subprocess.Popen(_argv("list"), stdout=sub,
                             stderr=subprocess.DEVNULL, env=env)
        os.close(sub)
        out = b""
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        p.wait(30)
        os.close(main)
        return out.decode()

    assert "\x1b[31minvalid\x1b[0m" in on_tty({})
    assert "\x1b[" not in on_tty({"NO_COLOR": "1"})
    assert "\x1b[31minvalid\x1b[0m" in on_tty({"NO_COLOR": ""})  # set but empty: colours


def _stop_post(conf, guest: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO),
            "KVMAGENT_CONFIG_DIR": str(conf.paths.config_dir),
            "KVMAGENT_STATE_DIR": str(conf.paths.state_dir), **env}
    return subprocess.run(_argv("stop-post", guest), env=full,
                          text=True, capture_output=True, timeout=60)


def test_stop_post_records_only_what_the_supervisor_did_not(conf) -> None:
    conf.write("guests/g.toml", "")
    conn = state.connect(conf.paths.state_dir)
    state.insert(conn, "g", "starting", invocation="inv1")
    state.insert(conn, "g", "running", invocation="inv1", pid=1)
    # the supervisor was killed with SIGKILL: nothing recorded the stop
    r = _stop_post(conf, "g", INVOCATION_ID="inv1", SERVICE_RESULT="signal",
                   EXIT_CODE="killed", EXIT_STATUS="KILL")
    assert r.returncode == 0, r.stderr
    last = state.events(conn)[-1]
    assert (last.event, last.reason, last.source) == ("stopped", state.KILLED, "stop-post")
    assert last.detail == "supervisor killed by signal KILL" and last.invocation == "inv1"
    # the supervisor recorded its stop: stop-post adds nothing
    state.insert(conn, "g", "starting", invocation="inv2")
    state.insert(conn, "g", "stopped", reason=state.POWEROFF, invocation="inv2")
    r = _stop_post(conf, "g", INVOCATION_ID="inv2", SERVICE_RESULT="success",
                   EXIT_CODE="exited", EXIT_STATUS="0")
    assert r.returncode == 0 and len(state.events(conn)) == 5
    doc = json.loads(kvmagent(conf, "history", "g", "--json").stdout)
    assert doc["last_failure"]["reason"] == "killed" and doc["restarts"] == 1


def test_stop_reason_mapping() -> None:
    assert stop_reason("watchdog", "killed", "ABRT")[0] == state.WATCHDOG
    assert stop_reason("oom-kill", "killed", "KILL")[0] == state.OOM
    assert stop_reason("signal", "killed", "KILL") == (state.KILLED,
                                                        "supervisor killed by signal KILL")
    assert stop_reason("exit-code", "exited", "6")[0] == state.CONFIG
    assert stop_reason("exit-code", "exited", "5") == (state.FAILED,
                                                       "supervisor exited with status 5")
    assert stop_reason("success", "exited", "0") == (state.ADMIN, None)
    assert stop_reason("timeout", "killed", "TERM")[0] == state.TIMEOUT


def test_durations_and_since() -> None:
    assert [duration(s) for s in (None, 0, 42, 725, 3 * 3600 + 120, 86400 * 400 + 7200)] == \
        ["-", "0s", "42s", "12m 05s", "3h 02m", "400d 02h"]
    now = time.time()
    assert parse_since("7d", now) == now - 7 * 86400
    assert parse_since("2024-05-01") == time.mktime((2024, 5, 1, 0, 0, 0, 0, 0, -1))


def test_enabled_guests_are_the_wants_symlinks(tmp_path) -> None:
    etc, lib = tmp_path / "etc", tmp_path / "lib"
    (etc / "machines.target.wants").mkdir(parents=True)
    (lib / "multi-user.target.wants").mkdir(parents=True)
    (etc / "machines.target.wants" / "kvm@web.service").symlink_to("/lib/kvm@.service")
    (etc / "machines.target.wants" / "kvm@.service").symlink_to("/lib/kvm@.service")
    (etc / "machines.target.wants" / "other.service").symlink_to("/lib/other.service")
    (lib / "multi-user.target.wants" / "kvm@db.service").symlink_to("../kvm@.service")
    (etc / "kvm@gone.service").symlink_to("/dev/null")  # masked, not in a .wants
    assert enabled_guests((str(etc), str(lib), str(tmp_path / "none"))) == {"web", "db"}
    # masked: one guest in /etc (its wants link stays), then the template in /run
    (etc / "kvm@db.service").symlink_to("/dev/null")
    assert enabled_guests((str(etc), str(lib))) == {"web"}
    run = tmp_path / "run"
    run.mkdir()
    assert enabled_guests((str(run), str(etc), str(lib))) == {"web"}
    (run / "kvm@.service").symlink_to("/dev/null")
    assert enabled_guests((str(run), str(etc), str(lib))) == set()
    # a mask behind a unit file of the directory before it masks nothing
    (run / "kvm@.service").unlink()
    (etc / "kvm@.service").write_text("[Service]\n")
    (run / "kvm@.service").symlink_to("/dev/null")
    assert enabled_guests((str(etc), str(run), str(lib))) == {"web"}
    # one directory reached by two names (merged /usr) is read once
    assert enabled_guests((str(lib), str(tmp_path / "lib" / ".." / "lib"))) == {"db"}


def test_list_cache_follows_changed_files(conf) -> None:
    conf.write("guests/c.toml", "cpus = 2\n")
    assert json.loads(kvmagent(conf, "list", "--json").stdout)[0]["cpus"] == 2
    assert (conf.paths.runtime_dir / "list-cache.json").exists()
    conf.write("guests/c.toml", "cpus = 30\n")  # another size, another mtime
    assert json.loads(kvmagent(conf, "list", "--json").stdout)[0]["cpus"] == 30
    conf.write("guests/c.toml.d/x.toml", "cpus = 4\n")
    assert json.loads(kvmagent(conf, "list", "--json").stdout)[0]["cpus"] == 4
    conf.write("guests/c.toml.d/x.toml", "cpus = 0\n")
    assert json.loads(kvmagent(conf, "list", "--json").stdout)[0]["state"] == "invalid"
    (conf.paths.runtime_dir / "list-cache.json").write_text("{garbage")
    assert json.loads(kvmagent(conf, "list", "--json").stdout)[0]["state"] == "invalid"
    # a chmod changes whether the file is trusted, not its size or mtime
    conf.write("guests/c.toml.d/x.toml", "cpus = 4\n")
    path = conf.paths.guests_dir / "c.toml"
    for mode, trusted in ((0o666, False), (0o644, True), (0o666, False)):
        path.chmod(mode)
        row = json.loads(kvmagent(conf, "list", "--json").stdout)[0]
        assert (row["state"] != "invalid") is trusted, (oct(mode), row)


def test_list_and_validate_agree_on_which_guests_are_defined(conf) -> None:
    """One definition (kvmagent.paths.guest_names): an editor's lock file is
    no guest; a dangling symlink is one, shown as invalid."""
    conf.write("guests/web.toml", "")
    conf.write("guests/.web.toml.swp.toml", "")
    (conf.paths.guests_dir / "gone.toml").symlink_to(conf.paths.config_dir / "nowhere.toml")
    rows = {r["name"]: r for r in json.loads(kvmagent(conf, "list", "--json").stdout)}
    assert sorted(rows) == ["gone", "web"]
    assert rows["gone"]["state"] == "invalid" and rows["web"]["state"] != "invalid"
    assert "gone" in kvmagent(conf, "validate").stderr


def test_stop_post_short_way(tmp_path, monkeypatch) -> None:
    """ExecStopPost= after a run that recorded its own stop reads one file
    and imports nothing; anything else takes the long way."""
    from kvmagent.cli import main as cli
    from kvmagent import lifecycle
    runtime = tmp_path / "g"
    runtime.mkdir()
    (runtime / lifecycle.RECORDED_FILE).write_text("inv1")
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(runtime))
    monkeypatch.setenv("INVOCATION_ID", "inv1")
    assert cli._stop_already_recorded(["stop-post", "g"])
    assert not cli._stop_already_recorded(["stop-post", "h"])  # not this unit's directory
    assert not cli._stop_already_recorded(["stop-post", "g", "x"])
    monkeypatch.setenv("INVOCATION_ID", "inv2")  # a later run: not recorded
    assert not cli._stop_already_recorded(["stop-post", "g"])
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    assert not cli._stop_already_recorded(["stop-post", "g"])


def test_run_short_way() -> None:
    from kvmagent.cli import main as cli
    assert cli._run_argv(["run", "g"]) == ("g", None, None, None)
    assert cli._run_argv(["run", "--file", "/x/g.toml", "g"]) == ("g", "/x/g.toml", None, None)
    assert cli._run_argv(["run", "--install", "/x/i.iso", "g"]) == ("g", None, "/x/i.iso", None)
    assert cli._run_argv(["run", "--install", "/x/i.iso", "--vnc", "127.0.0.1:1", "g"]) == (
        "g", None, "/x/i.iso", "127.0.0.1:1")
    for argv in (["run"], ["run", "--help"], ["run", "-x", "g"], ["run", "g", "h"],
                 ["run", "--file", "/x/g.toml"], ["run", "--install", "/x/i.iso"],
                 ["run", "--vnc", "127.0.0.1:1", "--install", "/x/i.iso", "g"],
                 ["run", "--install", "/x/i.iso", "--vnc", "127.0.0.1:1", "-g"], ["list"]):
        assert cli._run_argv(argv) is None, argv


def test_stop_post_sees_a_stop_job_of_the_guests_unit_only() -> None:
    """systemctl list-jobs --plain --no-legend: JOB UNIT TYPE STATE."""
    units = ("kvm@g.service", "kvm-oneoff@g.service")
    listing = ("12 kvm@g.service stop running\n13 kvm-g.scope stop waiting\n"
               "14 kvm@h.service stop running\n")
    assert stop_jobs(listing, units)
    assert stop_jobs("9 kvm-oneoff@g.service restart running\n", units)
    assert not stop_jobs("14 kvm@h.service stop running\n15 kvm@g.service start running\n",
                         units)
    assert not stop_jobs("", units)
