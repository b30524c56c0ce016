"""The six seed configurations (tests/data/seed) and their golden QEMU
command lines (tests/data/golden).

kvmagent refuses a configuration file that a user other than root and
itself could change (kvmagent.config.layers), so tests never load the files where
the checkout lies: that depends on who owns it.  copy() puts them in a
private temporary directory owned by whoever runs the tests.

After a deliberate change to the command line, regenerate the golden files
(this is no test and never passes as one) and review the diff:

    /usr/bin/python3 -m tests.seed --regen-golden
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

from kvmagent.config.guests import load_guest, load_host_config
from kvmagent.config.model import Accel
from kvmagent.paths import Paths
from kvmagent.render.qemu import HostFacts, Sockets, qemu_argv

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden"
SEED_GUESTS = ["clone", "arkani", "arkani-serial", "arkani-virtio", "arkani-net", "fukano"]
KVM = HostFacts(Accel.KVM)


def copy(state_dir: Path, runtime_dir: Path) -> Paths:
    """Paths whose configuration directory is a private copy of the seed's
    (mode 0700, files 0644, owned by this user), removed when Python exits."""
    top = Path(tempfile.mkdtemp(prefix="kvmagent-seed-"))
    atexit.register(shutil.rmtree, top, True)
    etc = top / "etc"
    shutil.copytree(DATA / "seed", etc, copy_function=shutil.copyfile)
    for path in etc.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    etc.chmod(0o755)
    return Paths(etc, state_dir, runtime_dir)


def seed_argv(paths: Paths, name: str, facts: HostFacts = KVM) -> list[str]:
    host = load_host_config(paths)
    guest = load_guest(paths, name, host)
    return qemu_argv(guest, host, facts, Sockets.in_dir(paths.guest_runtime(name)))


def regenerate() -> list[str]:
    """Write the golden files; return the names of those that changed."""
    paths = copy(Path("/var/lib/kvmagent"), Path("/run/kvmagent"))
    changed = []
    GOLDEN.mkdir(exist_ok=True)
    for name in SEED_GUESTS:
        text = "\n".join(seed_argv(paths, name)) + "\n"
        golden = GOLDEN / f"{name}.argv"
        if not golden.exists() or golden.read_text() != text:
            golden.write_text(text)
            changed.append(name)
    return changed


if __name__ == "__main__":
    if sys.argv[1:] != ["--regen-golden"]:
        sys.exit(f"usage: {sys.executable} -m tests.seed --regen-golden")
    changed = regenerate()
    print(f"rewritten: {', '.join(changed)}; review with git diff {GOLDEN}" if changed
          else "the golden files are up to date")
