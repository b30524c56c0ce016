"""The guest's serial console, line by line, for the journal: pure logic
(no I/O, the clock passed in), so the supervisor only sends what it returns.

- Lines end at "\\n"; a trailing "\\r" and terminal escape sequences are
  dropped from the journal copy (viewers get the bytes as they are).
- A partial line (a shell prompt, a progress bar) is logged once it has
  waited PARTIAL_FLUSH seconds for the rest, or reached MAX_LINE bytes: the
  journal shows what the guest printed even when no newline follows.
- Rate limit, like journald's RateLimitIntervalSec=/RateLimitBurst=: at
  most `burst` lines per `interval`; lines beyond that are counted, not
  logged, and one message says how many were dropped when the interval
  ends.  A guest printing as fast as it can costs the journal `burst` lines
  per interval, and kvmagent's own messages are never dropped."""

from __future__ import annotations

import re

PARTIAL_FLUSH = 0.5  # seconds a partial line waits for its end
MAX_LINE = 4096  # bytes; a longer line is logged in pieces

# Terminal escape sequences (busybox ash asks for the cursor position with
# ESC[6n after every prompt) and other control characters make the journal
# store a line as a blob; they are dropped from the journal copy only.
_ESCAPES = re.compile(rb"\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07]*\x07|[()][0-9A-Za-z]|[@-~])")
_CONTROLS = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")


def console_text(line: bytes) -> bytes:
    return _CONTROLS.sub(b"", _ESCAPES.sub(b"", line.rstrip(b"\r")))


class ConsoleLog:
    def __init__(self, burst: int = 1000, interval: float = 10.0) -> None:
        self.burst = burst  # lines per interval; 0: console lines are not logged
        self.interval = interval  # seconds
        self.buffer = b""
        self.partial_since: float | None = None  # when the unfinished line began
        self.window_start = 0.0
        self.logged = 0  # lines logged in this window
        self.dropped = 0  # lines dropped in this window
        self.total_dropped = 0

    def feed(self, data: bytes, now: float) -> tuple[list[bytes], int]:
        """The console's bytes in; the lines to log out, and the number of
        lines dropped in an interval that has just ended (to report)."""
        report = self._roll(now)
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        while len(self.buffer) >= MAX_LINE:
            lines.append(self.buffer[:MAX_LINE])
            self.buffer = self.buffer[MAX_LINE:]
        if not self.buffer:
            self.partial_since = None
        elif self.partial_since is None or lines:
            self.partial_since = now
        return self._limit(lines), report

    def tick(self, now: float) -> tuple[list[bytes], int]:
        """Called when deadline() has passed: flush a partial line that has
        waited long enough; report the drops of an interval that ended."""
        report = self._roll(now)
        lines: list[bytes] = []
        if self.buffer and self.partial_since is not None and \
                now - self.partial_since >= PARTIAL_FLUSH:
            lines, self.buffer, self.partial_since = [self.buffer], b"", None
        return self._limit(lines), report

    def flush(self, now: float) -> tuple[list[bytes], int]:
        """At the end: whatever is left, and the drops not yet reported."""
        lines = [self.buffer] if self.buffer else []
        self.buffer, self.partial_since = b"", None
        out = self._limit(lines)
        report, self.dropped = self.dropped, 0
        return out, report

    def deadline(self) -> float | None:
        """When tick() has something to do, if nothing arrives before."""
        times = []
        if self.partial_since is not None:
            times.append(self.partial_since + PARTIAL_FLUSH)
        if self.dropped:
            times.append(self.window_start + self.interval)
        return min(times) if times else None

    def _roll(self, now: float) -> int:
        if now - self.window_start < self.interval:
            return 0
        report, self.dropped = self.dropped, 0
        self.window_start, self.logged = now, 0
        return report

    def _limit(self, lines: list[bytes]) -> list[bytes]:
        room = max(0, self.burst - self.logged)
        keep = lines[:room]
        self.logged += len(keep)
        self.dropped += len(lines) - len(keep)
        self.total_dropped += len(lines) - len(keep)
        return [console_text(line) for line in keep]
