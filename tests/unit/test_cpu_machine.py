"""The guest's CPU model and its pinned machine type: the cpu key (schema,
host default, argv), checked against the recorded answers of QEMU 7.2 and
10.0 (data/qemucaps), the pin decided purely (kvmagent.render.pin), kept in
the state directory (kvmagent.host.pinfile) and used by the host checks."""

from __future__ import annotations

import json
import sys

import pytest

from kvmagent.config.guests import load_host_config
from kvmagent.config.model import Accel
from kvmagent.config.schema import DEFAULT_CPU
from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.host.hostcheck import check_host
from kvmagent.host.pinfile import pin_file, read_pin, write_pin
from kvmagent.host.qemucaps import qemu_problems
from kvmagent.render.pin import Pin, pin_change, pin_message, pinned_machine
from kvmagent.render.qemu import HostFacts, Sockets, machine_and_cpu, qemu_argv
from tests.unit.test_qemucaps import RELEASES, qemu_7_2, qemu_10_0

from pathlib import Path


def argv_of(conf, facts: HostFacts) -> list[str]:
    host = load_host_config(conf.paths)
    return qemu_argv(conf.guest(), host, facts, Sockets.in_dir(Path("/run/x")))


def value(argv: list[str], opt: str) -> str:
    return argv[argv.index(opt) + 1]


# ------------------------------------------------------------- the cpu key

@pytest.mark.parametrize("accel", [Accel.KVM, Accel.TCG])
def test_the_default_cpu_is_one_migratable_model_under_kvm_and_tcg(conf, accel):
    conf.write("guests/g.toml", "")
    assert conf.guest().cpu == DEFAULT_CPU == "Westmere"
    assert value(argv_of(conf, HostFacts(accel)), "-cpu") == "Westmere"


@pytest.mark.parametrize("release", RELEASES)
def test_the_default_is_in_both_qemus_and_migration_safe(release):
    caps = RELEASES[release]()
    assert DEFAULT_CPU in caps.cpu_models and DEFAULT_CPU not in caps.cpu_unsafe
    assert {"host", "max"} <= caps.cpu_models and {"host", "max"} <= caps.cpu_unsafe


def test_host_is_the_hosts_cpu_under_kvm_and_max_under_tcg(conf):
    conf.write("guests/g.toml", 'cpu = "host"\n')
    guest = conf.guest()
    assert machine_and_cpu(guest, HostFacts(Accel.KVM)) == ("pc", "host")
    assert machine_and_cpu(guest, HostFacts(Accel.TCG)) == ("pc", "max")


def test_a_host_default_and_where_it_came_from(conf):
    toml = conf.write("kvmagent.toml", 'cpu = "Nehalem"\n')
    conf.write("guests/g.toml", "")
    assert conf.guest().cpu == "Nehalem" and conf.guest().origin["cpu"] == str(toml)
    conf.write("guests/g.toml", 'cpu = "EPYC-v4"\n')
    assert conf.guest().cpu == "EPYC-v4"


@pytest.mark.parametrize("bad", ["qemu64,+aes", "", "-help", "Westmere\n", 7])
def test_a_cpu_that_is_no_model_name_is_a_config_error(conf, bad):
    path = conf.write("guests/g.toml", f"cpu = {json.dumps(bad)}\n")
    with pytest.raises(KvmagentError) as e:
        conf.guest()
    assert e.value.status == ExitStatus.CONFIG
    assert e.value.message.startswith(f"{path}: cpu = ")
    assert e.value.hint == "cpu is string"


def test_an_unknown_model_is_named_with_a_hint(conf):
    path = conf.write("guests/g.toml", 'cpu = "Westmere-v9"\n')
    [err] = qemu_problems(conf.guest(), load_host_config(conf.paths), HostFacts(Accel.KVM),
                          qemu_10_0())
    assert err.status == ExitStatus.HOST_NOT_READY
    assert err.message == (f'{path}: cpu = "Westmere-v9": {qemu_10_0().name} has no such '
                           "CPU model")
    assert err.hint == "did you mean 'Westmere-v2'?"
    conf.write("guests/g.toml", 'cpu = "Zzz"\n')
    [err] = qemu_problems(conf.guest(), load_host_config(conf.paths), HostFacts(Accel.KVM),
                          qemu_7_2())
    assert err.hint == ('use "host" or a model that `/usr/bin/qemu-system-x86_64 -cpu help` '
                        'lists, such as "Westmere"')


def test_a_model_only_10_0_has(conf):
    """GraniteRapids came with QEMU 8.2: a Debian 12 host refuses it."""
    conf.write("guests/g.toml", 'cpu = "GraniteRapids"\n')
    host, guest = load_host_config(conf.paths), conf.guest()
    assert qemu_problems(guest, host, HostFacts(Accel.KVM), qemu_10_0()) == []
    [err] = qemu_problems(guest, host, HostFacts(Accel.KVM), qemu_7_2())
    assert "has no such CPU model" in err.message


# ------------------------------------------------------------- the pin, pure

ALIASES_7_2 = {"pc": "pc-i440fx-7.2", "q35": "pc-q35-7.2"}
ALIASES_10_0 = {"pc": "pc-i440fx-10.0", "q35": "pc-q35-10.0"}


def test_the_first_start_pins_what_the_alias_means():
    assert pinned_machine("pc", None, ALIASES_7_2) == "pc-i440fx-7.2"
    assert pin_change("pc", None, "pc-i440fx-7.2") == Pin("pc", "pc-i440fx-7.2")


def test_a_pin_outlives_an_upgrade_of_qemu():
    pin = Pin("pc", "pc-i440fx-7.2")
    assert pinned_machine("pc", pin, ALIASES_10_0) == "pc-i440fx-7.2"
    assert pin_change("pc", pin, "pc-i440fx-7.2") is None  # nothing to write


def test_a_versioned_type_is_pinned_as_it_is():
    assert pinned_machine("pc-q35-7.2", None, ALIASES_10_0) == "pc-q35-7.2"
    assert pin_change("pc-q35-7.2", None, "pc-q35-7.2") == Pin("pc-q35-7.2", "pc-q35-7.2")


def test_another_machine_in_the_file_re_pins():
    pin = Pin("pc", "pc-i440fx-7.2")
    assert pinned_machine("q35", pin, ALIASES_10_0) == "pc-q35-10.0"
    new = pin_change("q35", pin, "pc-q35-10.0")
    assert new == Pin("q35", "pc-q35-10.0")
    assert pin_message("g", pin, new) == ('guest g: machine changed from "pc" (pinned to '
                                          'pc-i440fx-7.2) to "q35": re-pinned to pc-q35-10.0')
    assert pin_message("g", None, pin) == ('guest g: machine "pc" pinned to pc-i440fx-7.2; '
                                           "later starts use it, also after QEMU is upgraded")


# ------------------------------------------------------------- the pin's file

def test_the_pin_file_round_trips_and_lives_in_the_state_dir(tmp_path):
    path = pin_file(tmp_path, "g")
    assert path == tmp_path / "machine" / "g.json"
    assert read_pin(path) is None
    write_pin(path, Pin("pc", "pc-i440fx-7.2"))
    assert json.loads(path.read_text()) == {"requested": "pc", "machine": "pc-i440fx-7.2"}
    assert read_pin(path) == Pin("pc", "pc-i440fx-7.2")
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["g.json"]  # no temporary left


@pytest.mark.parametrize("text", ["", "{}", "[1]", '{"requested": "pc"}'])
def test_a_damaged_pin_file_is_a_host_error_not_a_silent_re_pin(tmp_path, text):
    path = pin_file(tmp_path, "g")
    path.parent.mkdir()
    path.write_text(text)
    with pytest.raises(KvmagentError) as e:
        read_pin(path)
    assert e.value.status == ExitStatus.HOST_NOT_READY
    assert e.value.message == f"{path}: not a pinned machine type"
    assert e.value.hint == ("kvmagent repin g removes it: the next start pins the machine "
                            "type anew")


# ------------------------------------------------------------- in the host checks

def host_check(conf, caps):
    conf.write("kvmagent.toml", f'qemu = "{sys.executable}"\n')  # an executable, any
    return check_host(conf.guest(), load_host_config(conf.paths), caps_probe=lambda q: caps,
                      state_dir=conf.paths.state_dir)


def test_check_host_gives_the_pinned_type_to_the_command_line(conf):
    conf.write("guests/g.toml", 'accel = "tcg"\n')
    facts, problems = host_check(conf, qemu_10_0())
    assert problems == [] and facts.machine == "pc-i440fx-10.0"  # not pinned yet
    write_pin(pin_file(conf.paths.state_dir, "g"), Pin("pc", "pc-i440fx-7.2"))
    facts, problems = host_check(conf, qemu_10_0())
    assert problems == [] and facts.machine == "pc-i440fx-7.2"
    assert value(argv_of(conf, facts), "-machine") == "pc-i440fx-7.2"


def test_a_pinned_type_this_qemu_lacks_names_guest_type_and_file(conf):
    conf.write("guests/g.toml", 'accel = "tcg"\n')
    where = pin_file(conf.paths.state_dir, "g")
    write_pin(where, Pin("pc", "pc-i440fx-10.0"))  # back from Debian 13 to 12
    lasting: list[KvmagentError] = []
    conf.write("kvmagent.toml", f'qemu = "{sys.executable}"\n')
    _, problems = check_host(conf.guest(), load_host_config(conf.paths),
                             caps_probe=lambda q: qemu_7_2(), state_dir=conf.paths.state_dir,
                             lasting=lasting)
    [err] = problems
    assert lasting == [err] and err.status == ExitStatus.HOST_NOT_READY
    guest_file = conf.paths.guest_config("g")
    assert err.message == (f'guest g: machine = "pc" ({guest_file}) is pinned to '
                           f"pc-i440fx-10.0 ({where}), which {qemu_7_2().name} does not have")
    assert err.hint == ("kvmagent repin g (removes that file): the next start pins "
                        "pc-i440fx-7.2, and the guest sees that type's hardware; or run it "
                        "on a host whose QEMU has pc-i440fx-10.0")


def test_a_damaged_pin_stops_the_start(conf):
    conf.write("guests/g.toml", 'accel = "tcg"\n')
    where = pin_file(conf.paths.state_dir, "g")
    where.parent.mkdir(parents=True)
    where.write_text("garbage")
    _, problems = host_check(conf, qemu_10_0())
    assert [p.message for p in problems] == [f"{where}: not a pinned machine type"]


# ------------------------------------------------------------- at start

def test_the_planner_pins_once_and_re_pins_on_a_change(conf, monkeypatch):
    """kvmagent.unit.startup writes the pin the host checks chose, says so
    in the journal, and writes nothing while it stays right."""
    from kvmagent.unit import startup
    conf.write("kvmagent.toml", 'qemu_user = "root"\n')
    conf.write("guests/g.toml", 'accel = "tcg"\n')
    chosen = {"machine": "pc-i440fx-7.2"}
    monkeypatch.setattr(startup, "check_host", lambda guest, host, *, lasting, state_dir: (
        HostFacts(Accel.TCG, machine=chosen["machine"]), []))
    sent: list[str] = []
    monkeypatch.setattr(startup.Journal, "send", lambda self, text, *a, **kw: sent.append(text))
    where = pin_file(conf.paths.state_dir, "g")
    plan, _ = startup.prepare("g", conf.paths)
    assert value(plan.argv, "-machine") == "pc-i440fx-7.2"
    assert read_pin(where) == Pin("pc", "pc-i440fx-7.2")
    assert sent == [pin_message("g", None, Pin("pc", "pc-i440fx-7.2"))]
    stamp = where.stat().st_mtime_ns
    startup.prepare("g", conf.paths)
    assert where.stat().st_mtime_ns == stamp and len(sent) == 1
    conf.write("guests/g.toml", 'accel = "tcg"\nmachine = "q35"\n')
    chosen["machine"] = "pc-q35-7.2"
    startup.prepare("g", conf.paths)
    assert read_pin(where) == Pin("q35", "pc-q35-7.2")
    assert sent[1].startswith('guest g: machine changed from "pc" (pinned to pc-i440fx-7.2) '
                              'to "q35": re-pinned to pc-q35-7.2')


def test_show_says_what_is_pinned(conf, capsys, monkeypatch):
    from kvmagent.cli import commands
    import argparse
    conf.write("guests/g.toml", 'accel = "tcg"\n')
    monkeypatch.setattr(commands, "check_host", lambda guest, host, state_dir: (
        HostFacts(Accel.TCG, machine=pinned_machine("pc", read_pin(pin_file(
            state_dir, "g")), ALIASES_10_0)), []))
    where = pin_file(conf.paths.state_dir, "g")
    commands.cmd_show(argparse.Namespace(name="g", json=False), conf.paths)
    out = capsys.readouterr().out
    assert (f'# machine "pc" is not pinned yet: the next start pins it to pc-i440fx-10.0 '
            f"({where})") in out
    write_pin(where, Pin("pc", "pc-i440fx-7.2"))
    commands.cmd_show(argparse.Namespace(name="g", json=False), conf.paths)
    out = capsys.readouterr().out
    assert f'# machine "pc" is pinned to pc-i440fx-7.2 ({where})' in out
    assert "-machine pc-i440fx-7.2" in out and "-cpu Westmere" in out
    commands.cmd_show(argparse.Namespace(name="g", json=True), conf.paths)
    doc = json.loads(capsys.readouterr().out)
    assert (doc["machine"], doc["cpu"]) == ("pc-i440fx-7.2", "Westmere")
    assert doc["pin"] == {"file": str(where), "requested": "pc", "machine": "pc-i440fx-7.2"}


def test_repin_removes_the_pin_and_says_what_comes_next(conf, monkeypatch, capsys):
    from kvmagent.cli import commands
    import argparse
    conf.write("guests/g.toml", "")
    where = pin_file(conf.paths.state_dir, "g")
    write_pin(where, Pin("pc", "pc-i440fx-7.2"))
    monkeypatch.setattr(commands, "default_caps_probe", lambda qemu: qemu_10_0())
    assert commands.cmd_repin(argparse.Namespace(name="g"), conf.paths) == ExitStatus.OK
    assert not where.exists()
    assert capsys.readouterr().out == (
        f'guest g: unpinned (was pc-i440fx-7.2); its next start pins machine "pc" to '
        f"pc-i440fx-10.0 (in {qemu_10_0().name}). A running guest keeps its machine type "
        "until it is stopped and started again.\n")
    commands.cmd_repin(argparse.Namespace(name="g"), conf.paths)
    assert capsys.readouterr().out == f"guest g: not pinned ({where} does not exist)\n"


def test_repin_at_the_command_line_also_cures_a_damaged_pin(conf, tmp_path):
    from tests.unit.test_cli import kvmagent
    conf.write("kvmagent.toml", f'qemu = "{tmp_path}/no-qemu"\n')
    conf.write("guests/g.toml", "")
    where = pin_file(conf.paths.state_dir, "g")
    where.parent.mkdir(parents=True)
    where.write_text("garbage")
    r = kvmagent(conf, "repin", "g")
    assert r.returncode == 0 and not where.exists(), r.stderr
    assert r.stdout.startswith('guest g: unpinned; its next start pins machine "pc" to what it '
                               "is in the QEMU installed then.")
    r = kvmagent(conf, "repin", "nosuch")
    assert r.returncode == ExitStatus.UNKNOWN_GUEST, r
