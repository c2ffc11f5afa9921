"""Reads that run on a connection of their own while the caller reads something else.

At 10,000 tenants the doctor's reads cost PostgreSQL tens of seconds of CPU, in parts that do
not depend on each other (catalog digests, content types and permissions, migration rows).
One connection runs one query at a time on one core; two or three let the server use more.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from django.db import connections

T = TypeVar("T")


@contextlib.contextmanager
def meanwhile(alias: str, read: Callable[[], T]) -> Iterator[Callable[[], T]]:
    """Run ``read`` in a thread, on that thread's connection to ``alias``, while the block
    runs; the block calls what this yields to wait for its result (or exception). Inside a
    transaction, whose rows another connection cannot see (a TestCase's), ``read`` runs at
    once, on this connection."""
    if connections[alias].in_atomic_block:
        result = read()
        yield lambda: result
        return

    def own() -> T:
        try:
            return read()
        finally:
            # The thread's connection: the thread ends with the block.
            connections[alias].close()

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tenantsafe") as pool:
        yield pool.submit(own).result


def in_halves(
    alias: str, read: Callable[[Sequence[str]], T], names: Sequence[str], *, above: int
) -> list[T]:
    """``read`` of each half of ``names``, the first half on a connection of its own while
    this one reads the second, when there are more than ``above`` (a read that takes several
    statements: the server then uses two cores); else ``read(names)`` alone."""
    if len(names) <= above:
        return [read(names)]
    half = len(names) // 2
    with meanwhile(alias, lambda: read(names[:half])) as first:
        second = read(names[half:])
        return [first(), second]
