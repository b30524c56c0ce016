"""kvmagent-generator: a systemd generator (systemd.generator(7)).

Run by systemd at boot and at every `systemctl daemon-reload`, it writes
drop-ins for kvm@NAME.service:

- for each guest whose QEMU needs IP sockets (VNC on TCP, user-mode
  networking), one that adds AF_INET and AF_INET6 to
  RestrictAddressFamilies=; every other guest's QEMU cannot open an IP
  socket at all;
- for each guest with writable image files outside /var/lib/kvmagent (an
  imported guest keeps its images in /srv, /export, ...), one with
  ReadWritePaths=-FILE for exactly those files; under ProtectSystem=strict
  the rest of the system stays read-only for it.

Generators must be quick and must never fail the boot: a guest whose file
does not load is skipped (its supervisor reports it), and no file a guest
names is looked at (an NFS mount may not be there yet)."""

from __future__ import annotations

import sys
from pathlib import Path

from kvmagent.config.guests import guest_names, load_guest, load_host_config
from kvmagent.errors import KvmagentError
from kvmagent.names import service_unit
from kvmagent.paths import Paths
from kvmagent.render.service import IMAGES_DROPIN, images_dropin, inet_dropin, needs_inet
from kvmagent.render.service import writable_images

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
        dropins = {}
        if needs_inet(guest):
            dropins[DROPIN] = inet_dropin()
        images = writable_images(guest)
        if images:
            dropins[IMAGES_DROPIN] = images_dropin(images)
        if dropins:
            d = out / f"{service_unit(name)}.d"
            d.mkdir(parents=True, exist_ok=True)
            for file, text in dropins.items():
                (d / file).write_text(text)
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
