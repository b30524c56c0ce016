"""`kvmagent import kvm-script|xen FILE [--name NAME] [--bridge BRIDGE]
[--write [--force]]`: the importers (kvmagent.foreign.kvmscript, kvmagent.foreign.xenconfig)
at the command line.  The TOML is checked as `kvmagent validate` checks a
guest before it is printed or written; on any error nothing is written.
Before --write it is checked against the guests already defined too (MACs,
taps, writable disks: check_unique) and for files kvm@.service cannot see
(/home), and either is an error; without --write the TOML is printed for
editing and the problem said on stderr.
--write puts it into guests/NAME.toml, never over an existing file without
--force, and never half-written (a temporary file in the same directory,
then linked or renamed into place)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from kvmagent.config.guests import build_guest, check_hidden_paths, check_unique, guest_names
from kvmagent.config.guests import load_guest
from kvmagent.config.guests import load_host_config
from kvmagent.config.layers import Layered, parse_toml
from kvmagent.config.model import Guest, HostConfig
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
    guest = build_guest(imported.name, Layered(data=parse_toml(imported.toml.encode(), target)),
                        host, target)
    clash = find_problem(guest, paths, host, file)
    if clash is not None:
        if args.write:
            raise config_error(f"{clash.message}; nothing written", clash.hint)
        print(f"kvmagent: {clash}", file=sys.stderr)
    return imported, target


# What helps with each kind of clash (kvmagent.config.guests.check_unique's messages).
CLASH_HINTS = (
    (" is also a MAC of guest ", "if it is the same guest, it is defined already; else give "
     "this one another MAC: change it in the file, or save the TOML that import prints "
     "without --write, with mac changed in that [[nic]] (or removed: kvmagent derives one "
     "from the name)"),
    (" is also used by guest ", "import it under another name (--name NAME)"),
    (" of guest ", "if it is the same guest, it is defined already; else one writable disk "
     "can belong to one guest only"),
)


def find_problem(guest: Guest, paths: Paths, host: HostConfig,
                 source: Path) -> KvmagentError | None:
    """What keeps the imported GUEST from running as a defined guest
    beside the others, as an error (exit 6) naming the imported file, the
    key and value (and the other guest); None if nothing does.  A file in a
    directory that kvm@.service hides (check_hidden_paths), and a clash of
    its MACs, taps and writable disks with a defined guest other than the
    one of its own name (which --write --force replaces, and --write alone
    refuses to touch).  A defined guest that does not load is left out, as
    validate leaves it out of its cross-guest checks."""
    try:
        check_hidden_paths(guest)
    except KvmagentError as e:
        message = e.message.removeprefix(f"{guest.config_file}: ")
        return config_error(f"{source}: imported as guest {guest.name}, its {message}", e.hint)
    others = []
    for name in guest_names(paths):
        if name != guest.name:
            try:
                others.append(load_guest(paths, name, host))
            except KvmagentError:
                pass
    try:
        check_unique([*others, guest])
    except KvmagentError as e:
        # check_unique names the guest's file, which is not written yet
        message = e.message.removeprefix(f"{guest.config_file}: ")
        hint = next((h for text, h in CLASH_HINTS if text in message), e.hint)
        return config_error(f"{source}: imported as guest {guest.name}, its {message}", hint)
    return None


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
