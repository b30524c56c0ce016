"""ensure_bridge() and bridge_report() against the real kernel, in a fresh netns."""

from __future__ import annotations

import os

import pytest
from pyroute2 import IPRoute

from kvmagent.host import netdev
from kvmagent.host.bridge import bridge_report, ensure_bridge
from kvmagent.host.netlink import IFF_UP, info_data
from kvmagent.errors import ExitStatus, KvmagentError

pytestmark = pytest.mark.net


def _get(ipr: IPRoute, name: str):
    found = ipr.link_lookup(ifname=name)
    return ipr.get_links(found[0])[0] if found else None


def _br_data(ipr: IPRoute, name: str) -> dict:
    return info_data(_get(ipr, name))


def test_ensure_bridge_creates_with_seed_settings_and_is_idempotent(netns, ipr):
    assert ensure_bridge() == ["created bridge br-kvm", "set up"]
    data = _br_data(ipr, "br-kvm")
    # Read back in the kernel's unit: clock_t, centiseconds.
    assert data["IFLA_BR_STP_STATE"] == 0
    assert data["IFLA_BR_FORWARD_DELAY"] == 900
    assert data["IFLA_BR_HELLO_TIME"] == 200
    assert data["IFLA_BR_MAX_AGE"] == 1200
    assert _get(ipr, "br-kvm")["flags"] & IFF_UP
    assert ensure_bridge() == []


def test_ensure_bridge_adjusts_an_existing_bridge(netns, ipr):
    ipr.link("add", ifname="br-kvm", kind="bridge")  # kernel defaults: 15 s, 2 s, 20 s
    assert ensure_bridge() == ["set forward_delay 9 s", "set max_age 12 s", "set up"]
    assert ensure_bridge(stp=True, hello_time=1.5) == [
        "set stp on", "set hello_time 1.5 s"]
    data = _br_data(ipr, "br-kvm")
    assert (data["IFLA_BR_STP_STATE"], data["IFLA_BR_HELLO_TIME"]) == (1, 150)
    assert ensure_bridge(stp=True, hello_time=1.5) == []


def test_ensure_bridge_uplink_and_address(netns, ipr):
    ipr.link("add", ifname="eth-up", kind="veth", peer="eth-peer")
    changes = ensure_bridge(uplink="eth-up", address="10.0.0.1/24")
    assert changes == ["created bridge br-kvm", "enslaved eth-up", "set eth-up up",
                       "added address 10.0.0.1/24", "set up"]
    br = _get(ipr, "br-kvm")
    assert _get(ipr, "eth-up").get_attr("IFLA_MASTER") == br["index"]
    assert [(a.get_attr("IFA_ADDRESS"), a["prefixlen"])
            for a in ipr.get_addr(index=br["index"], family=2)] == [("10.0.0.1", 24)]
    assert ensure_bridge(uplink="eth-up", address="10.0.0.1/24") == []
    assert ensure_bridge(address="fd00::1/64") == ["added address fd00::1/64"]
    assert ensure_bridge(address="fd00::1/64") == []
    # the same IP with another prefix: changed, not a second address (nor EEXIST)
    assert ensure_bridge(address="10.0.0.1/16") == [
        "changed address 10.0.0.1/24 to 10.0.0.1/16"]
    assert ensure_bridge(address="fd00::1/56") == [
        "changed address fd00::1/64 to fd00::1/56"]
    assert sorted((a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                  for a in ipr.get_addr(index=br["index"]) if a["scope"] == 0) == [
        ("10.0.0.1", 16), ("fd00::1", 56)]


def test_bridge_mac_does_not_follow_its_taps(netns, ipr):
    ensure_bridge()
    mac = _get(ipr, "br-kvm").get_attr("IFLA_ADDRESS")
    fds = netdev.open_tap("kvm-web-0", "br-kvm")
    assert _get(ipr, "br-kvm").get_attr("IFLA_ADDRESS") == mac
    for fd in fds:
        os.close(fd)
    assert _get(ipr, "br-kvm").get_attr("IFLA_ADDRESS") == mac


def test_bridge_with_uplink_keeps_the_uplink_mac(netns, ipr):
    ipr.link("add", ifname="eth-up", kind="veth", peer="eth-peer")
    ipr.link("set", index=_get(ipr, "eth-up")["index"], address="02:00:00:00:00:01")
    ensure_bridge(uplink="eth-up")
    uplink_mac = _get(ipr, "eth-up").get_attr("IFLA_ADDRESS")
    fds = netdev.open_tap("kvm-web-0", "br-kvm")
    try:
        assert _get(ipr, "br-kvm").get_attr("IFLA_ADDRESS") == uplink_mac
    finally:
        for fd in fds:
            os.close(fd)


def test_uplink_with_an_address_is_refused(netns, ipr):
    ipr.link("add", ifname="eth-up", kind="veth", peer="eth-peer")
    ipr.addr("add", index=_get(ipr, "eth-up")["index"], address="192.0.2.5", prefixlen=24)
    with pytest.raises(KvmagentError, match="eth-up carries 192.0.2.5/24") as err:
        ensure_bridge(uplink="eth-up")
    assert err.value.status == ExitStatus.HOST_NOT_READY
    assert not _get(ipr, "eth-up").get_attr("IFLA_MASTER")


def test_uplink_missing_or_taken(netns, ipr):
    with pytest.raises(KvmagentError, match="uplink eth9 of bridge br-kvm does not exist"):
        ensure_bridge(uplink="eth9")
    ipr.link("add", ifname="eth-up", kind="veth", peer="eth-peer")
    ensure_bridge("br-other", uplink="eth-up")
    with pytest.raises(KvmagentError, match="already belongs to br-other"):
        ensure_bridge(uplink="eth-up")


@pytest.mark.parametrize("address", ["10.0.0.1", "10.0.0.300/24", "10.0.0.0/24",
                                     "10.0.0.1/33", "bridge", "fd00::1/129"])
def test_bad_address_is_a_config_error(netns, ipr, address):
    with pytest.raises(KvmagentError) as err:
        ensure_bridge(address=address)
    assert err.value.status == ExitStatus.CONFIG
    assert address in err.value.message
    assert _get(ipr, "br-kvm") is None  # validated before anything changed


@pytest.mark.parametrize("kwargs", [{"forward_delay": 1}, {"hello_time": 11},
                                    {"max_age": 5}])
def test_timer_out_of_range(netns, ipr, kwargs):
    with pytest.raises(KvmagentError, match="out of range") as err:
        ensure_bridge(**kwargs)
    assert err.value.status == ExitStatus.CONFIG


def test_name_taken_by_a_non_bridge(netns, ipr, add_dummy):
    kind = add_dummy(ipr, "br-kvm")
    with pytest.raises(KvmagentError, match=f"br-kvm is a {kind} interface, not a bridge"):
        ensure_bridge()


def test_bridge_report(netns, ipr, bridge):
    from kvmagent.names import tap_name
    ipr.link("add", ifname="eth-up", kind="veth", peer="eth-peer")
    ensure_bridge(uplink="eth-up", address="10.0.0.1/24")
    long_guest = "a-rather-long-guest-name"
    fds = netdev.open_tap(tap_name("web", 0), bridge) + netdev.open_tap(
        tap_name(long_guest, 1), bridge)
    try:
        (br,) = bridge_report()
        assert (br.name, br.mtu, br.up, br.stp) == ("br-kvm", 1400, True, False)
        assert (br.forward_delay, br.hello_time, br.max_age) == (9, 2, 12)
        assert br.addresses == ("10.0.0.1/24",)
        ports = {p.name: p for p in br.ports}
        assert set(ports) == {"eth-up", "kvm-web-0", tap_name(long_guest, 1)}
        assert (ports["eth-up"].kvmagent_tap, ports["eth-up"].guest) == (False, None)
        assert ports["kvm-web-0"].kvmagent_tap and ports["kvm-web-0"].guest == "web"
        assert ports["kvm-web-0"].kind == "tun" and ports["kvm-web-0"].carrier
        assert ports[tap_name(long_guest, 1)].guest == "?"
        mapping = {tap_name(long_guest, 1): long_guest}
        (br,) = bridge_report(mapping)
        assert {p.name: p.guest for p in br.ports}[tap_name(long_guest, 1)] == long_guest
    finally:
        for fd in fds:
            os.close(fd)


def test_two_ensures_at_once_both_succeed(netns, ipr):
    """Two `bridge ensure` of the same new bridge at the same moment: the
    one that loses the race to create it adjusts it instead (it failed with
    "File exists" about one round in ten).  Two forked children, let go at
    once by one write (not a multiprocessing pool: its threads and its
    SIGTERM at the end made the test hang now and then)."""
    for _ in range(20):
        go_r, go_w = os.pipe()
        children = []
        for _ in range(2):
            out_r, out_w = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                try:
                    os.read(go_r, 1)
                    os.write(out_w, _ensure_quietly("br-race").encode())
                finally:
                    os._exit(0)
            os.close(out_w)
            children.append((pid, out_r))
        os.close(go_r)
        os.write(go_w, b"gg")  # one byte each
        os.close(go_w)
        results = []
        for pid, out_r in children:
            with os.fdopen(out_r, "rb") as out:
                results.append(out.read().decode())  # EOF when the child has exited
            os.waitpid(pid, 0)
        assert results == ["ok", "ok"], results
        ipr.link("del", ifname="br-race")


def _ensure_quietly(name: str) -> str:
    try:
        ensure_bridge(name)
        return "ok"
    except Exception as e:  # reported, so that the test says which
        return repr(e)


def test_an_ipv6_address_where_ipv6_is_disabled(netns, ipr):
    ensure_bridge("br6")
    with open("/proc/sys/net/ipv6/conf/br6/disable_ipv6", "w") as f:
        f.write("1")
    with pytest.raises(KvmagentError) as e:
        ensure_bridge("br6", address="fd00::1/64")
    assert e.value.status == ExitStatus.HOST_NOT_READY
    assert "IPv6 is disabled there (net.ipv6.conf.br6.disable_ipv6 = 1)" in e.value.message
