"""Pinning a path by hand: for code that runs SQL on a driver cursor the guard does not see
(recordings, deploys, spares), and the step-by-step pin the strategies use."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from django.db import connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper

from tenantsafe import schemas
from tenantsafe.errors import LockLostError, SchemaMissingError
from tenantsafe.guard import sql, state
from tenantsafe.guard.sql import Terms

logger = logging.getLogger("tenantsafe.guard")


def search_path(connection: Any) -> list[str]:
    # django-tenants validates every part (schema name and PG_EXTRA_SEARCH_PATHS) here.
    return list(connection._get_cursor_search_paths())


def read_path(connection: BaseDatabaseWrapper) -> tuple[str | None, str]:
    """``current_schema()`` and ``SHOW search_path`` as the connection sees them now."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_schema(), current_setting('search_path')")
        row = cursor.fetchone()
    assert row is not None
    return row[0], row[1]


def log_pin(path: Sequence[str], current: str | None) -> None:
    logger.debug(
        "schema %s: search_path set to %s, current_schema() = %s",
        path[0],
        schemas.path(path),
        current,
    )


def pin(connection: Any, cursor: Any, path: Sequence[str], *, local: bool = True) -> None:
    """Set ``path`` as the path on ``cursor`` and verify it, or raise SearchPathError."""
    cursor.execute(sql.PIN_SQL, [schemas.path(path), local])
    _, current = cursor.fetchone()
    expected = path[0]
    log_pin(path, current)
    if current != expected:
        cursor.execute(sql.SCHEMA_EXISTS_SQL, [expected])
        if cursor.fetchone() is None:
            raise SchemaMissingError(expected)
        raise sql.mismatch(current, path)
    kept = state.of(connection)
    if local and kept.terms is not None:
        cursor.execute(sql.terms_check(kept.terms))
        if not cursor.fetchone()[0]:
            raise LockLostError(kept.terms.fence.schema if kept.terms.fence else expected)
    kept.pinned = tuple(path) if local else None


@contextlib.contextmanager
def with_terms(connection: Any, value: Terms) -> Iterator[None]:
    """Add ``value`` to every transaction the guard pins on ``connection`` in the block."""
    kept = state.of(connection)
    previous, kept.terms = kept.terms, value
    try:
        yield
    finally:
        kept.terms = previous


@contextlib.contextmanager
def raw_transaction(alias: str) -> Iterator[Any]:
    """A driver cursor in a transaction of ``alias`` (a savepoint inside the caller's), its
    errors raised as Django's. The guard does not see what runs on it: pin it (:func:`pin`)
    before it reads or writes a tenant's tables."""
    connection: Any = connections[alias]
    with transaction.atomic(using=alias), connection.wrap_database_errors:
        connection.ensure_connection()
        with connection.connection.cursor() as cursor:
            yield cursor


@contextlib.contextmanager
def pinned_transaction(
    alias: str, path: Sequence[str], *, terms: Terms | None = None, create: bool = False
) -> Iterator[Any]:
    """A driver cursor in a transaction (:func:`raw_transaction`) whose search_path is
    ``path``, set for the transaction and verified: through a transaction pooler, all that runs
    on it reaches the server connection that was checked. ``terms`` are set and checked too;
    ``create`` creates the path's first schema first."""
    connection: Any = connections[alias]
    with (
        with_terms(connection, terms) if terms is not None else contextlib.nullcontext(),
        raw_transaction(alias) as cursor,
    ):
        if create:
            cursor.execute(f"CREATE SCHEMA {schemas.quote(path[0])}")
        pin(connection, cursor, list(path))
        yield cursor
