"""The benchmarks' tables (bench/report.py): medians and spread in ms,
ratios, goals met or missed by how much, Markdown tables."""

from __future__ import annotations

from bench.report import Goal, median_ms, ratio, spread_ms, table


def test_median_and_spread_in_ms() -> None:
    samples = [0.300, 0.250, 0.410]
    assert median_ms(samples) == 300
    assert spread_ms(samples) == "250–410"


def test_ratio() -> None:
    assert ratio(300, 500) == "0.60×"
    assert ratio(300, 0) == "-"


def test_goal_met_or_missed_by_how_much() -> None:
    twice = Goal(0.5, "≥ 2× faster than virsh start")
    assert twice.verdict(240, 500) == "met (≥ 2× faster than virsh start)"
    assert twice.verdict(250, 500).startswith("met")  # the limit itself is met
    # 300 ms against 500: 1.67× faster, 1.20× short of 2×
    assert twice.verdict(300, 500) == "missed by 1.20× (≥ 2× faster than virsh start)"
    within = Goal(1.1, "within 1.1× of bare QEMU")
    assert within.verdict(330, 300).startswith("met")
    assert within.verdict(363, 300).startswith("missed by 1.10×")


def test_markdown_table_padded() -> None:
    out = table(["", "median"], [["bare QEMU", "77"], ["`virsh start g`", "512"]])
    assert out.splitlines() == [
        "|                 | median |",
        "|-----------------|--------|",
        "| bare QEMU       | 77     |",
        "| `virsh start g` | 512    |",
    ]
