"""A real QEMU (TCG) attached to a tap through the fd that open_tap() returned."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from kvmagent.host import netdev

pytestmark = [pytest.mark.net, pytest.mark.qemu]

IFF_LOWER_UP = 0x10000
QEMU = "qemu-system-x86_64"


def _get(ipr: IPRoute, name: str):
    found = ipr.link_lookup(ifname=name)
    return ipr.get_links(found[0])[0] if found else None


def _qmp(path: Path, *commands: dict) -> list[dict]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        stream = s.makefile("rwb")
        assert "QMP" in json.loads(stream.readline())
        replies = []
        for command in ({"execute": "qmp_capabilities"}, *commands):
            stream.write(json.dumps(command).encode() + b"\n")
            stream.flush()
            while "event" in (reply := json.loads(stream.readline())):
                pass
            replies.append(reply)
        return replies[1:]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"QEMU exited: {proc.communicate()[1].decode()}"
        assert time.monotonic() < deadline, f"no QMP socket after {timeout} s"
        time.sleep(0.02)


def test_qemu_uses_the_passed_fd_and_the_tap_dies_with_it(netns, ipr, bridge, tmp_path):
    qemu = shutil.which(QEMU)
    assert qemu, f"{QEMU} is not installed (apt-get install qemu-system-x86)"
    fds = netdev.open_tap("kvm-web-0", bridge)
    fd_number = fds[0]
    qmp = tmp_path / "qmp.sock"
    argv = [qemu, "-accel", "tcg", "-nodefaults", "-display", "none", "-S", "-m", "64",
            "-netdev", f"tap,id=n0,fd={fds[0]}",
            "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
            "-qmp", f"unix:{qmp},server=on,wait=off"]
    proc = subprocess.Popen(argv, pass_fds=fds, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for fd in fds:  # from now on only QEMU holds the tap
            os.close(fd)
        fds = []
        _wait_for(qmp, proc)
        status, network = _qmp(qmp, {"execute": "query-status"}, {
            "execute": "human-monitor-command",
            "arguments": {"command-line": "info network"}})
        assert status["return"]["status"] == "prelaunch"
        assert f"type=tap,fd={fd_number}" in network["return"], network
        tap = _get(ipr, "kvm-web-0")
        assert tap is not None
        assert tap["flags"] & IFF_LOWER_UP and tap.get_attr("IFLA_CARRIER") == 1
        assert tap.get_attr("IFLA_MASTER") == _get(ipr, bridge)["index"]
        assert tap.get_attr("IFLA_ADDRESS").startswith("fe:")  # not the guest's MAC
    finally:
        for fd in fds:
            os.close(fd)
        proc.kill()
        proc.wait(timeout=20)
        proc.stderr.close()
    assert _get(ipr, "kvm-web-0") is None  # gone with QEMU, no cleanup step
