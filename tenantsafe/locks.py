"""Per-schema locks that hold through a transaction pooler and survive faults: leases.

A lease is a row in ``public.tenantsafe_lease``: the schema, a token only its holder knows and
an expiry the holder keeps pushing forward from a heartbeat thread. Nothing holds a server
connection between statements, so a run needs one server connection at a time, also through
pgbouncer with ``default_pool_size = 1``, and ``PAUSE`` waits for one statement at most.

Fencing: while a tenant migrates, every transaction of its connection checks in the guard's
pinned prefix that the lease row still carries its token, and locks the row (``FOR KEY
SHARE``) for the rest of that transaction. A takeover (``FOR UPDATE SKIP LOCKED``) can only
happen between two of the holder's transactions, and the holder's next transaction then fails
before its first statement runs.

Completion: the row is deleted only when the tenant's whole run finished, post_migrate
handlers included. A run that fails or dies leaves it (expired at once on a failure), so
``tenantsafe.plan`` counts that tenant as not current and the next run completes it.

A crashed holder's lease blocks others until it expires (``TENANTSAFE_LOCK_LEASE_SECONDS``,
30 s by default), or not at all when the holder ran on the same host and its process is gone.

Waiters poll instead of blocking: a blocked statement would hold a snapshot that the holder's
``CREATE INDEX CONCURRENTLY`` waits for.

Besides schemas, ``tenantsafe.recording`` leases a name with a colon (never a schema name) while
one process records a migration state: :func:`try_lease` takes a lease without waiting.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from django.db import DatabaseError, connections

from tenantsafe import conf, own_tables

logger = logging.getLogger("tenantsafe.locks")

TABLE = "tenantsafe_lease"


_HOST = socket.gethostname()


def pauses() -> Iterator[float]:
    pause = 0.01
    while True:
        yield pause
        pause = min(pause * 1.5, 0.2)


def table() -> str:
    return own_tables.qualified(TABLE)


def ensure_table(alias: str) -> None:
    own_tables.ensure(
        alias,
        TABLE,
        "schema_name text PRIMARY KEY, token uuid NOT NULL, holder text NOT NULL, "
        "host text NOT NULL, pid integer NOT NULL, acquired_at timestamptz NOT NULL, "
        "expires_at timestamptz NOT NULL",
    )


def key(schema: str) -> str:
    # Schemas differing only in case, which django-tenants treats as one, share a lease.
    return schema.lower()


@dataclass(frozen=True)
class Fence:
    """What the guard checks at the start of every transaction of a leased tenant."""

    table: str
    schema: str
    token: str

    @property
    def key(self) -> str:
        return key(self.schema)


class Lease:
    def __init__(self, alias: str, schema: str, token: str, *, took_over: bool) -> None:
        self.alias = alias
        self.schema = schema
        self.token = token
        # Taken over from a holder that did not finish: the schema is not known to be complete.
        self.took_over = took_over
        self.fence = Fence(table(), schema, token)
        self.completed = False
        self._stop = threading.Event()
        self._heart = threading.Thread(
            target=self._beat, name=f"tenantsafe-lease-{schema}", daemon=True
        )

    def complete(self) -> None:
        """The tenant's run finished: releasing deletes the row instead of leaving it."""
        self.completed = True

    def release(self) -> None:
        """End a lease from :func:`try_lease` (``leased`` ends its own)."""
        self._release()

    def _beat(self) -> None:
        seconds = conf.lock_lease_seconds()
        connection: Any = None
        try:
            while not self._stop.wait(seconds / 3):
                try:
                    if connection is None:
                        # Django connections belong to the thread that made them.
                        connection = connections.create_connection(self.alias)
                    if not _renew(connection, self, seconds):
                        logger.warning("the lock on schema %s was taken over", self.schema)
                        return
                except DatabaseError:
                    # The next beat tries again; until the lease expires it is still ours.
                    logger.debug("renewing the lock on %s failed", self.schema, exc_info=True)
                    with contextlib.suppress(Exception):
                        connection.close()
                    connection = None
        finally:
            if connection is not None:
                with contextlib.suppress(Exception):
                    connection.close()

    def _release(self) -> None:
        self._stop.set()
        if self._heart.is_alive():
            self._heart.join()
        connection: Any = connections[self.alias]
        try:
            self._write_release(connection)
        except DatabaseError:
            # The tenant's connection may be the thing that failed: once more on a new one,
            # else the row stays until it expires.
            with contextlib.suppress(Exception):
                connection.close()
            try:
                self._write_release(connection)
            except DatabaseError as exc:
                # The run goes on (or reports the outage); the row expires on its own.
                logger.warning(
                    "could not release the lock on %s (it expires by itself): %s",
                    self.schema,
                    " ".join(str(exc).split()),
                )

    def _write_release(self, connection: Any) -> None:
        connection.set_schema_to_public()
        with connection.cursor() as cursor:
            if self.completed:
                cursor.execute(
                    f"DELETE FROM {table()} WHERE schema_name = %s AND token = %s",  # noqa: S608
                    [key(self.schema), self.token],
                )
            else:
                # Unfinished: left for the next run, which may take it over at once.
                cursor.execute(
                    f"UPDATE {table()} SET expires_at = now() "  # noqa: S608
                    "WHERE schema_name = %s AND token = %s",
                    [key(self.schema), self.token],
                )


def _renew(connection: Any, lease: Lease, seconds: float) -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table()} SET expires_at = now() + make_interval(secs => %s) "  # noqa: S608
            "WHERE schema_name = %s AND token = %s RETURNING 1",
            [seconds, key(lease.schema), lease.token],
        )
        return cursor.fetchone() is not None


def _holder_gone(host: str, pid: int) -> bool:
    if host != _HOST or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _try_acquire(alias: str, schema: str, token: str, holder: str) -> str:
    """ "new" or "taken over" when the lease is now ``token``'s; empty when it is not."""
    seconds = conf.lock_lease_seconds()
    connection: Any = connections[alias]
    connection.set_schema_to_public()
    values = [token, holder, _HOST, os.getpid(), seconds]
    schema = key(schema)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table()} AS l (schema_name, token, holder, host, pid, "  # noqa: S608
            "acquired_at, expires_at) "
            "VALUES (%s, %s, %s, %s, %s, now(), now() + make_interval(secs => %s)) "
            "ON CONFLICT (schema_name) DO NOTHING RETURNING 1",
            [schema, *values],
        )
        if cursor.fetchone() is not None:
            return "new"
        cursor.execute(
            f"SELECT token, host, pid, expires_at < now() FROM {table()} "  # noqa: S608
            "WHERE schema_name = %s",
            [schema],
        )
        row = cursor.fetchone()
        if row is None:
            return ""  # released meanwhile: the next try inserts
        previous, host, pid, expired = row
        if not (expired or _holder_gone(host, pid)):
            return ""
        # Only between two of the holder's transactions (SKIP LOCKED: its fence locks the
        # row for each one), and only if nobody renewed or took it since the read above.
        cursor.execute(
            f"UPDATE {table()} SET token = %s, holder = %s, host = %s, pid = %s, "  # noqa: S608
            "acquired_at = now(), expires_at = now() + make_interval(secs => %s) "
            f"WHERE schema_name IN (SELECT schema_name FROM {table()} "
            "WHERE schema_name = %s AND token = %s FOR UPDATE SKIP LOCKED) "
            "AND (expires_at < now() OR %s) RETURNING 1",
            [*values, schema, previous, not expired],
        )
        taken = cursor.fetchone() is not None
    if taken:
        logger.info("schema %s: took over the lock left by %s", schema, previous)
    return "taken over" if taken else ""


@contextlib.contextmanager
def leased(alias: str, schema: str, *, purpose: str = "migrate_schemas_safe") -> Iterator[Lease]:
    """Hold ``schema``'s lease for the block; call ``complete()`` once the tenant is done."""
    ensure_table(alias)
    token = str(uuid.uuid4())
    holder = _holder(purpose)
    for pause in pauses():
        how = _try_acquire(alias, schema, token, holder)
        if how:
            break
        time.sleep(pause)
    lease = _held(alias, schema, token, how)
    try:
        yield lease
    finally:
        lease._release()


def try_lease(alias: str, name: str, *, purpose: str) -> Lease | None:
    """``name``'s lease if it can be taken now (free, expired, or its holder's process on this
    host is gone), else None. The caller ends it with ``release()``."""
    ensure_table(alias)
    token = str(uuid.uuid4())
    how = _try_acquire(alias, name, token, _holder(purpose))
    return _held(alias, name, token, how) if how else None


def _holder(purpose: str) -> str:
    return f"{purpose} (pid {os.getpid()} on {_HOST})"


def _held(alias: str, name: str, token: str, how: str) -> Lease:
    lease = Lease(alias, name, token, took_over=how == "taken over")
    lease._heart.start()
    return lease


def unfinished(alias: str, names: list[str], *, mine: Lease | None = None) -> dict[str, str]:
    """The schemas of ``names`` that have a lease row (a run holds them or did not finish).

    ``mine``, a lease this process holds and took fresh, does not count: it is the caller's.
    """
    if not own_tables.exists(alias, TABLE):
        return {}
    connection: Any = connections[alias]
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT schema_name, holder FROM {table()} "  # noqa: S608
            "WHERE schema_name = ANY(%s) AND token IS DISTINCT FROM %s",
            [
                sorted({key(name) for name in names}),
                mine.token if mine is not None and not mine.took_over else None,
            ],
        )
        held = dict(cursor.fetchall())
    return {name: held[key(name)] for name in names if key(name) in held}
