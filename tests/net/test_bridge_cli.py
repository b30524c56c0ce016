"""`kvmagent bridge ensure|show` as an admin runs them, in a fresh netns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from kvmagent.host import netdev
from kvmagent.host.bridge import bridge_report, ensure_bridge
from kvmagent.errors import ExitStatus

pytestmark = pytest.mark.net
REPO = Path(__file__).resolve().parents[2]


def kvmagent(etc: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO),
           "KVMAGENT_CONFIG_DIR": str(etc)}
    return subprocess.run([sys.executable, "-m", "kvmagent", *args], env=env, text=True,
                          capture_output=True, timeout=60)


def test_ensure_is_idempotent_and_persists(netns, tmp_path):
    etc = tmp_path / "etc"
    r = kvmagent(etc, "bridge", "ensure", "--address", "10.77.0.1/24", "--persist")
    assert r.returncode == 0, r.stderr
    assert "br-kvm: created bridge br-kvm" in r.stdout
    assert "br-kvm: added address 10.77.0.1/24" in r.stdout
    record = etc / "bridges" / "br-kvm.toml"
    assert 'address = "10.77.0.1/24"' in record.read_text()
    r = kvmagent(etc, "bridge", "ensure")
    assert r.stdout == "br-kvm: nothing to change\n"
    # gone (as after a reboot) -> --all makes it again, as the boot unit does
    with IPRoute() as ipr:
        ipr.link("del", ifname="br-kvm")
    r = kvmagent(etc, "bridge", "ensure", "--all")
    assert r.returncode == 0, r.stderr
    (br,) = bridge_report()
    assert br.name == "br-kvm" and br.addresses == ("10.77.0.1/24",)
    assert (br.stp, br.forward_delay, br.hello_time, br.max_age) == (False, 9, 2, 12)


def test_show_names_the_guest_of_each_tap(netns, tmp_path):
    etc = tmp_path / "etc"
    (etc / "guests").mkdir(parents=True)
    (etc / "guests" / "arkani.toml").write_text("[[nic]]\n")
    ensure_bridge("br-kvm")
    fds = netdev.open_tap("kvm-arkani-0", "br-kvm")
    try:
        r = kvmagent(etc, "bridge", "show")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("br-kvm: up, mtu 1500, no address, stp off")
        assert "kvm-arkani-0" in r.stdout and "guest arkani" in r.stdout
        (doc,) = json.loads(kvmagent(etc, "bridge", "show", "--json").stdout)
        assert doc["ports"][0]["guest"] == "arkani"
    finally:
        for fd in fds:
            __import__("os").close(fd)


def test_bad_bridge_record_changes_nothing(netns, tmp_path):
    etc = tmp_path / "etc"
    (etc / "bridges").mkdir(parents=True)
    (etc / "bridges" / "br-a.toml").write_text('stp = false\n')
    bad = etc / "bridges" / "br-b.toml"
    bad.write_text('forward_delay = "9s"\n')
    r = kvmagent(etc, "bridge", "ensure", "--all")
    assert r.returncode == ExitStatus.CONFIG
    assert f'{bad}: forward_delay = "9s": expected an integer' in r.stderr
    assert bridge_report() == []  # br-a was not made either


def test_bad_address(netns, tmp_path):
    r = kvmagent(tmp_path / "etc", "bridge", "ensure", "--address", "10.0.0.300/24")
    assert r.returncode == ExitStatus.CONFIG
    assert "10.0.0.300/24" in r.stderr
    assert bridge_report() == []


def test_persist_adds_to_the_record(netns, tmp_path):
    """Two `--persist` commands, one after the other (as docs/bridges.md
    shows them): the record keeps both, and the bridge comes back whole."""
    etc = tmp_path / "etc"
    with IPRoute() as ipr:
        ipr.link("add", ifname="eth-up", kind="veth", peer="eth-peer")
    assert kvmagent(etc, "bridge", "ensure", "--uplink", "eth-up", "--persist").returncode == 0
    r = kvmagent(etc, "bridge", "ensure", "--address", "10.77.0.1/24", "--persist")
    assert r.returncode == 0, r.stderr
    record = (etc / "bridges" / "br-kvm.toml").read_text()
    assert 'uplink = "eth-up"' in record and 'address = "10.77.0.1/24"' in record
    (etc / "bridges" / "br-kvm.toml").write_text(record + "stp = true\n")
    assert kvmagent(etc, "bridge", "ensure").stdout == "br-kvm: set stp on\n"  # the record's
    with IPRoute() as ipr:
        ipr.link("del", ifname="br-kvm")
    assert kvmagent(etc, "bridge", "ensure", "--all").returncode == 0
    (br,) = bridge_report()
    assert [p.name for p in br.ports] == ["eth-up"] and br.addresses == ("10.77.0.1/24",)
    assert br.stp


def test_ensure_all_makes_every_bridge_it_can(netns, tmp_path):
    """At boot: one bridge's uplink missing must not keep the others from
    being made; the failure is said and is the exit status."""
    etc = tmp_path / "etc"
    (etc / "bridges").mkdir(parents=True)
    (etc / "kvmagent.toml").write_text('device_timeout = "1s"\n')
    (etc / "bridges" / "a-br.toml").write_text('uplink = "eth9"\n')
    (etc / "bridges" / "br-kvm.toml").write_text('address = "10.77.0.1/24"\n')
    r = kvmagent(etc, "bridge", "ensure", "--all")
    assert r.returncode == ExitStatus.HOST_NOT_READY and "eth9" in r.stderr, r.stderr
    assert "br-kvm: created bridge br-kvm" in r.stdout
    names = [b.name for b in bridge_report()]
    assert "br-kvm" in names
