"""The generated command lines run in the real qemu-system-x86_64 (TCG).

1. Each of the six seed configurations, with its disk paths pointed at
   scratch images and its kernel at the tiny test guest, starts paused
   (-S): QMP answers query-status with "prelaunch", then quit.  So no
   option kvmagent writes is invented.
2. A guest defined in TOML boots for real from kvmagent's argv: the tiny
   guest reaches GUEST-READY, sees its virtio and IDE disks, answers on the
   serial console, and powers off cleanly on the ACPI power button.

What cannot run here (-accel kvm, -cpu host, vhost-net) is covered by the
golden files in tests/unit/test_qemu_argv.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kvmagent.config.guests import load_guest, load_host_config
from kvmagent.host.hostcheck import check_host
from kvmagent.config.model import Accel, NicMode
from kvmagent.paths import Paths
from kvmagent.render.qemu import Sockets, qemu_argv
from kvmagent.host.qemucaps import capabilities
from tests import seed
from tests.guest.qemu_helpers import Console, Qmp, connect_unix, on_scratch, start_paused

pytestmark = pytest.mark.qemu

# a private copy: the trust check must not depend on who owns the checkout
SEED = seed.copy(Path("/nonexistent/state"), Path("/nonexistent/run"))
SEED_GUESTS = seed.SEED_GUESTS


@pytest.fixture(scope="module")
def image(guest_image):  # type: ignore[no-untyped-def]
    return guest_image


def _start(argv: list[str], rundir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(rundir / "qemu.stderr", "wb"))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.mark.parametrize("name", SEED_GUESTS)
def test_seed_configuration_starts_paused(name: str, image, tmp_path: Path) -> None:
    host = load_host_config(SEED)
    guest = on_scratch(load_guest(SEED, name, host), image, tmp_path)
    if any(n.mode is NicMode.BRIDGE for n in guest.nics) and os.geteuid() != 0:
        pytest.skip("a bridged NIC needs root (QEMU creates the tap in a private netns)")
    stderr = start_paused(guest, host, tmp_path)
    assert "warning" not in stderr.lower() or name == "fukano", stderr


def test_guest_boots_from_kvmagent_argv(image, tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    (etc / "guests").mkdir(parents=True)
    vda, sda = tmp_path / "vda.img", tmp_path / "sda.qcow2"
    with open(vda, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(sda), "8M"], check=True)
    (etc / "guests" / "demo.toml").write_text(f"""
description = "tiny test guest"
accel = "tcg"
memory = "256M"
[kernel]
image = "{image.kernel}"
initrd = "{image.initrd}"
cmdline = "console=ttyS0 quiet panic=-1"
[[disk]]
path = "{vda}"
[[disk]]
path = "{sda}"
format = "qcow2"
bus = "ide"
""")
    paths = Paths(etc, tmp_path / "state", tmp_path / "run")
    host = load_host_config(paths)
    guest = load_guest(paths, "demo", host)
    facts, problems = check_host(guest, host, caps_probe=lambda q: capabilities(q, tmp_path))
    assert problems == [] and facts.accel is Accel.TCG
    argv = qemu_argv(guest, host, facts, Sockets.in_dir(tmp_path))
    proc = _start(argv, tmp_path)
    try:
        console = Console(connect_unix(tmp_path / "console.sock", 20, proc))
        qmp = Qmp(connect_unix(tmp_path / "qmp.sock", 20, proc))
        ready = console.read_until(r"GUEST-READY[^\n]*disks=([a-z0-9,]+)\n", 90)
        assert sorted(ready.group(1).split(",")) == ["sda", "vda"]
        console.send("echo ANSWER-$((6*7))\n")
        console.read_until("ANSWER-42", 20)
        deadline_hits = 0
        while True:  # an early press of the power button is lost: press again
            qmp.execute("system_powerdown")
            try:
                console.read_until("GUEST-POWEROFF", 2)
                break
            except TimeoutError:
                deadline_hits += 1
                assert deadline_hits < 15, console.text
        assert proc.wait(30) == 0
        qmp.poll_events(1)
        shutdown = [e for e in qmp.events if e["event"] == "SHUTDOWN"]
        assert shutdown and shutdown[0]["data"]["reason"] == "guest-shutdown"
    finally:
        _stop(proc)
