"""Reading configuration files: a main TOML file plus its drop-in directory.

FILE.toml is read first, then FILE.toml.d/*.toml in lexical order; later
files win.  Tables merge key by key; any other value, arrays of tables
([[disk]], [[nic]]) included, is replaced whole by a later file.  Every
value remembers the file that set it (its origin), so error messages and
`kvmagent show` can name the file.

A configuration file is trusted with root's power (it names the disks and
binaries QEMU opens), so it is read only if no other user can change it:
owned by root (or by the user running kvmagent), not world-writable, in a
directory that is neither.  Symlinks are followed (an admin may keep a
guest's file in /srv or a git checkout); the checks apply to the file they
point to.  A file larger than MAX_FILE_SIZE is refused without being read.
"""

from __future__ import annotations

import os
import pwd
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmagent.errors import config_error

# The origin of a value that no file set.
DEFAULT = "default"

# Guest and host files are a few KiB; anything this large is a mistake (or
# an attack on the parser), refused before it is read.
MAX_FILE_SIZE = 1 << 20
# kvmagent's own keys nest three deep (disk[0].path); tomllib recurses per
# level of nesting, so depth is limited before anything walks the data.
MAX_DEPTH = 16


def key_str(path: tuple[str | int, ...]) -> str:
    """("disk", 0, "path") -> "disk[0].path"."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


@dataclass
class Layered:
    """A merged configuration and where each value came from."""

    data: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # key_str -> file
    files: list[Path] = field(default_factory=list)

    def origin_of(self, path: tuple[str | int, ...]) -> str:
        """The file that set PATH or its closest enclosing value."""
        while path:
            found = self.origin.get(key_str(path))
            if found is not None:
                return found
            path = path[:-1]
        return str(self.files[0]) if self.files else DEFAULT


def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _trusted_by_mode(st: os.stat_result, is_dir: bool) -> str | None:
    """Why a file or directory with this stat could be changed by a user
    other than root and us, or None.  A world-writable directory with the
    sticky bit (/tmp) is fine: others cannot replace a file they do not
    own, and they own every file they could add."""
    if st.st_uid not in (0, os.geteuid()):
        return f"owned by {_owner(st.st_uid)}, not root"
    if st.st_mode & stat.S_IWOTH and not (is_dir and st.st_mode & stat.S_ISVTX):
        return f"world-writable (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _check_trusted(path: Path, st: os.stat_result) -> None:
    """Refuse PATH (already opened, with fstat ST) if a user other than root
    or us could change it or its directory."""
    real = Path(os.path.realpath(path))
    shown = f"{path} (a symlink to {real})" if path.is_symlink() else str(path)
    why = _trusted_by_mode(st, is_dir=False)
    if why is not None:
        fix = f"chown root: {real}" if why.startswith("owned") else f"chmod o-w {real}"
        raise config_error(f"{shown}: refusing a configuration file that other users can "
                           f"change: it is {why}", f"if the file is as you want it: {fix}")
    for d in dict.fromkeys((path.absolute().parent, real.parent)):
        try:
            dst = os.stat(d)
        except OSError:
            continue  # we just opened a file in it; a race, not a hostile directory
        why = _trusted_by_mode(dst, is_dir=True)
        if why is not None:
            fix = f"chown root: {d}" if why.startswith("owned") else f"chmod o-w {d}"
            raise config_error(f"{shown}: refusing a configuration file in a directory that "
                               f"other users can change: {d} is {why}", fix)


def read_config_bytes(path: Path) -> bytes:
    """The contents of configuration file PATH, after the checks above.  A
    FIFO or device is refused without blocking on it (O_NONBLOCK, fstat)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        what = "a symlink to a missing file" if path.is_symlink() else "no such file"
        raise config_error(f"{path}: {what}") from None
    except PermissionError:
        raise config_error(f"{path}: cannot read: permission denied") from None
    except OSError as e:
        raise config_error(f"{path}: cannot read: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise config_error(f"{path}: is a directory, expected a TOML file")
        if not stat.S_ISREG(st.st_mode):
            raise config_error(f"{path}: is not a regular file")
        _check_trusted(path, st)
        too_big = config_error(f"{path}: {st.st_size} bytes; a configuration file may have "
                               f"at most {MAX_FILE_SIZE} bytes ({MAX_FILE_SIZE >> 20} MiB)",
                               "is this the right file?")
        if st.st_size > MAX_FILE_SIZE:
            raise too_big
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_FILE_SIZE:  # the file may grow while we read it
            chunk = os.read(fd, MAX_FILE_SIZE + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_FILE_SIZE:
            raise too_big
        return b"".join(chunks)
    finally:
        os.close(fd)


def _depth_ok(value: Any) -> bool:
    """Whether VALUE nests at most MAX_DEPTH tables or arrays (iteratively:
    the point is not to recurse)."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth >= MAX_DEPTH:
                return False
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return True


# MAX_DEPTH key parts joined by dots (a.b.c, "a"."b", [a.b.c]), found before
# tomllib sees them: its time grows with the square of a dotted key's length
# (a 100 KB key took 43 s; 1 MiB of it would take hours).  Possessive
# quantifiers, and starting only at the start of a word keep this search linear.
_KEY_PART = r"""(?>[A-Za-z0-9_-]++|"(?:[^"\\\n]|\\.)*+"|'[^'\n]*+')"""
_DEEP_KEY = re.compile(r"(?<![A-Za-z0-9_.-])(?:%s[ \t]*+\.[ \t]*+){%d}" % (_KEY_PART, MAX_DEPTH))


def parse_toml(raw: bytes, path: Path) -> dict[str, Any]:
    """Bytes of file PATH -> TOML data; every failure a config error naming
    the file and the line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise config_error(f"{path}: not valid TOML: the file is not UTF-8 "
                           f"(byte 0x{raw[e.start]:02x} at line {line})",
                           "save the file as UTF-8") from None
    nested = config_error(f"{path}: not valid TOML for kvmagent: tables, arrays or dotted "
                          f"keys nested more than {MAX_DEPTH} deep")
    if _DEEP_KEY.search(text):
        raise nested
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise config_error(f"{path}: not valid TOML: {e}",
                           "check the quoting and brackets on that line") from None
    except RecursionError:
        raise nested from None
    except ValueError as e:  # an integer of more than 4300 digits (int's limit)
        # without the advice to call sys.set_int_max_str_digits()
        raise config_error(f"{path}: not valid TOML: {str(e).split(';')[0]}") from None
    if not _depth_ok(data):
        raise nested
    return data


def read_toml(path: Path) -> dict[str, Any]:
    return parse_toml(read_config_bytes(path), path)


def _record(origin: dict[str, str], path: tuple[str | int, ...], value: Any,
            source: str) -> None:
    origin[key_str(path)] = source
    if isinstance(value, dict):
        for k, v in value.items():
            _record(origin, path + (k,), v, source)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if isinstance(v, dict):
                _record(origin, path + (i,), v, source)


def _forget(origin: dict[str, str], path: tuple[str | int, ...]) -> None:
    prefix = key_str(path)
    for k in [k for k in origin if k == prefix or k.startswith(prefix + ".")
              or k.startswith(prefix + "[")]:
        del origin[k]


def merge_into(layered: Layered, overlay: dict[str, Any], source: str,
               path: tuple[str | int, ...] = ()) -> None:
    target: Any = layered.data  # dicts and lists, as the TOML has them
    for part in path:
        target = target[part]
    for key, value in overlay.items():
        here = path + (key,)
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge_into(layered, value, source, here)
            continue
        _forget(layered.origin, here)
        target[key] = value
        _record(layered.origin, here, value, source)


def dropin_files(main: Path) -> list[Path]:
    """FILE.toml.d/*.toml in lexical order (byte order, like systemd).
    Hidden files (editors' lock files) are skipped; anything else named
    *.toml is read, so a dangling symlink or a FIFO is an error, not a
    drop-in silently missing."""
    d = main.with_name(main.name + ".d")
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if p.name.endswith(".toml")
                   and not p.name.startswith(".")),
                  key=lambda p: p.name.encode())


def load_layers(main: Path, *, required: bool) -> Layered:
    """Read MAIN (if it exists, or fail when REQUIRED) and its drop-ins."""
    layered = Layered()
    files = []
    if os.path.lexists(main):
        files.append(main)  # read_config_bytes refuses what is not a regular file
    elif required:
        raise config_error(f"{main}: no such file")
    files += dropin_files(main)
    for path in files:
        data = read_toml(path)
        merge_into(layered, data, str(path))
        layered.files.append(path)
    return layered
