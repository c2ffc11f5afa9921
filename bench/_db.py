"""Shared by the benchmarks: a server to measure on (the throwaway cluster unless DATABASE_URL)."""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
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


def psql(url: str, script: str) -> None:
    """Run ``script`` with psql in one transaction, stopping at the first error."""
    result = subprocess.run(
        ["psql", "-q", "-X", "-v", "ON_ERROR_STOP=1", "-1", url],
        input="SET client_min_messages = warning;\n" + script,
        text=True,
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"psql failed:\n{result.stderr[-2000:]}")
