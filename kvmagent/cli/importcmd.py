"""`kvmagent import kvm-script|xen FILE [--name NAME] [--bridge BRIDGE]
[--write [--force]]`: the importers (kvmagent.foreign.kvmscript, kvmagent.foreign.xenconfig)
at the command line.  The TOML is checked as `kvmagent validate` checks a
guest before it is printed or written; on any error nothing is written.
--write puts it into guests/NAME.toml, never over an existing file without
--force, and never half-written (a temporary file in the same directory,
then linked or renamed into place)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from kvmagent.config.guests import build_guest, load_host_config
from kvmagent.config.layers import Layered, parse_toml
from kvmagent.errors import ExitStatus, KvmagentError, config_error
from kvmagent.foreign.importtoml import Imported
from kvmagent.foreign.kvmscript import import_kvm_script
from kvmagent.foreign.xenconfig import import_xen
from kvmagent.paths import Paths

MAX_INPUT = 1 << 20


def read_text(path: Path, required: bool = True) -> str | None:
    """The text of PATH (at most MAX_INPUT bytes of UTF-8); None if it does
    not exist and REQUIRED is false."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_INPUT + 1)
    except FileNotFoundError:
        if not required:
            return None
        raise config_error(f"{path}: no such file") from None
    except OSError as e:
        raise config_error(f"{path}: cannot read: {e.strerror}") from None
    if len(raw) > MAX_INPUT:
        raise config_error(f"{path}: larger than {MAX_INPUT >> 20} MiB",
                           "is this the right file?")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise config_error(f"{path}:{line}: not UTF-8 text") from None


def run_import(args: argparse.Namespace, paths: Paths) -> tuple[Imported, Path]:
    """Import and check; nothing is written here."""
    file = Path(args.file)
    text = read_text(file) or ""
    if args.format == "kvm-script":
        imported = import_kvm_script(
            text, str(file), name=args.name, bridge=args.bridge,
            read=lambda path: read_text(Path(path), required=False))
    else:
        if args.bridge is not None:
            raise KvmagentError("--bridge is for kvm-script: a Xen vif names its bridge",
                                status=ExitStatus.USAGE)
        imported = import_xen(text, str(file), name=args.name)
    target = paths.guest_config(imported.name)
    host = load_host_config(paths)
    build_guest(imported.name, Layered(data=parse_toml(imported.toml.encode(), target)),
                host, target)
    return imported, target


def write_guest(target: Path, text: str, force: bool) -> None:
    if os.path.lexists(target) and not force:
        raise config_error(f"{target}: exists; nothing written",
                           "add --force to replace it, or --name to import under another name")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)  # fails if the file appeared meanwhile
            except FileExistsError:
                raise config_error(f"{target}: exists; nothing written",
                                   "add --force to replace it") from None
    except OSError as e:
        raise KvmagentError(f"{target}: cannot write: {e.strerror}") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def cmd_import(args: argparse.Namespace, paths: Paths) -> int:
    if args.force and not args.write:
        raise KvmagentError("--force only goes with --write", status=ExitStatus.USAGE)
    imported, target = run_import(args, paths)
    for warning in imported.warnings:
        print(f"kvmagent: {imported.name}: to do: {warning}", file=sys.stderr)
    if not args.write:
        sys.stdout.write(imported.toml)
        return ExitStatus.OK
    write_guest(target, imported.toml, args.force)
    print(f"kvmagent: wrote {target}; check it with kvmagent validate --host "
          f"{imported.name}", file=sys.stderr)
    return ExitStatus.OK
