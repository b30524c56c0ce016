"""kvmagent-generator: a systemd generator (systemd.generator(7)).

Run by systemd at boot and at every `systemctl daemon-reload`: for each
guest whose QEMU needs IP sockets (VNC on TCP, user-mode networking), a
drop-in that adds AF_INET and AF_INET6 to kvm@NAME.service's
RestrictAddressFamilies=; every other guest's QEMU cannot open an IP socket
at all.  Generators must be quick and must never fail the boot: a guest
whose file does not load is skipped (its supervisor reports it)."""

from __future__ import annotations

import sys
from pathlib import Path

from kvmagent.config.guests import guest_names, load_guest, load_host_config
from kvmagent.errors import KvmagentError
from kvmagent.names import service_unit
from kvmagent.paths import Paths
from kvmagent.render.service import inet_dropin, needs_inet

DROPIN = "50-kvmagent-network.conf"


def generate(paths: Paths, out: Path) -> list[str]:
    """Write the drop-ins into OUT; the guests that got one."""
    try:
        host = load_host_config(paths)
    except KvmagentError:
        return []
    done = []
    for name in guest_names(paths):
        try:
            guest = load_guest(paths, name, host)
        except KvmagentError:
            continue
        if needs_inet(guest):
            d = out / f"{service_unit(name)}.d"
            d.mkdir(parents=True, exist_ok=True)
            (d / DROPIN).write_text(inet_dropin())
            done.append(name)
    return done


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: kvmagent-generator NORMAL_DIR [EARLY_DIR LATE_DIR]", file=sys.stderr)
        return 2
    try:
        generate(Paths.from_env(), Path(args[0]))
    except OSError as e:  # never fail the boot over it
        print(f"kvmagent-generator: {e}", file=sys.stderr)
    return 0
