"""Spec-Bench's task groups and the benchmark's even pick of questions: shared by the benchmark
(which measures on the picked questions) and head training (which must leave them out)."""

from __future__ import annotations

MT_BENCH_CATEGORIES = (
    "writing",
    "roleplay",
    "reasoning",
    "math",
    "coding",
    "extraction",
    "stem",
    "humanities",
)


def group_of(category: str) -> str:
    """Spec-Bench task group of a category label (unknown labels are their own group)."""
    return "mt_bench" if category in MT_BENCH_CATEGORIES else category


def spread(n_items: int, n: int) -> list[int]:
    """n indices spread evenly over range(n_items), first one included."""
    if n >= n_items:
        return list(range(n_items))
    return [(i * n_items) // n for i in range(n)]
