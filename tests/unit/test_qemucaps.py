"""What the installed QEMU supports (kvmagent.host.qemucaps): recorded answers of
real QEMUs parsed, the pure check of a guest's command line against them,
the cache keyed by the binary's stat, and the probe's failures.

data/qemucaps/qemu-7.2.qmp and qemu-10.0.qmp are what Debian 12's and
Debian 13's qemu-system-x86_64 (7.2.22, 10.0.13) wrote on stdout for
qemucaps.PROBE_COMMANDS.  10.0 no longer has the machine types
pc-i440fx-1.x to 2.3 (QEMU removes versioned machine types after six
years) and marks the oldest it keeps as deprecated; a QEMU built
without a device is the recording with that device taken out (without())."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from kvmagent.host import qemucaps
from kvmagent.errors import ExitStatus, KvmagentError, host_error
from kvmagent.config.guests import load_guest, load_host_config
from kvmagent.host.hostcheck import check_host
from kvmagent.config.model import Accel
from kvmagent.render.qemu import HostFacts
from kvmagent.host.qemucaps import QemuCaps, parse_transcript, qemu_problems
from tests import seed

DATA = Path(__file__).parent / "data" / "qemucaps"
SEED = seed.copy(Path("/var/lib/kvmagent"), Path("/run/kvmagent"))  # whoever owns the checkout
SEED_GUESTS = seed.SEED_GUESTS
QEMU = "/usr/bin/qemu-system-x86_64"
OLD_MACHINE = re.compile(r"pc-(i440fx-[12]\.|q35-2\.)")


def qemu_7_2() -> QemuCaps:
    return parse_transcript(QEMU, (DATA / "qemu-7.2.qmp").read_text())


def qemu_10_0() -> QemuCaps:
    return parse_transcript(QEMU, (DATA / "qemu-10.0.qmp").read_text())


def without(caps: QemuCaps, *devices: str) -> QemuCaps:
    """A QEMU built without some devices (Debian's has them all)."""
    return dataclasses.replace(caps, devices=caps.devices - set(devices))


RELEASES = {"7.2": qemu_7_2, "10.0": qemu_10_0}


def facts(accel: Accel = Accel.KVM) -> HostFacts:
    return HostFacts(accel)


def test_the_recorded_answer_of_qemu_7_2():
    caps = qemu_7_2()
    assert caps.version == (7, 2, 22) and caps.package.startswith("Debian 1:7.2")
    assert caps.name == f"QEMU 7.2.22 ({QEMU}, {caps.package})"
    assert caps.aliases["pc"] == "pc-i440fx-7.2" and caps.aliases["q35"] == "pc-q35-7.2"
    assert caps.deprecated == {"pc-i440fx-1.4", "pc-i440fx-1.5", "pc-i440fx-1.6",
                               "pc-i440fx-1.7"}
    assert {"pc", "q35", "pc-i440fx-2.0", "pc-q35-7.2"} <= caps.machines
    assert {"virtio-blk-pci", "virtio-net-pci", "ide-hd", "scsi-cd", "pvpanic",
            "rtl8139"} <= caps.devices
    assert "virtio-device" not in caps.devices  # abstract types cannot be created
    assert caps.accels == {"kvm", "tcg"}
    assert {"sandbox", "action", "add-fd", "vnc"} <= caps.options
    assert {"obsolete", "elevateprivileges", "spawn", "resourcecontrol"} <= caps.sandbox
    assert "exit-failure" in caps.panic_actions
    assert {"tap", "user"} <= caps.netdevs


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("name", SEED_GUESTS)
def test_every_seed_guest_runs_on_both_releases(release, name):
    """The golden argv (tests/unit/test_qemu_argv.py) is one for both
    releases: nothing kvmagent writes differs between QEMU 7.2 and 10.0."""
    host = load_host_config(SEED)
    guest = load_guest(SEED, name, host)
    for accel in (Accel.KVM, Accel.TCG):
        assert qemu_problems(guest, host, facts(accel), RELEASES[release]()) == []


def test_a_machine_type_that_qemu_10_removed(conf):
    path = conf.write("guests/g.toml", 'machine = "pc-i440fx-2.0"\n')
    guest = conf.guest()
    host = load_host_config(conf.paths)
    assert qemu_problems(guest, host, facts(), qemu_7_2()) == []
    [err] = qemu_problems(guest, host, facts(), qemu_10_0())
    assert err.status == ExitStatus.HOST_NOT_READY
    assert err.message == (f'{path}: machine = "pc-i440fx-2.0": QEMU 10.0.13 ({QEMU}, Debian 1:10.0.13+ds-0+deb13u1) '
                           "has no such machine type")
    assert err.hint == 'use a machine type it has: "pc" (pc-i440fx-10.0), "q35" (pc-q35-10.0)'


def test_a_deprecated_machine_type_is_a_notice(conf):
    conf.write("kvmagent.toml", f'qemu = "{sys.executable}"\n')
    path = conf.write("guests/g.toml", 'accel = "tcg"\nmachine = "pc-i440fx-1.4"\n')
    facts, problems = check_host(conf.guest(), load_host_config(conf.paths), state_dir=conf.paths.state_dir,
                                 caps_probe=lambda q: qemu_7_2())
    assert problems == []
    assert facts.notices == (f'{path}: machine = "pc-i440fx-1.4" is deprecated in '
                             f'{qemu_7_2().name} and will be removed from a coming release; '
                             '"pc" or "q35" is its newest',)
    conf.write("guests/g.toml", 'accel = "tcg"\n')
    facts, _ = check_host(conf.guest(), load_host_config(conf.paths), state_dir=conf.paths.state_dir,
                          caps_probe=lambda q: qemu_7_2())
    assert facts.notices == ()


def test_a_machine_type_set_for_every_guest_names_kvmagent_toml(conf):
    toml = conf.write("kvmagent.toml", 'machine = "pc-i440fx-2.1"\n')
    conf.write("guests/g.toml", "")
    [err] = qemu_problems(conf.guest(), load_host_config(conf.paths), facts(), qemu_10_0())
    assert err.message.startswith(f'{toml}: machine = "pc-i440fx-2.1": QEMU 10.0.13 ')


def test_a_nic_model_this_qemu_lacks(conf):
    path = conf.write("guests/g.toml", '[[nic]]\n[[nic]]\nmodel = "rtl8139"\n')
    [err] = qemu_problems(conf.guest(), load_host_config(conf.paths), facts(),
                          without(qemu_10_0(), "rtl8139"))
    assert err.message == (f'{path}: nic[1].model = "rtl8139": QEMU 10.0.13 ({QEMU}, Debian 1:10.0.13+ds-0+deb13u1) '
                           "has no device rtl8139")
    assert "virtio" in (err.hint or "")


def test_a_disk_bus_this_qemu_lacks(conf):
    path = conf.write("guests/g.toml", '[[disk]]\npath = "/a"\n[[disk]]\npath = "/b"\n'
                      'bus = "scsi"\nmedia = "cdrom"\n')
    caps = dataclasses.replace(qemu_7_2(), devices=qemu_7_2().devices - {"scsi-cd",
                                                                        "virtio-scsi-pci"})
    errs = qemu_problems(conf.guest(), load_host_config(conf.paths), facts(), caps)
    assert [e.message.split(": ", 1)[1] for e in errs] == [
        f'disk[1].bus = "scsi": QEMU 7.2.22 ({QEMU}, {caps.package}) has no device '
        "virtio-scsi-pci",
        f'disk[1].bus = "scsi": QEMU 7.2.22 ({QEMU}, {caps.package}) has no device scsi-cd']
    assert all(e.message.startswith(f"{path}: ") for e in errs)


def test_build_options_vnc_and_user_networking(conf):
    path = conf.write("guests/g.toml", '[display]\nvnc = "unix:/run/v.sock"\n'
                      '[[nic]]\nmode = "user"\n')
    caps = dataclasses.replace(qemu_7_2(), options=qemu_7_2().options - {"vnc"},
                               netdevs=frozenset({"tap"}))
    msgs = [e.message for e in qemu_problems(conf.guest(), load_host_config(conf.paths),
                                             facts(), caps)]
    assert len(msgs) == 2
    assert msgs[0].startswith(f'{path}: display.vnc = "unix:/run/v.sock": QEMU 7.2.22 ')
    assert msgs[0].endswith("has no VNC (it was built without it)")
    assert msgs[1].startswith(f'{path}: nic[0].mode = "user": QEMU 7.2.22 ')
    assert msgs[1].endswith("has no network backend user (-netdev user)")


def test_the_accelerator(conf):
    path = conf.write("guests/g.toml", 'accel = "kvm"\n')
    caps = dataclasses.replace(qemu_7_2(), accels=frozenset({"tcg"}))
    [err] = qemu_problems(conf.guest(), load_host_config(conf.paths), facts(), caps)
    assert err.message.startswith(f'{path}: accel = "kvm": QEMU 7.2.22 ')
    assert err.message.endswith("has no KVM accelerator")
    assert qemu_problems(conf.guest(), load_host_config(conf.paths), facts(Accel.TCG),
                         caps) == []


@pytest.mark.parametrize("change,lack", [
    ({"options": frozenset({"vnc", "action", "add-fd"})}, "option -sandbox"),
    ({"sandbox": frozenset({"enable", "obsolete"})},
     "-sandbox elevateprivileges, resourcecontrol, spawn"),
    ({"panic_actions": frozenset({"pause", "shutdown", "none"})},
     "-action panic=exit-failure (QEMU 7.1 added it)"),
    ({"options": frozenset({"vnc", "sandbox", "add-fd"})}, "option -action"),
    ({"devices": frozenset({"ide-hd"})}, "device pvpanic"),
])
def test_what_kvmagent_itself_needs_names_the_qemu_key(conf, change, lack):
    toml = conf.write("kvmagent.toml", f'qemu = "{QEMU}"\n')
    conf.write("guests/g.toml", '[[disk]]\npath = "/a"\nbus = "ide"\n')
    caps = dataclasses.replace(qemu_7_2(), **change)
    [err] = qemu_problems(conf.guest(), load_host_config(conf.paths), facts(), caps)
    assert err.message == f'{toml}: qemu = "{QEMU}": {caps.name} has no {lack}'
    assert "seccomp" in (err.hint or "")


def test_extra_args_are_the_admins(conf):
    conf.write("guests/g.toml", '[qemu]\nextra_args = ["-device", "no-such-device"]\n')
    assert qemu_problems(conf.guest(), load_host_config(conf.paths), facts(), qemu_7_2()) == []


def test_odd_values_are_parsed_as_qemu_would(conf):
    """A kernel command line that starts with "-", a path with commas: the
    check reads kvmagent's own argv, options and values alike."""
    conf.write("guests/g.toml", '[kernel]\nimage = "/k"\ncmdline = "-device rtl8139"\n'
               '[[disk]]\npath = "/a,b,,c"\n')
    assert qemu_problems(conf.guest(), load_host_config(conf.paths), facts(), qemu_10_0()) == []


# -------------------------------------------------- in the host checks

def test_check_host_reports_it_and_no_wait_can_help(conf):
    conf.write("kvmagent.toml", f'qemu = "{sys.executable}"\n')  # an executable, any
    path = conf.write("guests/g.toml", 'accel = "tcg"\nmachine = "pc-i440fx-2.0"\n')
    lasting: list[KvmagentError] = []
    _, problems = check_host(conf.guest(), load_host_config(conf.paths), state_dir=conf.paths.state_dir,
                             caps_probe=lambda q: qemu_10_0(), lasting=lasting)
    assert [p.message for p in lasting] == [p.message for p in problems]
    assert problems[0].message.startswith(f'{path}: machine = "pc-i440fx-2.0": QEMU 10.0.13')


def test_check_host_reports_a_failed_probe(conf):
    conf.write("kvmagent.toml", f'qemu = "{sys.executable}"\n')
    conf.write("guests/g.toml", 'accel = "tcg"\n')

    def fails(qemu: Path) -> QemuCaps:
        raise host_error(f"{qemu}: QEMU did not answer within 10 s")
    _, problems = check_host(conf.guest(), load_host_config(conf.paths), state_dir=conf.paths.state_dir, caps_probe=fails)
    assert [p.message for p in problems] == [f"{sys.executable}: QEMU did not answer within 10 s"]


def test_no_probe_without_an_executable_qemu(conf, tmp_path):
    conf.write("kvmagent.toml", f'qemu = "{tmp_path}/none"\n')
    conf.write("guests/g.toml", 'accel = "tcg"\n')

    def never(qemu: Path) -> QemuCaps:
        raise AssertionError("probed")
    _, problems = check_host(conf.guest(), load_host_config(conf.paths), state_dir=conf.paths.state_dir, caps_probe=never)
    assert [p.message.split(": ", 1)[1] for p in problems] == [
        f'qemu = "{tmp_path}/none": no such executable']


def test_a_start_fails_at_once_on_what_qemu_lacks(conf, monkeypatch):
    """kvmagent.unit.startup waits for disks and bridges, not for another QEMU."""
    from kvmagent.unit import startup
    conf.write("kvmagent.toml", "device_timeout = 60\n")
    conf.write("guests/g.toml", "")
    missing = host_error("nic[0].bridge: no such bridge")
    lacking = host_error("machine: QEMU lacks it")

    def check(guest, host, *, lasting, state_dir):  # type: ignore[no-untyped-def]
        lasting.append(lacking)
        return facts(), [missing, lacking]
    monkeypatch.setattr(startup, "check_host", check)
    sent: list[str] = []

    class Journal:
        def send(self, text: str, *args: object, **kw: object) -> None:
            sent.append(text)
    with pytest.raises(KvmagentError) as e:
        startup.wait_for_host(conf.guest(), load_host_config(conf.paths), Journal())
    assert e.value is lacking and sent == [str(missing)]


# -------------------------------------------------- the cache

@pytest.fixture
def counted(monkeypatch):  # type: ignore[no-untyped-def]
    """probe() replaced: counts its calls, answers with the 7.2 recording."""
    calls: list[Path] = []

    def probe(qemu: Path, timeout: float = 0) -> QemuCaps:
        calls.append(qemu)
        return dataclasses.replace(qemu_7_2(), binary=str(qemu))
    monkeypatch.setattr(qemucaps, "probe", probe)
    monkeypatch.setattr(qemucaps, "_MEMO", {})
    return calls


def fresh_process(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(qemucaps, "_MEMO", {})


def test_the_cache_is_keyed_by_the_binarys_stat(tmp_path, counted, monkeypatch):
    binary, cache = tmp_path / "qemu", tmp_path / "cache"
    binary.write_bytes(b"build 1")
    cache.mkdir()
    caps = qemucaps.capabilities(binary, cache)
    assert counted == [binary] and caps.devices == qemu_7_2().devices
    assert qemucaps.capabilities(binary, cache) == caps and len(counted) == 1  # memory
    fresh_process(monkeypatch)
    assert qemucaps.capabilities(binary, cache) == caps and len(counted) == 1  # the file
    assert [p.name for p in cache.iterdir()] == [qemucaps.cache_file(cache, binary).name]

    st = binary.stat()
    os.utime(binary, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # touch
    fresh_process(monkeypatch)
    qemucaps.capabilities(binary, cache)
    assert len(counted) == 2

    # an upgrade: a new file renamed over the old one, same size and times
    new = tmp_path / "qemu.new"
    new.write_bytes(b"build 2")
    st = binary.stat()
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(new, binary)
    fresh_process(monkeypatch)
    qemucaps.capabilities(binary, cache)
    assert len(counted) == 3

    copy = tmp_path / "qemu-copy"
    shutil.copy2(binary, copy)  # another path: its own entry
    fresh_process(monkeypatch)
    assert qemucaps.capabilities(copy, cache).binary == str(copy)
    qemucaps.capabilities(binary, cache)
    assert counted[3:] == [copy] and len(list(cache.iterdir())) == 2


def test_a_binary_gone_meanwhile_is_a_host_error(tmp_path, counted):
    with pytest.raises(KvmagentError) as e:
        qemucaps.capabilities(tmp_path / "qemu", tmp_path)
    assert e.value.message == f"{tmp_path}/qemu: No such file or directory"
    assert e.value.status == ExitStatus.HOST_NOT_READY and counted == []


@pytest.mark.parametrize("damage", [
    b"", b"{not json", b'{"format": 1}', b"[1, 2]", b'{"format": 999, "key": [], "caps": {}}',
    b"\xff\xfe",
])
def test_a_corrupt_cache_is_asked_again_and_rewritten(tmp_path, counted, monkeypatch, damage):
    binary = tmp_path / "qemu"
    binary.write_bytes(b"x")
    qemucaps.capabilities(binary, tmp_path)
    file = qemucaps.cache_file(tmp_path, binary)
    file.write_bytes(damage)
    fresh_process(monkeypatch)
    qemucaps.capabilities(binary, tmp_path)
    assert len(counted) == 2
    assert json.loads(file.read_text())["format"] == qemucaps.CACHE_FORMAT


def test_an_unwritable_cache_only_costs_a_probe(tmp_path, counted, monkeypatch):
    binary = tmp_path / "qemu"
    binary.write_bytes(b"x")
    caps = qemucaps.capabilities(binary, tmp_path / "missing")
    assert caps.version == (7, 2, 22)
    fresh_process(monkeypatch)
    qemucaps.capabilities(binary, tmp_path / "missing")
    assert len(counted) == 2 and not (tmp_path / "missing").exists()


def test_the_write_is_atomic(tmp_path, counted, monkeypatch):
    """A temporary file renamed over the old: a failed write leaves the old
    cache and no stray file."""
    binary = tmp_path / "qemu"
    binary.write_bytes(b"x")
    qemucaps.capabilities(binary, tmp_path)
    file = qemucaps.cache_file(tmp_path, binary)
    before = file.read_bytes()

    def refuse(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", refuse)
    qemucaps.write_cache(file, ["other"], qemu_7_2())
    assert file.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([file.name, "qemu"])


# -------------------------------------------------- the probe itself

def fake_qemu(tmp_path: Path, body: str) -> Path:
    """An executable that stands in for QEMU (Python, not a shell script)."""
    path = tmp_path / "fake-qemu"
    path.write_text(f"#!{sys.executable}\nimport sys, time, os\n{body}\n")
    path.chmod(0o755)
    return path


def test_the_probe_reads_qmp_on_stdio_in_a_fixed_locale(tmp_path):
    qemu = fake_qemu(tmp_path, f"""
assert sys.argv[1:] == {qemucaps.probe_argv(Path('x'))[1:]!r}, sys.argv
assert os.environ["LC_ALL"] == "C" and os.environ["LANG"] == "C"
n = 0
while n < {len(qemucaps.PROBE_COMMANDS)}:  # every command, before any answer
    line = sys.stdin.readline()
    assert line, n
    n += bool(line.strip())
sys.stdout.write(open({str(DATA / 'qemu-7.2.qmp')!r}).read())
sys.stdout.flush()
assert sys.stdin.read() == ""  # like QEMU, it ends at the end of its input: no more commands
""")
    caps = qemucaps.probe(qemu)
    assert caps.binary == str(qemu) and caps.devices == qemu_7_2().devices


@pytest.mark.parametrize("body,expected", [
    ("sys.stderr.write('qemu: -accel tcg,split-wx=on: invalid accelerator\\n'); sys.exit(1)",
     "QEMU did not say what it supports (exit status 1): qemu: -accel tcg,split-wx=on: "
     "invalid accelerator"),
    ("print('{\"QMP\": {}}')", "QEMU did not say what it supports (0 QMP replies for 9 commands)"),
    ("print('{\"error\": {\"desc\": \"no\"}}')",
     "QEMU did not say what it supports (QMP error: no)"),
    ("time.sleep(30)", "QEMU did not answer within 0.5 s"),
])
def test_a_failed_probe_is_a_host_error(tmp_path, body, expected):
    qemu = fake_qemu(tmp_path, body)
    with pytest.raises(KvmagentError) as e:
        qemucaps.probe(qemu, timeout=0.5)
    assert e.value.status == ExitStatus.HOST_NOT_READY
    assert e.value.message == f"{qemu}: {expected}"


def test_a_probe_that_cannot_run(tmp_path):
    (tmp_path / "qemu").write_text("not a program")
    (tmp_path / "qemu").chmod(0o755)
    with pytest.raises(KvmagentError) as e:
        qemucaps.probe(tmp_path / "qemu")
    assert e.value.message == f"{tmp_path}/qemu: cannot run QEMU: Exec format error"
