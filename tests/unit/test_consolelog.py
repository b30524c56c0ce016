"""The console's journal copy: escapes, partial lines, the rate limit
(kvmagent.unit.consolelog, pure, with the clock passed in)."""

from kvmagent.unit.consolelog import MAX_LINE, PARTIAL_FLUSH, ConsoleLog, console_text


def test_escape_sequences_and_controls_are_dropped() -> None:
    assert console_text(b"guest# \x1b[6nGUEST-POWERBUTTON\r") == b"guest# GUEST-POWERBUTTON"
    assert console_text(b"\x1bc\x1b[?7l\x1b[2Jhello") == b"hello"
    assert console_text(b"a\tb\x07c") == b"a\tbc"
    assert console_text("grüße".encode()) == "grüße".encode()


def test_lines_split_across_reads() -> None:
    log = ConsoleLog()
    assert log.feed(b"hel", 100.0) == ([], 0)
    assert log.feed(b"lo\r\nwor", 100.1) == ([b"hello"], 0)
    assert log.feed(b"ld\n", 100.2) == ([b"world"], 0)
    assert log.deadline() is None


def test_a_prompt_without_newline_is_logged_after_a_while() -> None:
    log = ConsoleLog()
    log.feed(b"boot done\n~ # ", 100.0)
    assert log.deadline() == 100.0 + PARTIAL_FLUSH
    assert log.tick(100.1) == ([], 0)  # too early
    assert log.tick(100.0 + PARTIAL_FLUSH) == ([b"~ # "], 0)
    assert log.deadline() is None
    # what is typed next starts a line of its own
    assert log.feed(b"uname\n", 101.0) == ([b"uname"], 0)


def test_a_partial_line_waits_from_its_first_byte() -> None:
    log = ConsoleLog()
    log.feed(b"a", 100.0)
    log.feed(b"b", 100.4)  # slow typing does not postpone the flush forever
    assert log.deadline() == 100.0 + PARTIAL_FLUSH


def test_an_endless_line_is_logged_in_pieces() -> None:
    log = ConsoleLog()
    lines, _ = log.feed(b"x" * (2 * MAX_LINE + 10), 100.0)
    assert lines == [b"x" * MAX_LINE] * 2
    assert log.flush(100.0) == ([b"x" * 10], 0)


def test_rate_limit_drops_and_reports_once_per_interval() -> None:
    log = ConsoleLog(burst=3, interval=10.0)
    lines, dropped = log.feed(b"".join(b"%d\n" % i for i in range(10)), 100.0)
    assert (lines, dropped) == ([b"0", b"1", b"2"], 0)
    assert log.feed(b"more\n", 105.0) == ([], 0)
    assert log.deadline() == 110.0  # the report is due when the interval ends
    assert log.tick(110.0) == ([], 8)  # 7 + "more"
    assert log.feed(b"again\n", 111.0) == ([b"again"], 0)
    assert log.total_dropped == 8


def test_the_report_comes_without_further_output_and_at_the_end() -> None:
    log = ConsoleLog(burst=1, interval=10.0)
    log.feed(b"a\nb\nc\n", 100.0)
    assert log.flush(101.0) == ([], 2)
    assert log.flush(102.0) == ([], 0)


def test_burst_zero_logs_nothing() -> None:
    log = ConsoleLog(burst=0)
    assert log.feed(b"a\nb\n", 100.0) == ([], 0)
    assert log.flush(100.0) == ([], 2)


def test_the_catalog_explains_every_message_id() -> None:
    """catalog/kvmagent.catalog has one entry per MSG_* of the supervisor
    (kvmagent.unit.messages) and of the state database's file (a damaged one moved aside)."""
    import re
    from pathlib import Path

    from kvmagent.host import statefile
    from kvmagent.unit import messages
    ids = {v for module in (messages, statefile) for k, v in vars(module).items()
           if k.startswith("MSG_")}
    text = (Path(__file__).parents[2] / "catalog" / "kvmagent.catalog").read_text()
    entries = re.findall(r"^-- ([0-9a-f]{32})\nSubject: .+\nDefined-By: kvmagent\n", text, re.M)
    assert sorted(entries) == sorted(ids)
    assert len(entries) == len(set(entries))
