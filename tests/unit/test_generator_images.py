"""Image files outside /var/lib/kvmagent (#19 point 6): kvmagent-generator
gives kvm@NAME.service ReadWritePaths=-FILE for exactly that guest's
writable image files (ProtectSystem=strict leaves the rest read-only, and
reading alone needs nothing); a disk, kernel or initrd in a directory that
ProtectHome=yes hides is a configuration error naming the key, for a
defined guest only (a one-off guest's service sees /home read-only)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from kvmagent.cli.generator import DROPIN, generate
from kvmagent.cli.main import main
from kvmagent.config.guests import load_guest_file, load_host_config
from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.render.service import (IMAGES_DROPIN, images_dropin, service_settings,
                                     writable_images)

DISKS = """
[[disk]]
path = "/srv/kvm/a.img"
[[disk]]
path = "/dev/vg0/root"
[[disk]]
path = "/var/lib/kvmagent/images/b.img"
[[disk]]
path = "/export/base.img"
readonly = true
[[disk]]
path = "/srv/iso/x.iso"
bus = "scsi"
media = "cdrom"
[[disk]]
path = "/var/lib/kvmagent/../../srv/kvm/c.qcow2"
format = "qcow2"
"""


def test_only_writable_image_files_outside_the_state_directory(conf) -> None:
    conf.write("guests/g.toml", DISKS)
    assert writable_images(conf.guest()) == ["/srv/kvm/a.img",
                                             "/var/lib/kvmagent/../../srv/kvm/c.qcow2"]


def test_the_dropin() -> None:
    assert images_dropin(["/srv/kvm/a.img", "/export/vm/b.qcow2"]) == (
        "# kvmagent-generator: this guest's writable image files outside /var/lib/kvmagent\n"
        "[Service]\nReadWritePaths=-/srv/kvm/a.img -/export/vm/b.qcow2\n")


@pytest.mark.parametrize("path, word", [
    ("/srv/my disk.img", '"-/srv/my disk.img"'),
    ("/srv/100%.img", "-/srv/100%%.img"),  # no systemd specifier
    ('/srv/a"b.img', '"-/srv/a\\"b.img"'),
    ("/srv/a\\b.img", '"-/srv/a\\\\b.img"'),
    ("/srv/it's.img", "\"-/srv/it's.img\""),
])
def test_a_path_stays_one_word(path: str, word: str) -> None:
    assert images_dropin([path]).splitlines()[-1] == f"ReadWritePaths={word}"


def test_the_generator_writes_it_for_exactly_those_guests(conf, tmp_path: Path) -> None:
    conf.write("guests/imported.toml", DISKS)
    conf.write("guests/lvm.toml", '[[disk]]\npath = "/dev/internal/kvm_guest"\n')
    conf.write("guests/state.toml", '[[disk]]\npath = "/var/lib/kvmagent/images/s.img"\n')
    conf.write("guests/both.toml", '[[nic]]\nmode = "user"\n[[disk]]\npath = "/srv/u.img"\n')
    conf.write("guests/readonly.toml", '[[disk]]\npath = "/srv/r.img"\nreadonly = true\n')
    conf.write("guests/home.toml", '[[disk]]\npath = "/home/u/h.img"\n')  # does not load
    out = tmp_path / "generator"
    assert generate(conf.paths, out) == ["both", "imported"]
    assert sorted(p.name for p in out.iterdir()) == ["kvm@both.service.d",
                                                     "kvm@imported.service.d"]
    imported = out / "kvm@imported.service.d"
    assert [p.name for p in imported.iterdir()] == [IMAGES_DROPIN]
    assert (imported / IMAGES_DROPIN).read_text().splitlines()[-1] == (
        "ReadWritePaths=-/srv/kvm/a.img -/var/lib/kvmagent/../../srv/kvm/c.qcow2")
    both = out / "kvm@both.service.d"
    assert sorted(p.name for p in both.iterdir()) == sorted([DROPIN, IMAGES_DROPIN])
    assert "ReadWritePaths=-/srv/u.img\n" in (both / IMAGES_DROPIN).read_text()


def test_a_oneoff_guest_gets_the_same_paths(tmp_path: Path) -> None:
    file = tmp_path / "one.toml"
    file.write_text(DISKS)
    guest = load_guest_file(file, load_host_config_nowhere(tmp_path))
    settings = dict(service_settings("one", guest_file=str(file),
                                     writable=writable_images(guest)))
    assert settings["ReadWritePaths"] == ["-/srv/kvm/a.img",
                                          "-/var/lib/kvmagent/../../srv/kvm/c.qcow2"]
    assert "ReadWritePaths" not in dict(service_settings("one"))


def load_host_config_nowhere(tmp_path: Path):  # type: ignore[no-untyped-def]
    from kvmagent.paths import Paths
    return load_host_config(Paths(tmp_path / "etc", tmp_path / "state", tmp_path / "run"))


# -- what ProtectHome=yes hides -----------------------------------------------------------


@pytest.mark.parametrize("toml, key, value, top", [
    ('[[disk]]\npath = "/home/anna/vm.img"\n', "disk[0].path", "/home/anna/vm.img", "/home"),
    ('[[disk]]\npath = "/srv/a"\n[[disk]]\npath = "/root/vm.qcow2"\nreadonly = true\n',
     "disk[1].path", "/root/vm.qcow2", "/root"),
    ('[[disk]]\npath = "/run/user/0/x.img"\n', "disk[0].path", "/run/user/0/x.img",
     "/run/user"),
    ('[[disk]]\npath = "/srv/../home/x.img"\n', "disk[0].path", "/srv/../home/x.img", "/home"),
    ('[kernel]\nimage = "/home/anna/vmlinuz"\n', "kernel.image", "/home/anna/vmlinuz", "/home"),
    ('[kernel]\nimage = "/boot/vmlinuz"\ninitrd = "/root/initrd.img"\n', "kernel.initrd",
     "/root/initrd.img", "/root"),
])
def test_a_file_in_a_hidden_directory_is_an_error(conf, toml: str, key: str, value: str,
                                                   top: str) -> None:
    path = conf.write("guests/g.toml", toml)
    with pytest.raises(KvmagentError) as exc:
        conf.guest()
    assert exc.value.status == ExitStatus.CONFIG
    assert exc.value.message == (f'{path}: {key} = "{value}": lies in {top}, which '
                                 "kvm@.service hides from every guest (ProtectHome=yes)")
    assert "kvmagent start --transient FILE" in (exc.value.hint or "")


def test_hidden_means_the_directory_itself(conf, tmp_path: Path) -> None:
    conf.write("guests/g.toml", '[[disk]]\npath = "/homes/x.img"\n[[disk]]\npath = "/rooted"\n')
    assert len(conf.guest().disks) == 2
    one = tmp_path / "one.toml"  # a one-off guest: its service sees /home (read-only)
    one.write_text('[[disk]]\npath = "/home/anna/vm.img"\n')
    assert load_guest_file(one, load_host_config_nowhere(tmp_path)).disks[0].path == Path(
        "/home/anna/vm.img")


def test_import_of_a_guest_in_home_writes_nothing(conf, tmp_path: Path) -> None:
    script = tmp_path / "kvm.bash"
    script.write_text("kvm -name anna -m 512 -hda /home/anna/vm.img -net none\n")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["--config-dir", str(conf.paths.config_dir), "import", "kvm-script",
                       str(script), "--write"])
    assert status == ExitStatus.CONFIG and out.getvalue() == ""
    assert err.getvalue().startswith(
        f'kvmagent: {script}: imported as guest anna, its disk[0].path = "/home/anna/vm.img": '
        "lies in /home, which kvm@.service hides from every guest (ProtectHome=yes); "
        "nothing written\n"), err.getvalue()
    assert list(conf.paths.guests_dir.iterdir()) == []
