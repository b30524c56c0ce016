import pytest

from kvmagent.config import values


@pytest.mark.parametrize("text,expected", [
    ("512M", 512 << 20), ("1G", 1 << 30), ("2T", 2 << 40), ("4096K", 4 << 20),
    ("1GiB", 1 << 30), ("1g", 1 << 30), ("100", 100), ("0M", 0),
])
def test_sizes(text, expected):
    assert values.parse_size(text) == expected


@pytest.mark.parametrize("bad", [1024, True, "1.5G", "1X", "", "G", "-1M", None])
def test_bad_sizes(bad):
    with pytest.raises(ValueError):
        values.parse_size(bad)


def test_format_size():
    assert values.format_size(1 << 30) == "1G"
    assert values.format_size(1536 << 20) == "1536M"
    assert values.format_size(100) == "100B"


@pytest.mark.parametrize("text,expected", [
    ("90s", 90), ("5min", 300), ("1min 30s", 90), ("500ms", 0.5), (30, 30), ("2h", 7200),
    ("1d", 86400), ("45", 45),
])
def test_durations(text, expected):
    assert values.parse_duration(text) == expected


@pytest.mark.parametrize("bad", ["5 lightyears", "", "s", True, -3, "1min x", [1]])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        values.parse_duration(bad)


def test_cpu_lists():
    assert values.parse_cpu_list("0-3,6") == (0, 1, 2, 3, 6)
    assert values.parse_cpu_list([3, 1, 1]) == (1, 3)
    assert values.format_cpu_list((0, 1, 2, 3, 6, 8, 9)) == "0-3,6,8-9"
    for bad in ("3-1", "a", "", [True], "1,,2"):
        with pytest.raises(ValueError):
            values.parse_cpu_list(bad)


def test_mac():
    assert values.parse_mac("00:1A:4A:00:8E:30") == "00:1a:4a:00:8e:30"
    for bad in ("01:00:5e:00:00:01", "00:00:00:00:00:00", "52:54:00:12:34", "zz:54:00:12:34:56"):
        with pytest.raises(ValueError):
            values.parse_mac(bad)


def test_escape():
    assert values.parse_escape("^]") == "\x1d"
    assert values.parse_escape("^Q") == "\x11"
    assert values.parse_escape("^q") == "\x11"
    for bad in ("]", "^", "^1", "ctrl-q"):
        with pytest.raises(ValueError):
            values.parse_escape(bad)
