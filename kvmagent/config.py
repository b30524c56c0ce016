"""Reading configuration files: a main TOML file plus its drop-in directory.

FILE.toml is read first, then FILE.toml.d/*.toml in lexical order; later
files win.  Tables merge key by key; any other value, arrays of tables
([[disk]], [[nic]]) included, is replaced whole by a later file.  Every
value remembers the file that set it (its origin), so error messages and
`kvmagent show` can name the file.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import config_error

# The origin of a value that no file set.
DEFAULT = "default"


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


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise config_error(f"{path}: not valid TOML: {e}",
                           "check the quoting and brackets on that line") from None
    except UnicodeDecodeError:
        raise config_error(f"{path}: not valid TOML: the file is not UTF-8") from None
    except PermissionError:
        raise config_error(f"{path}: cannot read: permission denied") from None
    except IsADirectoryError:
        raise config_error(f"{path}: is a directory, expected a TOML file") from None


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
    target: dict[str, Any] = layered.data
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
    """FILE.toml.d/*.toml in lexical order (byte order, like systemd)."""
    d = main.with_name(main.name + ".d")
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if p.suffix == ".toml" and p.is_file()),
                  key=lambda p: p.name.encode())


def load_layers(main: Path, *, required: bool) -> Layered:
    """Read MAIN (if it exists, or fail when REQUIRED) and its drop-ins."""
    layered = Layered()
    files = []
    if main.is_file():
        files.append(main)
    elif main.exists():
        raise config_error(f"{main}: is not a regular file")
    elif required:
        raise config_error(f"{main}: no such file")
    files += dropin_files(main)
    for path in files:
        data = read_toml(path)
        merge_into(layered, data, str(path))
        layered.files.append(path)
    return layered
