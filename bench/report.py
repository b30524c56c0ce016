"""The benchmarks' tables: medians, spread and ratios of samples, and goals
as ratios, printed as Markdown tables (docs/benchmarks.md takes them as
printed).  Pure: tests/unit/test_bench_report.py."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def median_ms(samples: Sequence[float]) -> float:
    return statistics.median(samples) * 1000


def spread_ms(samples: Sequence[float]) -> str:
    """min–max of the samples, in ms."""
    return f"{min(samples) * 1000:.0f}–{max(samples) * 1000:.0f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "-"


@dataclass(frozen=True)
class Goal:
    """At most LIMIT × the reference (kvmagent/libvirt ≤ 0.5: "2× faster")."""
    limit: float
    text: str  # as the issue says it

    def verdict(self, value: float, reference: float) -> str:
        r = value / reference
        if r <= self.limit:
            return f"met ({self.text})"
        return f"missed by {r / self.limit:.2f}× ({self.text})"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, columns padded so that it reads in a terminal too."""
    cells = [list(header), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])
