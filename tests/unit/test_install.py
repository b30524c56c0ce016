"""`kvmagent install NAME --iso FILE`: the guest's own configuration plus
the install overlay (kvmagent.config.install), the command line QEMU gets
for it, the settings of its kvm-oneoff@NAME.service, and the command's
answers to bad input (nothing is started: each fails before systemd is
asked).  The run itself, on a real systemd host: tests/system/test_install_iso.py."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmagent.config.guests import load_guest, load_host_config
from kvmagent.config.install import check_vnc, install_guest
from kvmagent.config.model import Accel, Bus, Media, OnPoweroff
from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.render.qemu import HostFacts, Sockets, qemu_argv
from kvmagent.names import oneoff_unit
from kvmagent.render.service import render_service, service_settings
from kvmagent.render.unitprops import MS_REC, props_for_dbus
from kvmagent.unit import startup

from tests import seed

REPO = Path(__file__).resolve().parents[2]
SEED = seed.copy(Path("/var/lib/kvmagent"), Path("/run/kvmagent"))
ISO = Path("/srv/iso/debian-12.iso")


def install_argv(name: str, iso: Path = ISO, vnc: str | None = None) -> list[str]:
    host = load_host_config(SEED)
    guest, _ = install_guest(load_guest(SEED, name, host), iso, vnc)
    return qemu_argv(guest, host, seed.KVM, Sockets.in_dir(SEED.guest_runtime(name)))


def test_arkani_boots_the_iso_instead_of_its_kernel() -> None:
    """The seed's arkani boots /boot/kvm/arkani/vmlinuz directly: its install
    run has no -kernel, -initrd or -append, the ISO as an IDE CD-ROM with
    bootindex 1, its disk second; everything else as its own command line
    (tests/data/golden/arkani.argv), and its reboot ends the run (the
    installer's last reboot does not boot the CD again)."""
    own = (seed.GOLDEN / "arkani.argv").read_text().splitlines()
    k = own.index("-kernel")
    expected = own[:k] + own[k + 6:]
    d = expected.index("ide-hd,drive=disk0,id=disk0-dev")
    expected[d] += ",bootindex=2"
    expected[d + 1:d + 1] = [
        "-drive", "file=/srv/iso/debian-12.iso,format=raw,if=none,id=disk1,cache=none,"
        "aio=native,readonly=on",
        "-device", "ide-cd,drive=disk1,id=disk1-dev,bootindex=1"]
    p = expected.index("panic=exit-failure")
    expected[p + 1:p + 1] = ["-action", "reboot=shutdown"]
    assert install_argv("arkani") == expected


def test_notes_say_what_the_run_does_differently() -> None:
    host = load_host_config(SEED)
    arkani = load_guest(SEED, "arkani", host)
    guest, notes = install_guest(arkani, ISO)
    assert guest.kernel is None and arkani.kernel is not None  # the loaded guest is untouched
    assert notes == [f"guest arkani boots a kernel directly ([kernel] in {arkani.config_file}); "
                     "the install run boots from the CD-ROM instead (no -kernel). Once the "
                     "installed system has a boot loader of its own, remove [kernel] to boot "
                     "it from its disk"]
    fukano, notes = install_guest(load_guest(SEED, "fukano", host), ISO)
    assert fukano.on_poweroff is OnPoweroff.STOP
    assert notes == ['on_poweroff = "keep" does not apply: the install run ends when the guest '
                     "powers off"]


def test_fukano_boots_the_new_iso_before_its_own_cdrom() -> None:
    """fukano has a CD-ROM of its own (and boot = ["cdrom", "disk"]): it
    stays, without a bootindex; the install ISO is the one to boot; the
    guest's VNC display is kept; no -no-shutdown (the run ends at poweroff)."""
    argv = install_argv("fukano")
    assert "ide-cd,drive=disk2,id=disk2-dev,bootindex=1" in argv
    assert "ide-hd,drive=disk0,id=disk0-dev,bootindex=2" in argv
    assert "ide-cd,drive=disk1,id=disk1-dev" in argv  # its own CD-ROM, not booted
    assert "-no-shutdown" not in argv
    assert argv[argv.index("-vnc") + 1] == "127.0.0.1:1"
    assert sum(a.startswith("file=") for a in argv) == 3


def test_an_iso_the_guest_has_as_its_cdrom_is_not_attached_twice() -> None:
    argv = install_argv("fukano", Path("/export/slow/win.iso"))
    assert sum(a.startswith("file=") for a in argv) == 2
    assert "ide-cd,drive=disk1,id=disk1-dev,bootindex=1" in argv


def test_an_iso_that_is_one_of_the_guests_disks_is_refused() -> None:
    host = load_host_config(SEED)
    with pytest.raises(KvmagentError) as e:
        install_guest(load_guest(SEED, "arkani", host), Path("/dev/internal/kvm_guest"))
    assert e.value.status == ExitStatus.USAGE
    assert "/dev/internal/kvm_guest is disk[0] of guest arkani, not a CD-ROM" in e.value.message


def test_vnc_option_gives_the_run_a_display() -> None:
    argv = install_argv("arkani", vnc="unix:/run/kvmagent-vnc/arkani.sock")
    i = argv.index("-vnc")
    assert argv[i:i + 8] == ["-vnc", "unix:/run/kvmagent-vnc/arkani.sock", "-device", "VGA",
                             "-device", "qemu-xhci", "-device", "usb-tablet"]
    assert "-display" not in argv


@pytest.mark.parametrize("value", ["0.0.0.0:1,password=on", "localhost", "unix:relative",
                                   ":99999", "unix:/a=b"])
def test_bad_vnc_is_a_usage_error(value: str) -> None:
    with pytest.raises(KvmagentError) as e:
        check_vnc(value)
    assert e.value.status == ExitStatus.USAGE and e.value.message.startswith(f"--vnc {value!r}: ")


def test_ide_slots_taken_the_iso_goes_on_scsi(conf) -> None:  # type: ignore[no-untyped-def]
    conf.write("guests/full.toml", "".join(f'[[disk]]\npath = "/srv/d{i}.img"\nbus = "ide"\n'
                                           for i in range(4)))
    guest, notes = install_guest(conf.guest("full"), ISO)
    cd = guest.disks[-1]
    assert (cd.index, cd.bus, cd.media, cd.readonly, cd.boot) == (4, Bus.SCSI, Media.CDROM,
                                                                   True, True)
    assert "IDE slots are all taken" in notes[0]
    argv = qemu_argv(guest, load_host_config(conf.paths), HostFacts(Accel.TCG),
                     Sockets.in_dir(conf.paths.guest_runtime("full")))
    assert "scsi-cd,bus=scsi0.0,drive=disk4,id=disk4-dev,bootindex=1" in argv


def test_the_install_units_settings() -> None:
    settings = service_settings("g", ["/usr/bin/kvmagent"], iso="/var/tmp/in st.iso",
                                vnc="127.0.0.1:3", writable=["/srv/g.img"], inet=True)
    s = dict(settings)
    assert oneoff_unit("g") == "kvm-oneoff@g.service"
    assert s["Description"] == "KVM guest g (install from /var/tmp/in st.iso)"
    assert s["ExecStart"] == [":/usr/bin/kvmagent", "run", "--install", "/var/tmp/in st.iso",
                              "--vnc", "127.0.0.1:3", "g"]
    # the ISO visible wherever it is (PrivateTmp= hides /tmp and /var/tmp)
    assert s["BindReadOnlyPaths"] == [("/var/tmp/in st.iso", "/var/tmp/in st.iso")]
    assert s["ReadWritePaths"] == ["-/srv/g.img"] and s["ProtectHome"] == "read-only"
    assert (s["CollectMode"], s["Conflicts"]) == ("inactive-or-failed", ["kvm@g.service"])
    assert "AF_INET" in s["RestrictAddressFamilies"]
    assert props_for_dbus(settings)[b"BindReadOnlyPaths"] == [
        (b"/var/tmp/in st.iso", b"/var/tmp/in st.iso", False, MS_REC)]
    assert 'BindReadOnlyPaths="/var/tmp/in st.iso"' in render_service(settings)
    assert "--vnc" not in dict(service_settings("g", iso="/x.iso"))["ExecStart"]


def test_the_planner_makes_the_install_runs_plan(conf, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    conf.write("kvmagent.toml", 'qemu_user = "root"\n')
    conf.write("guests/g.toml", """\
        [kernel]
        image = "/boot/vmlinuz"
        [[disk]]
        path = "/srv/g.img"
        """)
    monkeypatch.setattr(startup, "check_host",
                        lambda guest, host, *, lasting, state_dir: (HostFacts(Accel.TCG), []))
    sent: list[str] = []
    about: set[bytes] = set()
    monkeypatch.setattr(startup.Journal, "send",
                        lambda self, text, *a, **kw: (sent.append(text), about.add(self.about)))
    plan, _ = startup.prepare("g", conf.paths, None, "/srv/in.iso", "127.0.0.1:2")
    assert "-kernel" not in plan.argv and plan.argv[plan.argv.index("-vnc") + 1] == "127.0.0.1:2"
    assert [(d.path, d.readonly, len(d.tokens)) for d in plan.disks] == [
        ("/srv/g.img", False, 2), ("/srv/in.iso", True, 1)]
    assert dict(plan.scope)["PartOf"] == ["kvm-oneoff@g.service"]
    assert sent[0] == "guest g: install run from /srv/in.iso" and "no -kernel" in sent[1]
    # the planner is gone when journald reads it: its notes name the unit themselves
    assert about == {b"OBJECT_SYSTEMD_UNIT=kvm-oneoff@g.service\n"}
    with pytest.raises(KvmagentError) as e:
        startup.prepare("g", conf.paths, None, "/srv/in.iso", "bad")
    assert e.value.status == ExitStatus.USAGE


def kvmagent(conf, *args: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO),
           "KVMAGENT_CONFIG_DIR": str(conf.paths.config_dir),
           "KVMAGENT_STATE_DIR": str(conf.paths.state_dir),
           "KVMAGENT_RUNTIME_DIR": str(conf.paths.runtime_dir)}
    return subprocess.run([sys.executable, "-m", "kvmagent", *args], env=env, text=True,
                          capture_output=True)


def test_bad_input_starts_nothing(conf, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Each answer comes before systemd is asked: the runs below would fail
    otherwise (no unit can be started from a unit test), and a test host
    checks the same with systemd (tests/system/test_install_iso.py)."""
    conf.write("guests/g.toml", '[[disk]]\npath = "/srv/g.img"\n')
    iso = tmp_path / "in.iso"
    iso.write_bytes(b"\0" * 2048)
    cases = [
        (["nope", "--iso", str(iso)], ExitStatus.UNKNOWN_GUEST, "unknown guest"),
        (["g", "--iso", str(tmp_path / "missing.iso")], ExitStatus.HOST_NOT_READY,
         f"--iso {tmp_path}/missing.iso: no such file"),
        (["g", "--iso", str(tmp_path)], ExitStatus.HOST_NOT_READY,
         f"--iso {tmp_path}: not a file (an ISO image or a CD-ROM device)"),
        (["g", "--iso", str(iso), "--console", "--vnc", "127.0.0.1:1"], ExitStatus.USAGE,
         "argument --vnc: not allowed with argument --console"),
        (["g", "--iso", str(iso), "--vnc", "0.0.0.0:1,password=on"], ExitStatus.USAGE,
         "--vnc '0.0.0.0:1,password=on': expected"),
        (["g", "--iso", str(iso), "--console", "--no-block"], ExitStatus.USAGE,
         "--console waits for the guest to run"),
        (["g"], ExitStatus.USAGE, "the following arguments are required: --iso"),
        (["g", "--iso", str(iso), "--vnc", "unix:/run/g-vnc.sock"], ExitStatus.USAGE,
         "--vnc unix:/run/g-vnc.sock: QEMU runs as kvmagent-qemu, which cannot create"),
    ]
    for args, status, text in cases:
        r = kvmagent(conf, "install", *args)
        assert (r.returncode, r.stdout) == (status, ""), (args, r.stderr)
        assert text in r.stderr, (args, r.stderr)
    conf.write("guests/g.toml", 'cpus = "two"\n')
    r = kvmagent(conf, "install", "g", "--iso", str(iso))
    assert r.returncode == ExitStatus.CONFIG and 'cpus = "two"' in r.stderr
    if os.geteuid() != 0:  # root reads it whatever its mode
        conf.write("guests/g.toml", '[[disk]]\npath = "/srv/g.img"\n')
        iso.chmod(0)
        r = kvmagent(conf, "install", "g", "--iso", str(iso))
        assert r.returncode == ExitStatus.HOST_NOT_READY and "cannot read it" in r.stderr


def test_unix_vnc_only_where_qemu_can_make_the_socket(tmp_path: Path) -> None:
    from kvmagent.cli.install import check_unix_vnc
    check_unix_vnc(f"unix:{tmp_path}/vnc.sock", "root", tmp_path)
    for vnc, user in ((f"unix:{tmp_path}/vnc.sock", "kvmagent-qemu"), ("unix:/srv/v.sock", "root")):
        with pytest.raises(KvmagentError) as e:
            check_unix_vnc(vnc, user, tmp_path)
        assert e.value.status == ExitStatus.USAGE and e.value.message.startswith(f"--vnc {vnc}: ")


def test_the_guest_keeps_its_own_configuration(conf) -> None:  # type: ignore[no-untyped-def]
    conf.write("guests/g.toml", '[[disk]]\npath = "/srv/g.img"\n')
    before = conf.guest("g")
    after, _ = install_guest(before, ISO)
    assert dataclasses.replace(after, disks=after.disks[:1], boot=before.boot,
                               boot_explicit=before.boot_explicit,
                               on_reboot=before.on_reboot) == before
