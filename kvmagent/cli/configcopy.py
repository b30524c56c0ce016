"""`kvmagent migrate --copy-config`: the guest's file and its drop-ins
copied to HOST, before anything moves.

The source sends guests/NAME.toml and NAME.toml.d/*.toml as they are
(GuestFiles, JSON over ssh), never a rewritten file: the admin's comments
and layout go with them.  HOST first says what it would make of the guest
with them (`migrate-incoming NAME --facts --config-in`: loaded from a
staging directory with HOST's own defaults, nothing installed), so that
every other check of the move runs before anything changes there; only
when nothing refuses are they installed (`migrate-incoming NAME
--put-config`).  Where HOST's own file differs, it is kept beside as
NAME.toml.old (a drop-in as X.toml.old), and systemd's generator runs again
(daemon-reload) for what the new file may need of kvm@NAME.service."""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from kvmagent import names
from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.paths import Paths
from kvmagent.render import records

if TYPE_CHECKING:
    from kvmagent.config.model import Guest, HostConfig

MODE_BITS = 0o7777


class GuestFile(NamedTuple):
    """One file: its path relative to guests/ (NAME.toml or
    NAME.toml.d/X.toml), its permission bits, its text."""
    path: str
    mode: int
    text: str


class Installed(NamedTuple):
    """What `migrate-incoming NAME --put-config` answers (JSON over ssh):
    HOST's own files that it kept beside, X.old (relative to guests/)."""
    kept: list[str]

    def to_json(self) -> str:
        return json.dumps(self._asdict())

    @classmethod
    def from_json(cls, text: str | bytes) -> Installed:
        """ValueError naming the field when TEXT is not such a record."""
        return records.read(cls, json.loads(text))


class GuestFiles(NamedTuple):
    """Guest NAME's file and drop-ins, as they cross ssh."""
    name: str
    files: tuple[GuestFile, ...]

    @classmethod
    def read(cls, paths: Paths, name: str) -> GuestFiles:
        """guests/NAME.toml and its drop-ins, here (symlinks followed)."""
        from kvmagent.config.layers import dropin_files, read_config_bytes
        main = paths.guest_config(name)
        out = []
        for path in [main, *dropin_files(main)]:
            data = read_config_bytes(path)  # a regular file, or exit 6 naming it
            try:
                text = data.decode()
            except UnicodeDecodeError:
                raise KvmagentError(f"{path}: not UTF-8", "a TOML file is UTF-8",
                                    ExitStatus.CONFIG) from None
            rel = path.name if path == main else f"{main.name}.d/{path.name}"
            out.append(GuestFile(rel, stat.S_IMODE(path.stat().st_mode), text))
        return cls(name, tuple(out))

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "files": [f._asdict() for f in self.files]})

    @classmethod
    def from_json(cls, text: str, name: str) -> GuestFiles:
        """What the source sent for guest NAME, every path checked: the
        guest's own file and drop-ins, nothing outside guests/."""
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"not JSON: {e}") from None
        sent = records.read(cls, data)
        if sent.name != name:
            raise ValueError(f"not guest {name}'s files")
        if not names.valid_guest_name(name):
            raise ValueError(f"invalid guest name {name!r}")
        if not sent.files:
            raise ValueError("no files")
        main, dropins = f"{name}.toml", f"{name}.toml.d/"
        for i, (path, mode, body) in enumerate(sent.files):
            leaf = path[len(dropins):] if path.startswith(dropins) else None
            if (i == 0) != (path == main) or (i > 0 and not _dropin_name(leaf)):
                raise ValueError(f"files[{i}]: {path!r} is not {main} or a drop-in of it")
            if mode & ~MODE_BITS or "\0" in body:
                raise ValueError(f"files[{i}]: {path!r}: mode {mode:o} or its text")
        return sent

    def stage(self, directory: Path) -> Path:
        """Write the files into DIRECTORY (as guests/ has them); the guest file's path."""
        for f in self.files:
            path = directory / f.path
            path.parent.mkdir(exist_ok=True)
            path.write_text(f.text)
        return directory / self.files[0].path


def _dropin_name(leaf: str | None) -> bool:
    return (leaf is not None and leaf.endswith(".toml") and not leaf.startswith(".")
            and "/" not in leaf and "\0" not in leaf and len(os.fsencode(leaf)) <= 250)


def staged(files: GuestFiles, host: HostConfig) -> Guest:
    """Guest FILES.name as this host (HOST, its configuration) would load
    it from FILES, written to a staging directory; an error names the file
    as it would be in guests/."""
    from kvmagent.config.guests import check_hidden_paths, load_guest_file
    with tempfile.TemporaryDirectory(prefix="kvmagent-config-") as d:
        try:
            guest = load_guest_file(files.stage(Path(d)), host)
            check_hidden_paths(guest)  # its message names the file too
        except KvmagentError as e:
            raise KvmagentError(e.message.replace(d, "guests") + " (in the copy sent)",
                                e.hint, e.status) from None
    return guest


def install(paths: Paths, files: GuestFiles) -> list[str]:
    """Put FILES in guests/, each written whole (a temporary file renamed
    over it).  HOST's own files that differ or that the source does not
    have are kept beside, X.old; returns those names."""
    kept: list[str] = []
    main = paths.guest_config(files.name)
    dropins = main.with_name(main.name + ".d")
    wanted = {paths.guests_dir / f.path: f for f in files.files}
    from kvmagent.config.layers import dropin_files
    for path in dropin_files(main):  # drop-ins that would stay and change the guest
        if path not in wanted:
            os.replace(path, path.with_name(path.name + ".old"))
            kept.append(f"{dropins.name}/{path.name}.old")
    for path, f in wanted.items():
        try:
            same = path.read_bytes() == f.text.encode()
        except FileNotFoundError:
            same = False
        except OSError as e:  # a directory where a file goes...
            raise KvmagentError(f"{path}: {e.strerror}", None, ExitStatus.FAILURE) from None
        if same:
            if not path.is_symlink():
                os.chmod(path, f.mode)
            continue
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as out:
                out.write(f.text)
                out.flush()
                os.fchmod(out.fileno(), f.mode)
                os.fsync(out.fileno())
            if os.path.lexists(path):  # HOST's own, kept beside
                old = path.with_name(path.name + ".old")
                if path.is_symlink():  # a link its config management made: the link kept
                    os.replace(path, old)
                else:  # never a moment without the file
                    os.link(path, tmp + ".old")
                    os.replace(tmp + ".old", old)
                kept.append(str(old.relative_to(paths.guests_dir)))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            Path(tmp + ".old").unlink(missing_ok=True)
            raise
    return kept


def read_input(name: str) -> GuestFiles:
    """migrate-incoming --config-in/--put-config: what the source sent on standard input."""
    try:
        return GuestFiles.from_json(sys.stdin.read(), name)
    except ValueError as e:
        raise KvmagentError(f"the guest files sent for {name}: {e}", "it is sent by "
                            "kvmagent migrate --copy-config", ExitStatus.USAGE) from None
