"""kvmagent migrate --copy-config: the guest's files as they cross ssh, staged
and installed on the other host (kvmagent.cli.configcopy)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kvmagent.cli.configcopy import GuestFile, GuestFiles, install, staged
from kvmagent.config.guests import load_host_config
from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.render.show import effective_config
from tests.unit.conftest import ConfDir

GUEST = """\
# the mail server
memory = "512M"
[[disk]]
path = "/srv/mail.img"
"""


def sent(name: str = "g", **files: str) -> GuestFiles:
    return GuestFiles(name, tuple(GuestFile(p, 0o644, t) for p, t in files.items()))


def test_read_sends_the_files_as_they_are(conf: ConfDir) -> None:
    conf.write("guests/g.toml", GUEST)
    conf.write("guests/g.toml.d/50-cpus.toml", "cpus = 2\n")
    conf.write("guests/g.toml.d/.50-cpus.toml.swp", "editor junk")
    conf.write("guests/g.toml.d/README", "not a drop-in")
    os.chmod(conf.paths.guest_config("g"), 0o640)
    files = GuestFiles.read(conf.paths, "g")
    assert files == GuestFiles("g", (GuestFile("g.toml", 0o640, GUEST),
                                     GuestFile("g.toml.d/50-cpus.toml", 0o644, "cpus = 2\n")))
    assert GuestFiles.from_json(files.to_json(), "g") == files  # comments and all


@pytest.mark.parametrize("path", ["../g.toml", "/etc/passwd", "g.toml.d/../../x.toml",
                                  "g.toml.d/.hidden.toml", "g.toml.d/x.conf", "h.toml",
                                  "g.toml.d/sub/x.toml"])
def test_nothing_outside_the_guests_own_files(path: str) -> None:
    data = {"name": "g", "files": [{"path": "g.toml", "mode": 0o644, "text": ""},
                                   {"path": path, "mode": 0o644, "text": ""}]}
    with pytest.raises(ValueError, match="is not g.toml or a drop-in of it"):
        GuestFiles.from_json(json.dumps(data), "g")


@pytest.mark.parametrize("data, why", [
    ({"name": "h", "files": [{"path": "h.toml", "mode": 420, "text": ""}]}, "not guest g's"),
    ({"name": "g", "files": []}, "no files"),
    ({"name": "g", "files": [{"path": "g.toml", "mode": "644", "text": ""}]},
     r"files\[0\]\.mode: '644' is not int"),
    ({"name": "g", "files": [{"path": "g.toml", "mode": 0o104755, "text": ""}]}, "mode"),
    ({"name": "g", "files": [{"path": "g.toml.d/a.toml", "mode": 420, "text": ""}]}, "is not"),
])
def test_what_is_not_a_guests_files(data: dict, why: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=why):
        GuestFiles.from_json(json.dumps(data), "g")


def test_staged_loads_with_this_hosts_defaults_and_names_the_file(conf: ConfDir) -> None:
    conf.write("kvmagent.toml", 'machine = "q35"\n')
    host = load_host_config(conf.paths)
    guest = staged(sent(**{"g.toml": GUEST}), host)
    assert effective_config(guest)["machine"] == "q35" and guest.name == "g"
    with pytest.raises(KvmagentError) as e:
        staged(sent(**{"g.toml": GUEST, "g.toml.d/50-x.toml": "memory = 12\n"}), host)
    assert e.value.status == ExitStatus.CONFIG
    assert "guests/g.toml.d/50-x.toml" in e.value.message, e.value.message
    assert "(in the copy sent)" in e.value.message and "kvmagent-config-" not in e.value.message


def test_install_keeps_this_hosts_own_files_beside(conf: ConfDir) -> None:
    conf.write("guests/g.toml", "memory = \"256M\"\n")
    conf.write("guests/g.toml.d/10-same.toml", "cpus = 2\n")
    conf.write("guests/g.toml.d/20-gone.toml", "cpus = 4\n")
    conf.write("guests/other.toml", "")
    files = sent(**{"g.toml": GUEST, "g.toml.d/10-same.toml": "cpus = 2\n",
                    "g.toml.d/30-new.toml": "description = \"new\"\n"})
    kept = install(conf.paths, files)
    assert sorted(kept) == ["g.toml.d/20-gone.toml.old", "g.toml.old"]
    guests = conf.paths.guests_dir
    assert (guests / "g.toml").read_text() == GUEST
    assert (guests / "g.toml.old").read_text() == "memory = \"256M\"\n"
    assert (guests / "g.toml.d/20-gone.toml.old").read_text() == "cpus = 4\n"
    assert sorted(p.name for p in (guests / "g.toml.d").iterdir()) == [
        "10-same.toml", "20-gone.toml.old", "30-new.toml"]
    assert sorted(p.name for p in guests.iterdir()) == ["g.toml", "g.toml.d", "g.toml.old",
                                                        "other.toml"]  # no temporary left
    assert conf.guest("g").memory == 512 << 20
    assert install(conf.paths, files) == []  # the same again: nothing kept, nothing written


def test_install_where_nothing_was(conf: ConfDir) -> None:
    files = GuestFiles("g", (GuestFile("g.toml", 0o600, GUEST),
                             GuestFile("g.toml.d/50-cpus.toml", 0o644, "cpus = 2\n")))
    assert install(conf.paths, files) == []
    main = conf.paths.guest_config("g")
    assert main.read_text() == GUEST and main.stat().st_mode & 0o777 == 0o600
    assert conf.guest("g").cpus == 2


def test_install_a_symlink_of_config_management_is_kept(conf: ConfDir, tmp_path: Path) -> None:
    managed = tmp_path / "managed.toml"
    managed.write_text("memory = \"256M\"\n")
    conf.paths.guest_config("g").symlink_to(managed)
    assert install(conf.paths, sent(**{"g.toml": GUEST})) == ["g.toml.old"]
    old = conf.paths.guests_dir / "g.toml.old"
    assert old.is_symlink() and os.readlink(old) == str(managed)
    assert not conf.paths.guest_config("g").is_symlink()
    assert managed.read_text() == "memory = \"256M\"\n"  # not written through the link


def test_staged_names_a_hidden_path_by_the_file_in_guests(conf: ConfDir) -> None:
    host = load_host_config(conf.paths)
    with pytest.raises(KvmagentError) as e:
        staged(sent(**{"g.toml": '[[disk]]\npath = "/root/g.img"\n'}), host)
    assert e.value.message.startswith("guests/g.toml: disk[0].path"), e.value.message
    assert "kvmagent-config-" not in e.value.message
