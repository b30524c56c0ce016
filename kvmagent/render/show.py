"""Presentation of a guest for `kvmagent show` and `list`: the effective
configuration with the file each value came from, the QEMU command line as
a readable shell script, and the scope settings."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from kvmagent.config.model import Guest
from kvmagent.config.values import format_cpu_list, format_duration, format_size


def effective_config(g: Guest) -> dict[str, Any]:
    """The guest as TOML values, every default filled in."""
    out: dict[str, Any] = {
        "description": g.description, "uuid": g.uuid, "cpus": g.cpus,
        "memory": format_size(g.memory), "machine": g.machine, "accel": str(g.accel),
        "boot": [str(b) for b in g.boot], "on_poweroff": str(g.on_poweroff),
        "on_reboot": str(g.on_reboot),
    }
    if g.kernel:
        k: dict[str, Any] = {"image": str(g.kernel.image)}
        if g.kernel.initrd:
            k["initrd"] = str(g.kernel.initrd)
        if g.kernel.cmdline is not None:
            k["cmdline"] = g.kernel.cmdline
        out["kernel"] = k
    out["console"] = {"serial": g.console.serial, "escape": g.console.escape}
    if g.display.vnc:
        out["display"] = {"vnc": g.display.vnc}
    out["stop"] = {"timeout": format_duration(g.stop_timeout)}
    r = g.resources
    weights = (("cpu_weight", r.cpu_weight), ("io_weight", r.io_weight),
               ("tasks_max", r.tasks_max))
    res: dict[str, int | str] = {k: v for k, v in weights if v is not None}
    if r.cpu_affinity is not None:
        res["cpu_affinity"] = format_cpu_list(r.cpu_affinity)
    if res:
        out["resources"] = res
    if g.extra_args:
        out["qemu"] = {"extra_args": list(g.extra_args)}
    out["disk"] = [{k: v for k, v in (
        ("path", str(d.path)), ("bus", str(d.bus)), ("media", str(d.media)),
        ("format", str(d.format)), ("readonly", d.readonly), ("cache", str(d.cache)),
        ("boot", d.boot)) if v is not None} for d in g.disks]
    out["nic"] = [{k: v for k, v in (
        ("mode", str(n.mode)), ("bridge", n.bridge), ("mac", n.mac),
        ("model", str(n.model))) if v is not None} for n in g.nics]
    return out


def _short(origin: str, config_dir: Path) -> str:
    try:
        return str(Path(origin).relative_to(config_dir))
    except ValueError:
        return origin


def _toml(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, list) else \
        "[" + ", ".join(json.dumps(x) for x in v) + "]"


def render_config(g: Guest, config_dir: Path) -> list[str]:
    eff = effective_config(g)
    lines: list[str] = []

    def emit(prefix: str, table: dict[str, Any]) -> None:
        for key, value in table.items():
            if isinstance(value, dict) or (not prefix and key in ("disk", "nic")):
                continue
            origin = _short(g.origin.get(prefix + key, "default"), config_dir)
            lines.append(f"{key + ' = ' + _toml(value):<44} # {origin}")

    emit("", eff)
    for key, value in eff.items():
        if isinstance(value, dict):
            lines += ["", f"[{key}]"]
            emit(f"{key}.", value)
    for key in ("disk", "nic"):
        for i, item in enumerate(eff[key]):
            lines += ["", f"[[{key}]]"]
            emit(f"{key}[{i}].", item)
    return lines


def render_argv(argv: list[str]) -> list[str]:
    """One option and its value per line, shell-quoted, with backslashes:
    it reads like the seed's start scripts and can be pasted into a shell."""
    lines: list[str] = []
    i = 0
    while i < len(argv):
        part = shlex.quote(argv[i])
        if argv[i].startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            part += " " + shlex.quote(argv[i + 1])
            i += 1
        lines.append(part)
        i += 1
    return [("    " if n else "") + line + (" \\" if n < len(lines) - 1 else "")
            for n, line in enumerate(lines)]
