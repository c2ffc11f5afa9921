"""Shared by the benchmarks: a server to measure on (the throwaway cluster unless DATABASE_URL)."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any


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


def run_json(module: str, *args: str, env: dict[str, str]) -> dict[str, Any]:
    """``python -m module args`` in a process of its own: the JSON its last output line holds."""
    result = subprocess.run(
        [sys.executable, "-m", module, *args], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return data
