"""The console's copy in the journal, from the real tiny guest under the real
supervisor (without systemd, the journal copy goes to stderr as "<6>LINE"):
a prompt without a newline still appears, viewers coming and going lose no
line, and a guest printing as fast as it can is rate-limited while the
supervisor stays responsive."""

from __future__ import annotations

import re
import signal
import socket
import time

import pytest

from tests.net.test_supervisor import read_until, supervising, write_guest

pytestmark = [pytest.mark.net, pytest.mark.qemu]


@pytest.fixture(scope="module")
def image(guest_image):  # type: ignore[no-untyped-def]
    return guest_image


def type_in(sock_path, text: bytes) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock_path))
        s.sendall(text)
        time.sleep(0.2)


def test_prompt_is_logged_without_newline_and_viewers_lose_no_line(netns, image, tmp_path):
    etc = write_guest(tmp_path, image, tables="[console]\nlog_burst = 100000\n")
    seen: list[str] = []
    sock_path = tmp_path / "run" / "demo" / "console.sock"
    with supervising(tmp_path, etc) as proc:
        read_until(proc, "Enter 'help'", 90, seen)
        # busybox's prompt ends without a newline: logged after a short wait
        type_in(sock_path, b"PS1='PROMPT-$((40+2))> '\n")
        read_until(proc, "PROMPT-42> ", 10, seen)
        # a counter while viewers attach and leave all the time
        type_in(sock_path, b"i=0; while [ $i -lt 3000 ]; do echo COUNT-$i; i=$((i+1)); done;"
                           b" echo COUNT-$((1000*1000))\n")
        attaches = 0
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        while not any("COUNT-1000000" in line for line in seen) and time.monotonic() < deadline:
            with socket.socket(socket.AF_UNIX) as v:
                v.connect(str(sock_path))
                v.settimeout(1)
                try:
                    v.recv(100)
                except TimeoutError:
                    pass
                attaches += 1
            # a few lines per viewer: read all at once, a fast guest's output
            # would leave one viewer for the whole count
            for _ in range(100):
                if not (line := proc.stdout.readline()):
                    break
                seen.append(line)
        assert any("COUNT-1000000" in line for line in seen), seen[-20:]
        counts = [int(m.group(1)) for line in seen
                  if (m := re.fullmatch(r"<6>COUNT-(\d+)\n", line)) and int(m.group(1)) < 3000]
        assert counts == list(range(3000)), f"{len(counts)} lines, {attaches} attaches"
        assert attaches >= 5, "the viewers did not come and go while the guest counted"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(40) == 0
    print(f"3000 console lines, all logged, while viewers attached {attaches} times")


def test_flooding_guest_is_rate_limited_and_supervisor_responsive(netns, image, tmp_path):
    etc = write_guest(tmp_path, image,
                      tables='[console]\nlog_burst = 50\nlog_interval = "2s"\n')
    seen: list[str] = []
    sock_path = tmp_path / "run" / "demo" / "console.sock"
    with supervising(tmp_path, etc) as proc:
        read_until(proc, "Enter 'help'", 90, seen)
        time.sleep(2.1)  # a fresh interval
        before = len(seen)
        type_in(sock_path, b"while :; do echo FLOOD; done\n")
        # a viewer still gets the flood live, all of it
        with socket.socket(socket.AF_UNIX) as v:
            v.connect(str(sock_path))
            v.settimeout(5)
            got = b""
            while got.count(b"FLOOD\r\n") < 2000:
                chunk = v.recv(65536)  # each within 5 s, or TimeoutError
                assert chunk, f"the console closed after {got.count(b'FLOOD')} lines"
                got += chunk
        read_until(proc, "not logged", 10, seen)
        time.sleep(4)
        read_until(proc, "not logged", 10, seen)  # reported again, once per interval
        flooded = time.monotonic()
        # responsive: the ACPI power button still stops the guest promptly
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(40) == 0
        stopped = time.monotonic() - flooded
        rest = proc.stdout.read() if proc.stdout else ""
        seen += rest.splitlines(keepends=True)
    lines = seen[before:]
    logged = sum(1 for line in lines if line == "<6>FLOOD\n")
    reports = [line for line in lines if "console lines of guest demo not logged" in line]
    dropped = sum(int(re.match(r"<4>(\d+) ", line).group(1)) for line in reports)  # type: ignore[union-attr]
    intervals = len(reports) + 2
    print(f"flood: {logged} lines logged, {dropped} dropped, {len(reports)} reports; "
          f"stopped {stopped:.1f} s after SIGTERM")
    assert 50 <= logged <= 50 * intervals, lines[-20:]
    assert dropped > 10 * logged
    assert stopped < 20
