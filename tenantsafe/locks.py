"""Per-schema advisory locks that hold through a transaction pooler.

Transaction-level locks (``pg_try_advisory_xact_lock``), held by an open transaction: a
transaction keeps its server connection even through a pooler, and COMMIT or ROLLBACK releases
the lock wherever it was taken. A session-level ``pg_advisory_lock`` would be taken on one
server connection and released (or not) on another.

Waiters poll and end their transaction between tries instead of blocking in
``pg_advisory_xact_lock``: a blocked statement holds a snapshot, and the holder's
``CREATE INDEX CONCURRENTLY`` waits for every older snapshot to go, so both would wait forever.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

from django.db import connections

# First keys of the two-int locks: (namespace, hashtext(lower(schema))). lower() so that
# schemas differing only in case, which django-tenants treats as one, wait for each other.
MIGRATE = 0x7453
CREATE_TENANT = 0x7454


def pauses() -> Iterator[float]:
    pause = 0.01
    while True:
        yield pause
        pause = min(pause * 1.5, 0.2)


def try_lock(connection: Any, namespace: int, schema: str) -> bool:
    """Take the lock in ``connection``'s current transaction, if it is free."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_try_advisory_xact_lock(%s, hashtext(lower(%s)))", [namespace, schema]
        )
        return bool(cursor.fetchone()[0])


class LockConnection:
    """A connection of its own that holds one lock at a time in an open transaction."""

    def __init__(self, alias: str) -> None:
        self.pid = os.getpid()
        self.connection: Any = connections.create_connection(alias)

    @contextlib.contextmanager
    def hold(self, namespace: int, schema: str) -> Iterator[None]:
        conn = self.connection
        conn.set_autocommit(False)
        try:
            for pause in pauses():
                with conn.cursor() as cursor:
                    # Read committed, whatever the project's OPTIONS say: a repeatable-read
                    # transaction keeps a snapshot that CREATE INDEX CONCURRENTLY waits for.
                    # And the server must not end it as idle while a long migration runs.
                    cursor.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                    cursor.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
                if try_lock(conn, namespace, schema):
                    break
                conn.rollback()
                time.sleep(pause)
            yield
        finally:
            with contextlib.suppress(Exception):
                conn.rollback()
                conn.set_autocommit(True)

    def close(self) -> None:
        self.connection.close()


# Django connections belong to the thread that opened them, so one lock connection per alias
# and thread.
_per_thread: dict[tuple[str, int], LockConnection] = {}


def for_process(alias: str) -> LockConnection:
    key = (alias, threading.get_ident())
    lock = _per_thread.get(key)
    if lock is None or lock.pid != os.getpid():
        # A forked worker must not share its parent's socket: it opens its own.
        lock = _per_thread[key] = LockConnection(alias)
    return lock


def close_process_locks() -> None:
    """Close this thread's lock connections."""
    thread = threading.get_ident()
    for key in [key for key in _per_thread if key[1] == thread]:
        lock = _per_thread.pop(key)
        if lock.pid == os.getpid():
            lock.close()
