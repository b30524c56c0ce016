"""open_tap() against the real kernel, in a fresh netns per test."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from pyroute2 import IPRoute

from kvmagent.host import netdev, tundev
from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.host.bridge import bridge_report, ensure_bridge
from kvmagent.host.netlink import IFF_UP, info_data, link_kind
from kvmagent.names import tap_name

pytestmark = pytest.mark.net

IFF_LOWER_UP = 0x10000


def _get(ipr: IPRoute, name: str):
    found = ipr.link_lookup(ifname=name)
    return ipr.get_links(found[0])[0] if found else None


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def test_open_tap(netns, ipr, bridge):
    fds = netdev.open_tap("kvm-web-0", bridge)
    try:
        assert len(fds) == 1 and not os.get_inheritable(fds[0])
        tap, br = _get(ipr, "kvm-web-0"), _get(ipr, bridge)
        assert link_kind(tap) == "tun"
        data = info_data(tap)
        assert data["IFLA_TUN_TYPE"] == 2 and data["IFLA_TUN_VNET_HDR"] == 1
        assert data["IFLA_TUN_PI"] == 0 and data["IFLA_TUN_PERSIST"] == 0
        assert tap.get_attr("IFLA_MASTER") == br["index"]
        assert tap["flags"] & IFF_UP
        assert tap.get_attr("IFLA_MTU") == 1400 == br.get_attr("IFLA_MTU")
        mac = tap.get_attr("IFLA_ADDRESS")
        assert mac.startswith("fe:") and mac == netdev.tap_mac("kvm-web-0")
        assert tap.get_attr("IFLA_IFALIAS") == netdev.TAP_ALIAS
        assert br.get_attr("IFLA_ADDRESS") != mac  # the bridge did not adopt it
    finally:
        _close(fds)
    assert _get(ipr, "kvm-web-0") is None  # gone with its last fd


def test_tap_mac_is_deterministic():
    assert netdev.tap_mac("kvm-a-0") == netdev.tap_mac("kvm-a-0") != netdev.tap_mac("kvm-a-1")
    first = int(netdev.tap_mac("kvm-a-0")[:2], 16)
    assert first == 0xFE and first & 2 and not first & 1  # local, unicast


def test_no_vnet_hdr(netns, ipr, bridge):
    fds = netdev.open_tap("kvm-web-0", bridge, vnet_hdr=False)
    try:
        assert info_data(_get(ipr, "kvm-web-0"))["IFLA_TUN_VNET_HDR"] == 0
    finally:
        _close(fds)


def test_multiqueue(netns, ipr, bridge):
    fds = netdev.open_tap("kvm-web-0", bridge, queues=4)
    try:
        assert len(set(fds)) == 4
        assert ipr.link_lookup(ifname="kvm-web-0") and len(
            [l for l in ipr.get_links() if l.get_attr("IFLA_IFNAME") == "kvm-web-0"]) == 1
        data = info_data(_get(ipr, "kvm-web-0"))
        assert data["IFLA_TUN_MULTI_QUEUE"] == 1 and data["IFLA_TUN_NUM_QUEUES"] == 4
        _close(fds[:3])
        assert _get(ipr, "kvm-web-0") is not None  # one queue still holds it
        fds = fds[3:]
    finally:
        _close(fds)
    assert _get(ipr, "kvm-web-0") is None


def test_twenty_guests_concurrently(netns, ipr, bridge):
    names = [tap_name(f"guest{i}", 0) for i in range(20)]
    start = threading.Barrier(20)

    def one(name: str) -> list[int]:
        start.wait()
        return netdev.open_tap(name, bridge, queues=2)

    with ThreadPoolExecutor(20) as pool:  # threads inherit the test's netns
        results = list(pool.map(one, names))
    try:
        br = _get(ipr, bridge)
        ports = [l for l in ipr.get_links() if l.get_attr("IFLA_MASTER") == br["index"]]
        assert sorted(p.get_attr("IFLA_IFNAME") for p in ports) == sorted(names)
        assert len({p.get_attr("IFLA_ADDRESS") for p in ports}) == 20
        assert len({fd for fds in results for fd in fds}) == 40
    finally:
        for fds in results:
            _close(fds)
    assert not any(_get(ipr, n) for n in names)


def test_foreign_interface_is_not_taken_over(netns, ipr, bridge, add_dummy):
    kind = add_dummy(ipr, "kvm-web-0")
    before = _get(ipr, "kvm-web-0")
    with pytest.raises(KvmagentError, match=f"kvm-web-0 already exists and is a {kind}") as err:
        netdev.open_tap("kvm-web-0", bridge)
    assert err.value.hint and "does not take over" in err.value.hint
    after = _get(ipr, "kvm-web-0")
    assert after["index"] == before["index"] and link_kind(after) == kind
    assert not after.get_attr("IFLA_MASTER")
    assert not [l for l in ipr.get_links() if link_kind(l) == "tun"]


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "tun"}, "is a tun device"),
    ({"mode": "tap", "uid": 1000}, "belongs to uid 1000"),
])
def test_foreign_tuntap_is_not_taken_over(netns, ipr, bridge, kwargs, match):
    ipr.link("add", ifname="kvm-web-0", kind="tuntap", **kwargs)
    index = _get(ipr, "kvm-web-0")["index"]
    with pytest.raises(KvmagentError, match=match):
        netdev.open_tap("kvm-web-0", bridge)
    assert _get(ipr, "kvm-web-0")["index"] == index


def test_stale_persistent_tap_is_replaced(netns, ipr, bridge):
    ipr.link("add", ifname="kvm-web-0", kind="tuntap", mode="tap")
    stale = _get(ipr, "kvm-web-0")["index"]
    fds = netdev.open_tap("kvm-web-0", bridge)
    try:
        tap = _get(ipr, "kvm-web-0")
        assert tap["index"] != stale
        assert info_data(tap)["IFLA_TUN_PERSIST"] == 0
        assert tap.get_attr("IFLA_MASTER") == _get(ipr, bridge)["index"]
    finally:
        _close(fds)
    assert _get(ipr, "kvm-web-0") is None


def test_tap_in_use_is_refused(netns, ipr, bridge):
    fds = netdev.open_tap("kvm-web-0", bridge, queues=2)
    try:
        for queues in (1, 2):
            with pytest.raises(KvmagentError, match="in use by another kvmagent QEMU"):
                netdev.open_tap("kvm-web-0", bridge, queues=queues)
        assert info_data(_get(ipr, "kvm-web-0"))["IFLA_TUN_NUM_QUEUES"] == 2
    finally:
        _close(fds)


def _blind_first_lookup(monkeypatch) -> None:
    """Make open_tap's existence check miss once: as if another process made
    the tap between that check and TUNSETIFF."""
    real, calls = netdev._index, []

    def index(name: str):
        calls.append(name)
        return None if len(calls) == 1 else real(name)
    monkeypatch.setattr(netdev, "_index", index)


def test_race_with_a_persistent_tap(netns, ipr, bridge, monkeypatch):
    ipr.link("add", ifname="kvm-web-0", kind="tuntap", mode="tap")
    index = _get(ipr, "kvm-web-0")["index"]
    _blind_first_lookup(monkeypatch)
    with pytest.raises(KvmagentError, match="in use by another process"):
        netdev.open_tap("kvm-web-0", bridge)
    tap = _get(ipr, "kvm-web-0")
    assert tap["index"] == index and not tap.get_attr("IFLA_MASTER")


def test_race_with_a_multiqueue_tap(netns, ipr, bridge, monkeypatch):
    held = netdev.open_tap("kvm-web-0", bridge, queues=2)
    try:
        _blind_first_lookup(monkeypatch)
        with pytest.raises(KvmagentError, match="in use by another process"):
            netdev.open_tap("kvm-web-0", bridge, queues=2)
        assert info_data(_get(ipr, "kvm-web-0"))["IFLA_TUN_NUM_QUEUES"] == 2
    finally:
        _close(held)


def test_missing_bridge(netns, ipr):
    with pytest.raises(KvmagentError) as err:
        netdev.open_tap("kvm-web-0", "br-missing")
    assert "br-missing" in err.value.message
    assert err.value.status == ExitStatus.HOST_NOT_READY
    assert "kvmagent bridge ensure br-missing" in err.value.hint
    assert _get(ipr, "kvm-web-0") is None


def test_not_a_bridge(netns, ipr, add_dummy):
    kind = add_dummy(ipr, "br-kvm")
    with pytest.raises(KvmagentError, match=f"br-kvm is a {kind} interface, not a bridge"):
        netdev.open_tap("kvm-web-0", "br-kvm")
    assert _get(ipr, "kvm-web-0") is None


def test_missing_dev_net_tun(netns, ipr, bridge, tmp_path, monkeypatch):
    monkeypatch.setattr(tundev, "TUN_PATH", str(tmp_path / "tun"))
    with pytest.raises(KvmagentError, match="tun is missing") as err:
        netdev.open_tap("kvm-web-0", bridge)
    assert err.value.status == ExitStatus.HOST_NOT_READY and "modprobe tun" in err.value.hint
    assert _get(ipr, "kvm-web-0") is None


def test_failure_after_attach_leaves_nothing(netns, ipr, bridge, monkeypatch):
    fds_seen: list[int] = []
    real_attach = netdev._attach

    def attach(fd: int, name: str, flags: int) -> None:
        real_attach(fd, name, flags)
        fds_seen.append(fd)
        if len(fds_seen) == 3:
            raise KvmagentError("injected")

    monkeypatch.setattr(netdev, "_attach", attach)
    with pytest.raises(KvmagentError, match="injected"):
        netdev.open_tap("kvm-web-0", bridge, queues=4)
    assert _get(ipr, "kvm-web-0") is None
    for fd in fds_seen:
        with pytest.raises(OSError):
            os.fstat(fd)


@pytest.mark.parametrize("name", ["", "kvm-sixteen-byte", "kvm/a", "kvm a", "kvm:0"])
def test_bad_tap_name(netns, ipr, bridge, name):
    with pytest.raises(KvmagentError) as err:
        netdev.open_tap(name, bridge)
    assert err.value.status == ExitStatus.CONFIG


def test_long_guest_names(netns, ipr, bridge):
    guests = ["a-very-long-guest-name-indeed", "a-very-long-guest-name-too", "web"]
    names = [tap_name(g, i) for g in guests for i in (0, 1, 10)]
    assert len(set(names)) == len(names)
    assert all(len(n.encode()) <= 15 for n in names)
    fds = [fd for n in names for fd in netdev.open_tap(n, bridge)]
    try:
        assert all(_get(ipr, n) is not None for n in names)
    finally:
        _close(fds)


def test_explicit_netns_argument(netns, ipr, other_netns):
    """netns= runs the netlink calls and the tun open in another namespace,
    for this thread only; the caller stays where it was."""
    here = os.stat("/proc/thread-self/ns/net").st_ino
    assert ensure_bridge(netns=other_netns)[0] == "created bridge br-kvm"
    fds = netdev.open_tap("kvm-web-0", "br-kvm", netns=other_netns)
    try:
        assert os.stat("/proc/thread-self/ns/net").st_ino == here
        assert _get(ipr, "kvm-web-0") is None and _get(ipr, "br-kvm") is None
        (br,) = bridge_report(netns=other_netns)
        assert [p.name for p in br.ports] == ["kvm-web-0"]
    finally:
        _close(fds)
    assert bridge_report(netns=other_netns)[0].ports == ()


def test_unknown_netns(netns):
    with pytest.raises(KvmagentError, match="network namespace nope-4711 does not exist"):
        bridge_report(netns="nope-4711")


def test_vhost_fd():
    fd = tundev.vhost_fd()
    if os.path.exists(tundev.VHOST_NET_PATH):
        assert fd is not None and not os.get_inheritable(fd)
        os.close(fd)
    else:
        assert fd is None
