"""Reading a Xen xm/xl domain configuration without running it: the file
is parsed with `ast`, and only plain literals (strings, numbers, booleans,
lists of them) are read, never evaluated.  Lines of Xen's example files
that say nothing about the guest (`import os, re`, `arch = os.uname()[4]`,
an `if` that sets only such names) are skipped with a note; any other code,
or a key the importer needs (NEEDED) whose value is not a plain literal, is
a KvmagentError naming the file, the line and the text.  Also the disk and
vif specs, xm's and xl's.  Pure."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Callable

from kvmagent.errors import config_error
from kvmagent.foreign.importtoml import excerpt, located_error

Value = str | int | float | bool | list["Value"]

# Every key the importer reads: one that is not a plain literal is an error.
NEEDED = frozenset({
    "name", "memory", "maxmem", "vcpus", "maxvcpus", "cpus", "kernel", "ramdisk", "root",
    "extra", "cmdline", "bootloader", "bootloader_args", "builder", "type", "disk", "vif",
    "on_poweroff", "on_reboot", "on_crash", "vnc", "vnclisten", "vncdisplay", "vncunused",
    "sdl", "serial", "boot", "uuid", "localtime", "keymap", "usb", "usbdevice", "vfb",
    "pci", "nographic"})
_MAX_DEPTH = 8
_VDEV = re.compile(r"(xvd|hd|sd)([a-z]{1,2})([0-9]{0,2})", re.ASCII)


@dataclass(frozen=True)
class Setting:
    value: Value
    line: int
    text: str  # the line as written


def _literal(node: ast.AST, depth: int = 0) -> Value:
    if depth > _MAX_DEPTH:
        raise ValueError("nested too deep")
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool)):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(x, depth + 1) for x in node.elts]
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
            and isinstance(node.operand, ast.Constant)
            and isinstance(node.operand.value, (int, float))
            and not isinstance(node.operand.value, bool)):
        return -node.operand.value
    raise ValueError("not a plain value")


def _assigned(stmts: list[ast.stmt]) -> list[str] | None:
    """The names STMTS assign to, if they do nothing else (an `if` of
    Xen's example files); None if they do anything else."""
    out: list[str] = []
    for st in stmts:
        if isinstance(st, ast.Assign) and all(isinstance(t, ast.Name) for t in st.targets):
            out += [t.id for t in st.targets if isinstance(t, ast.Name)]
        elif isinstance(st, ast.If):
            inner = _assigned(st.body + st.orelse)
            if inner is None:
                return None
            out += inner
        else:
            return None
    return out


def read_settings(text: str, file: str) -> tuple[dict[str, Setting], list[str]]:
    """KEY = literal lines of the config -> {key: Setting}, and notes on
    the lines skipped.  Nothing is evaluated."""
    lines = text.splitlines()

    def line_text(n: int) -> str:
        return lines[n - 1] if 0 < n <= len(lines) else ""

    if "\0" in text:  # said the same on every Python (3.11's ast and 3.13's differ here)
        raise config_error(f"{file}: not a Xen configuration (it contains a NUL byte)")
    try:
        tree = ast.parse(text, filename=file)
    except SyntaxError as e:
        n = e.lineno or 1
        raise located_error(file, n, f"not a Xen configuration ({e.msg})", line_text(n),
                            "Xen configurations are KEY = value lines") from None
    except (ValueError, RecursionError, MemoryError) as e:
        raise config_error(f"{file}: not a Xen configuration ({e})") from None
    settings: dict[str, Setting] = {}
    notes: list[str] = []
    for st in tree.body:
        here = line_text(st.lineno)
        if isinstance(st, (ast.Import, ast.ImportFrom)):
            notes.append(f"Line {st.lineno}: `{excerpt(here, 60)}` skipped (Python for Xen's "
                         "tools; never run).")
            continue
        if isinstance(st, ast.If):
            assigned = _assigned([st])
            if assigned is None or set(assigned) & NEEDED:
                raise located_error(file, st.lineno, "an `if` the importer cannot follow "
                                    "(it would have to run Python)", here,
                                    "write the values the guest has as plain KEY = value lines")
            notes.append(f"Line {st.lineno}: `{excerpt(here, 60)}` skipped (sets only "
                         f"{', '.join(dict.fromkeys(assigned))}, which kvmagent does not use).")
            continue
        if not (isinstance(st, ast.Assign) and len(st.targets) == 1
                and isinstance(st.targets[0], ast.Name)):
            raise located_error(file, st.lineno, "Python code, not a KEY = value line", here,
                                "the importer reads plain values only and runs nothing")
        key = st.targets[0].id
        try:
            value = _literal(st.value)
        except ValueError as e:
            if key in NEEDED:
                raise located_error(file, st.lineno, f"{key} is {e}: the importer reads "
                                    "strings, numbers and lists and runs nothing", here,
                                    f"write {key} as a plain value") from None
            notes.append(f"Line {st.lineno}: `{excerpt(here, 60)}` skipped (not a plain "
                         "value; kvmagent does not use it).")
            continue
        if key in settings:
            notes.append(f"Line {st.lineno}: {key} again; this one counts, as for Xen.")
        settings[key] = Setting(value, st.lineno, here)
    return settings, notes


# -- disks and NICs -----------------------------------------------------------------


@dataclass
class XenDisk:
    target: str
    vdev: str  # without a partition number
    part: str  # "" or the partition number the guest saw
    cdrom: bool
    readonly: bool
    format: str
    spec: str


_PREFIXES = {"phy": "", "file": "", "tap": "", "tap2": "", "tapdisk": "", "aio": "",
             "raw": "raw", "qcow2": "qcow2", "qcow": "qcow", "vhd": "vhd", "vmdk": "vmdk"}


def parse_disk(spec: str, fail: Callable[[str], Exception]) -> XenDisk | None:
    """One entry of `disk`: xm's 'phy:/dev/vg/lv,xvda1,w' or xl's
    'format=raw, vdev=xvda, access=rw, target=/dev/vg/lv' (or four
    positional items).  None for an empty CD-ROM drive."""
    fmt, access, devtype, target = "raw", "w", "disk", None
    if "target=" in spec:
        spec_head, _, target = spec.partition("target=")
        items = [i.strip() for i in spec_head.split(",") if i.strip()]
    else:
        items = [i.strip() for i in spec.split(",")]
    if any("=" in i for i in items) or target is not None:
        vdev = None
        for item in items:
            key, eq, val = item.partition("=")
            if not eq and key == "cdrom":
                devtype = "cdrom"
            elif key == "format":
                fmt = val
            elif key == "vdev":
                vdev = val
            elif key in ("access", "mode"):
                access = val
            elif key == "devtype":
                devtype = val
            elif key == "backendtype" and val in ("phy", "tap", "qdisk"):
                pass
            else:
                raise fail(f"disk option '{excerpt(item, 40)}' is not one the importer "
                           "translates")
        if vdev is None:
            raise fail("a disk without vdev=")
    elif len(items) == 4:
        target, fmt, vdev, access = items
    elif len(items) == 3:
        target, vdev, access = items
    else:
        raise fail("a disk spec the importer cannot read (expected 'phy:/dev/vg/lv,xvda,w' "
                   "or 'format=raw, vdev=xvda, access=rw, target=/dev/vg/lv')")
    target = (target or "").strip()
    vdev = vdev.removeprefix("ioemu:")
    vdev, _, kind = vdev.partition(":")
    if kind == "cdrom" or devtype == "cdrom":
        devtype = "cdrom"
    elif kind not in ("", "disk") or devtype != "disk":
        raise fail(f"device type '{kind or devtype}': expected disk or cdrom")
    while ":" in target and target.split(":", 1)[0] in _PREFIXES:
        prefix, target = target.split(":", 1)
        fmt = _PREFIXES[prefix] or fmt
        if prefix == "phy" and target and not target.startswith("/"):
            target = "/dev/" + target
    if fmt not in ("raw", "qcow2"):
        raise fail(f"image format '{excerpt(fmt, 20)}': kvmagent's disks are raw or qcow2 "
                   "(convert the image with qemu-img convert)")
    if access not in ("w", "w!", "rw", "r", "ro", ""):
        raise fail(f"access '{access}': expected w or r")
    m = _VDEV.fullmatch(vdev)
    if not m:
        raise fail(f"virtual device '{excerpt(vdev, 20)}': expected xvdX, hdX or sdX")
    if not target:
        if devtype == "cdrom":
            return None
        raise fail("a disk without a target")
    if not target.startswith("/") or "\n" in target:
        raise fail(f"'{excerpt(target, 60)}' is not an absolute path")
    return XenDisk(target, m.group(1) + m.group(2), m.group(3), devtype == "cdrom",
                   access in ("r", "ro") or devtype == "cdrom", fmt, spec)


def parse_vif(spec: str, fail: Callable[[str], Exception]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in (i.strip() for i in spec.split(",")):
        if not item:
            continue
        key, eq, val = item.partition("=")
        if not eq:
            raise fail(f"'{excerpt(item, 40)}' is not key=value")
        if key not in ("mac", "bridge", "model", "type", "vifname", "script", "ip", "rate",
                       "backend"):
            raise fail(f"vif option '{excerpt(key, 30)}' is not one the importer translates")
        if key in out:
            raise fail(f"vif option '{key}' given twice")
        out[key] = val.strip()
    return out
