"""Timing shared by the benchmarks: warm, blocked, median of repeats."""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax


def median_time(fn: Any, repeats: int) -> tuple[float, Any]:
    """``(median wall seconds, last result)`` of `fn()` over `repeats` runs after one warm-up;
    every result is blocked until ready."""
    out = jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), out
