from kvmagent.supervisor import console_text


def test_escapes_and_controls_are_dropped():
    assert console_text(b"guest# \x1b[6nGUEST-POWERBUTTON\r") == b"guest# GUEST-POWERBUTTON"
    assert console_text(b"\x1bc\x1b[?7l\x1b[2Jhello") == b"hello"
    assert console_text(b"a\tb\x07c") == b"a\tbc"
    assert console_text("grüße".encode()) == "grüße".encode()
