"""Putting the guard on connections, and switching it on.

:func:`install` runs from ``AppConfig.ready()`` for the connections of that thread, and on
``connection_created`` for every connection opened later (other threads, forked workers,
reconnects). It is idempotent (the connection's state says it was done), as django-read-only
adds its hook. What it changes on the connection, and why:

* ``execute_wrappers``: :func:`~tenantsafe.guard.cursor.guarded_execute`, which sees every
  statement Django runs.
* ``make_cursor`` / ``make_debug_cursor``: the cursor wrapper they return becomes a
  :class:`~tenantsafe.guard.cursor.GuardedCursor`, for the calls execute wrappers do not see
  (COPY, callproc, a server-side cursor's fetches).
* ``ops.last_executed_query``: ``connection.queries`` (DEBUG) records the statement the code
  ran, without the check merged into it.
* ``commit``, ``rollback``, ``savepoint_rollback``, ``close``: they end the transaction (or
  part of it) without a statement the execute wrapper sees, so the pin is forgotten.
* ``commit``, ``rollback``, ``set_autocommit``, ``close_if_unusable_or_obsolete``, ``close``: a
  stream's transaction must end before Django starts or ends one of its own, and at request
  boundaries (the connection may sit unused until the next request).

It is switched on for one alias while :func:`guarding` is open (``migrate_schemas_safe``,
provisioning, the testing helpers), and for every alias with ``TENANTSAFE_RUNTIME_GUARD``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.signals import connection_created
from django.db.backends.utils import CursorWrapper

from tenantsafe.guard import state
from tenantsafe.guard.cursor import end_stream, guarded_class, guarded_execute
from tenantsafe.guard.sql import without_check


@contextlib.contextmanager
def guarding(alias: str) -> Iterator[None]:
    """Guard every statement on ``alias`` (in this process and in processes it forks)."""
    for connection in connections.all(initialized_only=True):
        install(connection)
    state.enter(alias)
    try:
        yield
    finally:
        state.leave(alias)


def install(connection: BaseDatabaseWrapper | None = None, **kwargs: Any) -> None:
    """Put the guard on ``connection`` (default: every connection of this thread). Idempotent."""
    if connection is None:
        for conn in connections.all():
            install(conn)
        connection_created.connect(_on_connection_created, dispatch_uid="tenantsafe.guard")
        return
    if not hasattr(connection, "_get_cursor_search_paths"):
        return
    kept = state.of(connection)
    if kept.installed:
        return
    connection.execute_wrappers.append(guarded_execute)
    for name in ("make_cursor", "make_debug_cursor"):
        setattr(connection, name, _guarding_cursors(getattr(connection, name)))
    connection.ops.last_executed_query = _user_query(  # type: ignore[method-assign]
        connection, connection.ops.last_executed_query
    )
    for name in ("commit", "rollback", "savepoint_rollback", "close"):
        setattr(connection, name, _forgetting(getattr(connection, name), kept))
    for name in ("commit", "rollback", "set_autocommit"):
        setattr(connection, name, _ending_stream(getattr(connection, name), connection))
    connection.close_if_unusable_or_obsolete = _ending_stream(  # type: ignore[method-assign]
        connection.close_if_unusable_or_obsolete, connection, cleanup=True
    )
    connection.close = _ending_stream(  # type: ignore[method-assign]
        connection.close, connection, keep_rows=False, cleanup=True
    )
    kept.installed = True


def _on_connection_created(sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    install(connection)


def _guarding_cursors(make: Callable[[Any], CursorWrapper]) -> Callable[[Any], CursorWrapper]:
    def wrapper(cursor: Any) -> CursorWrapper:
        wrapped = make(cursor)
        wrapped.__class__ = guarded_class(type(wrapped))
        return wrapped

    return wrapper


def _user_query(connection: Any, last_executed_query: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(cursor: Any, sql: Any, params: Any) -> Any:
        query = last_executed_query(cursor, sql, params)
        merged = state.of(connection).merged
        if isinstance(query, str) and merged is not None:
            return without_check(query, *merged)
        return query

    return wrapper


def _ending_stream(
    method: Callable[..., Any], connection: Any, *, keep_rows: bool = True, cleanup: bool = False
) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if state.of(connection).stream is not None:
            if not cleanup:
                end_stream(connection, keep_rows=keep_rows)
            else:
                try:
                    end_stream(connection, keep_rows=keep_rows)
                except Exception:
                    # Closing or checking the connection anyway: one that could not end the
                    # transaction is unusable, and Django closes it.
                    connection.errors_occurred = True
        return method(*args, **kwargs)

    return wrapper


def _forgetting(method: Callable[..., Any], kept: state.ConnectionState) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        finally:
            kept.pinned = None

    return wrapper
