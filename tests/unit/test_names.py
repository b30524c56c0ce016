import pytest

from kvmagent import names


def test_guest_names():
    for good in ("arkani", "a", "web-01", "x" * 64):
        assert names.valid_guest_name(good), good
    for bad in ("", "Arkani", "-a", "a-", "a_b", "a.b", "a b", "../etc", "a/b", "x" * 65,
                "a--b", "kvm@x", "é"):
        assert not names.valid_guest_name(bad), bad


def test_tap_names_fit_ifnamsiz_and_differ():
    seen = set()
    for name in ("arkani", "a", "averyveryverylongguestname", "averyveryverylongguestnamf",
                 "x" * 64, "arkani-net"):
        for i in range(16):
            tap = names.tap_name(name, i)
            assert len(tap.encode()) <= names.IFNAMSIZ, tap
            assert tap.startswith("kvm-")
            assert tap not in seen
            seen.add(tap)
    assert names.tap_name("arkani", 0) == "kvm-arkani-0"


def test_stable_derived_values():
    assert names.default_mac("arkani", 0) == names.default_mac("arkani", 0)
    assert names.default_mac("arkani", 0) != names.default_mac("arkani", 1)
    assert names.default_mac("arkani", 0).startswith("52:54:00:")
    assert names.guest_uuid("arkani") == "20d98c52-8d0a-51c1-adf5-3042f4c1495e"
    assert names.service_unit("arkani") == "kvm@arkani.service"
    assert names.scope_unit("arkani") == "kvm-arkani.scope"


@pytest.mark.parametrize("name, guest", [
    ("kvm-web-0", "web"), ("kvm-db-cafe-0", "db-cafe"), ("kvm-a-b-c-3", "a-b-c"),
    ("kvm-db-cafe-12", "?"),  # could be a hashed long name as well: ambiguous
    ("eth0", None), ("kvm-x", "?"), ("kvm-Web-0", "?"),
])
def test_tap_guest(name: str, guest: str | None) -> None:
    assert names.tap_guest(name) == guest


def test_tap_guest_hashed_names() -> None:
    for guest in ("verylongname", "another-very-long-guest", "web-frontend-number-7"):
        for index in (0, 3, 12):
            name = names.tap_name(guest, index)
            assert len(name.encode()) <= 15
            assert names.tap_guest(name) == "?"
            assert names.tap_guest(name, {name: guest}) == guest
