"""What the benchmarks share for printing their tables."""

from __future__ import annotations


def fmt(value: float) -> str:
    """A number with three significant figures or so, aligned by the caller."""
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"
