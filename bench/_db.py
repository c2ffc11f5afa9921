"""Shared by the benchmarks: a server to measure on (the throwaway cluster unless DATABASE_URL)."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def server() -> Iterator[None]:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    if os.environ.get("DATABASE_URL"):
        yield
        return
    from testproject.cluster import throwaway_cluster

    with throwaway_cluster(quiet=True):
        yield


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    return statistics.median(values)
