"""--transport of `kvmagent migrate` (kvmagent.render.transport): the
option's forms, the address the destination listens on, the warning."""

from __future__ import annotations

import pytest

from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.render.transport import (Transport, endpoint, listen_address, parse_transport,
                                       warning)


@pytest.mark.parametrize("text, want", [
    ("ssh", Transport("ssh")),
    ("tcp", Transport("tcp")),
    ("tcp:10.9.0.2", Transport("tcp", address="10.9.0.2")),
    ("tcp:10.9.0.2:4444", Transport("tcp", address="10.9.0.2", port=4444)),
    ("tcp:10.9.0.0/24", Transport("tcp", network="10.9.0.0/24")),
    ("tcp:10.9.0.7/24:4444", Transport("tcp", network="10.9.0.0/24", port=4444)),
    ("tcp:fd00::2", Transport("tcp", address="fd00::2")),
    ("tcp:[fd00::2]:4444", Transport("tcp", address="fd00::2", port=4444)),
    ("tcp:[fd00::2]", Transport("tcp", address="fd00::2")),
    ("tcp:fd00::/64", Transport("tcp", network="fd00::/64")),
    ("tcp:[fd00::/64]:65535", Transport("tcp", network="fd00::/64", port=65535)),
])
def test_the_forms_and_back(text: str, want: Transport) -> None:
    assert parse_transport(text) == want
    assert parse_transport(str(want)) == want  # what migrate-incoming is given


@pytest.mark.parametrize("text, why", [
    ("", "not a transport"), ("udp", "not a transport"), ("tcp:", "not a transport"),
    ("rsh:1.2.3.4", "not a transport"), ("tcp:host1", "neither an IP address"),
    ("tcp:host1:4444", "neither an IP address"), ("tcp:10.9.0.2:0", "port '0'"),
    ("tcp:10.9.0.2:65536", "port '65536'"), ("tcp:10.9.0.2:x", "port 'x'"),
    ("tcp:10.9.0.2:", "port ''"), ("tcp:[fd00::2", "no ']'"), ("tcp:[fd00::2]:", "no port"),
    ("tcp:[fd00::2]4444", "no ']'"), ("tcp:10.9.0.0/33", "neither"),
    ("tcp:-oProxyCommand=x", "neither"), ("tcp:10.9.0.2:٤٤", "port"),
])
def test_bad_forms_are_usage_errors_naming_the_value(text: str, why: str) -> None:
    with pytest.raises(KvmagentError) as e:
        parse_transport(text)
    assert e.value.status == ExitStatus.USAGE
    assert repr(text) in e.value.message and why in e.value.message, e.value.message
    assert "tcp:CIDR[:PORT]" in (e.value.hint or "")


LOCAL = ["192.168.1.5", "10.9.0.2", "fd00::2", "10.9.1.2"]


def test_where_the_destination_listens() -> None:
    ssh_conn = "10.79.20.1 51234 10.79.20.2 22"
    assert listen_address(parse_transport("tcp"), LOCAL, ssh_conn) == "10.79.20.2"
    assert listen_address(parse_transport("tcp"), LOCAL, "::ffff:10.79.20.1 1 ::ffff:10.79.20.2 22") \
        == "10.79.20.2"
    assert listen_address(parse_transport("tcp:10.9.0.2"), LOCAL, ssh_conn) == "10.9.0.2"
    assert listen_address(parse_transport("tcp:10.9.0.0/24"), LOCAL, ssh_conn) == "10.9.0.2"
    assert listen_address(parse_transport("tcp:10.9.0.0/16:99"), LOCAL, None) == "10.9.0.2"
    assert listen_address(parse_transport("tcp:fd00::/8"), LOCAL, None) == "fd00::2"
    assert listen_address(parse_transport("tcp:fd00:0::2"), LOCAL, None) == "fd00::2"


@pytest.mark.parametrize("text, ssh_conn, said", [
    ("tcp:10.9.0.3", None, "10.9.0.3 is not an address of this host (it has: 192.168.1.5,"),
    ("tcp:172.16.0.0/12", None, "no address in 172.16.0.0/12 (it has: 192.168.1.5,"),
    ("tcp", None, "SSH_CONNECTION is not set"),
    ("tcp", "garbage", "SSH_CONNECTION is not set"),
])
def test_no_address_to_listen_on_is_said(text: str, ssh_conn: str | None, said: str) -> None:
    with pytest.raises(KvmagentError) as e:
        listen_address(parse_transport(text), LOCAL, ssh_conn)
    assert e.value.status == ExitStatus.HOST_NOT_READY and said in e.value.message


def test_the_warning_is_loud() -> None:
    text = warning("web", "fd00::2", 4444)
    assert text.startswith("WARNING: guest web's memory") and "UNENCRYPTED" in text
    assert "[fd00::2]:4444" in text and endpoint("10.9.0.2", 1) == "10.9.0.2:1"
