"""`kvmagent import --write` checks the imported guest against the guests
already defined, as `kvmagent validate` checks guests against each other
(MACs, taps, writable disks): a clash is an error naming the imported file,
the key, the value and the other guest, exit status 6, and nothing is
written.  Without --write the TOML is printed for editing and the clash
said on stderr.  The guest of the same name is left out: --write refuses
to replace it, --write --force replaces it."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from kvmagent import names
from kvmagent.cli.main import main
from kvmagent.errors import ExitStatus

SCRIPT = """NAME=arkani
kvm -m 1024 -name ${NAME} \\
-drive if=virtio,file=/srv/kvm/arkani.img \\
-net nic,macaddr=00:1A:4A:00:8E:30,model=virtio -net tap,script=no
"""


def run_cli(conf, *argv: str) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["--config-dir", str(conf.paths.config_dir), *argv])
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "kvm-server.bash"
    path.write_text(SCRIPT)
    return path


def _import(conf, script: Path, *extra: str) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    return run_cli(conf, "import", "kvm-script", str(script), "--bridge", "br-kvm", *extra)


def _guests(conf) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {p.name: p.read_text() for p in conf.paths.guests_dir.iterdir()}


OTHER_MAC = """
[[nic]]
bridge = "br-kvm"
mac = "00:1a:4a:00:8e:30"
"""
OTHER_DISK = """
[[disk]]
path = "/srv/kvm/arkani.img"
"""


@pytest.mark.parametrize("other, text, hint", [
    (OTHER_MAC, 'its nic[0].mac = "00:1a:4a:00:8e:30" is also a MAC of guest old ({f})',
     "else give this one another MAC"),
    (OTHER_DISK, 'its disk[0].path = "/srv/kvm/arkani.img" is also disk[0] of guest old',
     "one writable disk can belong to one guest only"),
], ids=["mac", "disk"])
def test_a_clash_with_a_defined_guest_is_refused(conf, script: Path, other: str, text: str,
                                                 hint: str) -> None:
    old = conf.write("guests/old.toml", other)
    before = _guests(conf)
    status, out, err = _import(conf, script, "--write")
    assert status == ExitStatus.CONFIG and out == ""
    assert err.startswith(f"kvmagent: {script}: imported as guest arkani, "
                          f"{text.format(f=old)}; nothing written\n  hint: "), err
    assert hint in err
    assert _guests(conf) == before
    # without --write: the TOML to edit, and the clash on stderr
    status, out, err = _import(conf, script)
    assert status == 0 and out.startswith("# Guest arkani, imported from")
    assert err.startswith(f"kvmagent: {script}: imported as guest arkani, "
                          f"{text.format(f=old)}\n  hint: "), err
    assert _guests(conf) == before


def test_a_tap_clash_says_to_import_under_another_name(conf, script: Path) -> None:
    # A long name's tap is cut and hashed (kvm-PREFIX-HASH-0); the short
    # name PREFIX-HASH gets that very tap name.
    long = "a" * 20
    tap = names.tap_name(long, 0)
    short = tap.removeprefix(names.TAP_PREFIX).removesuffix("-0")
    assert names.tap_name(short, 0) == tap and names.valid_guest_name(short)
    old = conf.write(f"guests/{long}.toml", '[[nic]]\nbridge = "br-kvm"\n')
    status, out, err = _import(conf, script, "--name", short, "--write")
    assert status == ExitStatus.CONFIG and out == ""
    assert err.startswith(f"kvmagent: {script}: imported as guest {short}, its tap name {tap} "
                          f"of nic[0] is also used by guest {long}; nothing written\n"), err
    assert "hint: import it under another name (--name NAME)" in err
    assert _guests(conf) == {old.name: old.read_text()}


def test_the_guest_of_the_same_name_is_no_clash(conf, script: Path) -> None:
    conf.write("guests/arkani.toml", OTHER_MAC + OTHER_DISK)
    status, out, err = _import(conf, script)
    assert status == 0 and 'mac = "00:1a:4a:00:8e:30"' in out
    status, out, err = _import(conf, script, "--write", "--force")
    assert status == 0 and conf.guest("arkani").disks[0].path == Path("/srv/kvm/arkani.img")


def test_a_readonly_disk_may_be_shared(conf, script: Path) -> None:
    conf.write("guests/old.toml", '[[disk]]\npath = "/srv/iso/x.iso"\nreadonly = true\n')
    script.write_text("kvm -name arkani -cdrom /srv/iso/x.iso -net none\n")
    status, out, err = _import(conf, script, "--write")
    assert status == 0, err
    assert sorted(_guests(conf)) == ["arkani.toml", "old.toml"]


def test_a_defined_guest_that_does_not_load_is_left_out(conf, script: Path) -> None:
    conf.write("guests/broken.toml", "memory = \n")
    status, out, err = _import(conf, script, "--write")
    assert status == 0, err
