"""Fixtures for tests/net: real kernel, one fresh network namespace per test.

The `netns` fixture creates a namespace, moves the test's thread into it for
the whole test body (in_netns, i.e. setns(2) on this thread only), and
deletes it afterwards even if the test failed.  Everything a test does with
netlink, /dev/net/tun or a subprocess therefore happens inside it, even a call
that forgets netns=; threads and processes started by the test inherit it.
Deleting the namespace also deletes whatever interfaces a failed test left.
"""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from kvmagent.host.bridge import ensure_bridge
from kvmagent.host.netlink import in_netns, NETNS_DIR

NOT_ROOT = ("NOT RUN: tests/net needs root (network namespaces, taps, bridges); "
            "run it as root: /usr/bin/python3 -m pytest -m net tests/net")

_counter = itertools.count()
_skipped: list[str] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    for item in items:
        if "netns" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.skip(reason=NOT_ROOT))
            _skipped.append(item.nodeid)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _skipped:
        terminalreporter.write_sep("!", f"{len(_skipped)} tests/net tests NOT RUN: not root",
                                   red=True, bold=True)
        terminalreporter.write_line(NOT_ROOT)


def _ns_inode(path: str = "/proc/thread-self/ns/net") -> int:
    return os.stat(path).st_ino


def _new_netns() -> str:
    name = f"kvmagent-test-{os.getpid()}-{next(_counter)}"
    pr_netns.create(name)
    return name


def _add_dummy(ipr: IPRoute, name: str) -> str:
    try:
        ipr.link("add", ifname=name, kind="dummy")
        return "dummy"
    except NetlinkError as e:
        if e.code != errno.EOPNOTSUPP:
            raise
    ipr.link("add", ifname=name, kind="ifb")
    return "ifb"


@pytest.fixture
def add_dummy() -> Callable[[IPRoute, str], str]:
    """add_dummy(ipr, name) -> kind: a plain non-tap interface NAME, a dummy or,
    where the kernel has no dummy driver (this CI kernel lacks CONFIG_DUMMY),
    an ifb."""
    return _add_dummy


@pytest.fixture
def netns() -> Iterator[str]:
    host = _ns_inode()
    name = _new_netns()
    try:
        inode = _ns_inode(f"{NETNS_DIR}/{name}")
        assert inode != host
        with in_netns(name):
            assert _ns_inode() == inode, "the test thread is not in its namespace"
            yield name
        assert _ns_inode() == host, "the test thread did not come back"
    finally:
        pr_netns.remove(name)


@pytest.fixture
def ipr(netns: str) -> Iterator[IPRoute]:
    with IPRoute() as ipr:  # opened inside the test namespace
        yield ipr


@pytest.fixture
def bridge(netns: str, ipr: IPRoute) -> str:
    """br-kvm with the seed's settings and MTU 1400 (so a copied MTU shows)."""
    ensure_bridge("br-kvm")
    ipr.link("set", index=ipr.link_lookup(ifname="br-kvm")[0], mtu=1400)
    return "br-kvm"


@pytest.fixture
def other_netns(netns: str) -> Iterator[str]:
    """A second fresh namespace (not entered), deleted afterwards."""
    name = _new_netns()
    try:
        yield name
    finally:
        if name in pr_netns.listnetns():
            pr_netns.remove(name)
