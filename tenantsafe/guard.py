"""The cursor-level search_path guard.

django-tenants issues a session-level ``SET search_path`` when Django opens a cursor. In
autocommit that ``SET`` is a transaction of its own, so a transaction pooler (pgbouncer in
``pool_mode = transaction``, RDS Proxy) may run it on one server connection and the statements
after it on another. The guard pins the path to the statements themselves: while it is on for
a connection, every statement runs inside a transaction that set the tenant's search_path with
``set_config(..., is_local => true)`` on the same cursor and verified ``current_schema()``.

It is one execute wrapper, put on every connection by :func:`install` (called from
``AppConfig.ready()`` and on ``connection_created``). It is switched on

* for one alias while ``migrate_schemas_safe`` runs (:func:`guarding`), which forked executor
  workers inherit;
* for every alias when ``TENANTSAFE_RUNTIME_GUARD = True`` (``tenantsafe.conf``).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.signals import connection_created

from tenantsafe import conf

logger = logging.getLogger("tenantsafe.guard")

# libpq transaction status values; psycopg 3 and psycopg2 (``connection.info``) share them.
_IDLE = 0
_INTRANS = 2
_INERROR = 3

# Statements PostgreSQL refuses inside a transaction block, so they cannot be pinned.
_NON_TRANSACTIONAL = re.compile(
    r"^\s*(?:(?:CREATE|DROP)\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY"
    r"|REINDEX\b[^;]*\bCONCURRENTLY|VACUUM\b|CREATE\s+DATABASE|DROP\s+DATABASE"
    r"|ALTER\s+SYSTEM|CLUSTER\b)",
    re.IGNORECASE,
)
_ENDS_TRANSACTION = re.compile(r"^\s*(?:COMMIT|ROLLBACK|END|ABORT)\b", re.IGNORECASE)

_PIN_SQL = "SELECT set_config('search_path', %s, %s), current_schema()"

_active_aliases: set[str] = set()


class SearchPathError(Exception):
    """A statement would have run with a search_path that could not be verified."""

    def __init__(self, message: str, *, schema: str) -> None:
        super().__init__(message)
        self.schema = schema


class SchemaMissingError(SearchPathError):
    pass


class PooledStatementError(SearchPathError):
    pass


@dataclass
class _State:
    pinned: tuple[str, ...] | None = None
    pooler: dict[int, bool] = field(default_factory=dict)


def _state(connection: Any) -> _State:
    state: _State | None = getattr(connection, "_tenantsafe_state", None)
    if state is None:
        state = _State()
        connection._tenantsafe_state = state
    return state


def is_active(connection: BaseDatabaseWrapper) -> bool:
    return connection.alias in _active_aliases or conf.runtime_guard_enabled()


@contextlib.contextmanager
def guarding(alias: str) -> Iterator[None]:
    """Guard every statement on ``alias`` (in this process and in processes it forks)."""
    for connection in connections.all(initialized_only=True):
        install(connection)
    already = alias in _active_aliases
    _active_aliases.add(alias)
    try:
        yield
    finally:
        if not already:
            _active_aliases.discard(alias)


def search_path(connection: Any) -> list[str]:
    # django-tenants validates every part (schema name and PG_EXTRA_SEARCH_PATHS) here.
    return list(connection._get_cursor_search_paths())


def quoted_path(schemas: list[str]) -> str:
    return ", ".join('"%s"' % name for name in schemas)


def read_path(connection: BaseDatabaseWrapper) -> tuple[str | None, str]:
    """``current_schema()`` and ``SHOW search_path`` as the connection sees them now."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_schema(), current_setting('search_path')")
        row = cursor.fetchone()
    assert row is not None
    return row[0], row[1]


def is_pooled(connection: Any) -> bool:
    """Whether a transaction pooler may stand between this connection and PostgreSQL.

    ``TENANTSAFE_TRANSACTION_POOLER`` decides when set; otherwise a proxy shows itself by the
    server port PostgreSQL reports differing from the port Django connected to.
    """
    configured = conf.transaction_pooler(connection.alias)
    if configured is not None:
        return configured
    connection.ensure_connection()
    raw = connection.connection
    cache = _state(connection).pooler
    if id(raw) not in cache:
        with raw.cursor() as cursor:
            cursor.execute("SELECT inet_server_port()")
            server_port = cursor.fetchone()[0]
        host = connection.settings_dict.get("HOST") or ""
        port = int(connection.settings_dict.get("PORT") or 5432)
        if server_port is None:
            pooled = bool(host) and not host.startswith("/")
        else:
            pooled = int(server_port) != port
        cache.clear()
        cache[id(raw)] = pooled
    return cache[id(raw)]


def _pin(connection: Any, cursor: Any, schemas: list[str], *, local: bool = True) -> None:
    cursor.execute(_PIN_SQL, [quoted_path(schemas), local])
    path, current = cursor.fetchone()
    expected = schemas[0]
    logger.debug("schema %s: search_path set to %s, current_schema() = %s", expected, path, current)
    if current != expected:
        cursor.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", [expected])
        if cursor.fetchone() is None:
            raise SchemaMissingError(
                f'Schema "{expected}" does not exist; create it (migrate_schemas_safe '
                f"--create-missing) or delete the tenant row that names it.",
                schema=expected,
            )
        raise SearchPathError(
            f"current_schema() is {current!r} after setting search_path to {path}, expected "
            f'"{expected}"; nothing was run.',
            schema=expected,
        )
    _state(connection).pinned = tuple(schemas) if local else None


def _guard(
    execute: Callable[..., Any],
    sql: str,
    params: Any,
    many: bool,
    context: dict[str, Any],
) -> Any:
    connection = context["connection"]
    if not is_active(connection) or not hasattr(connection, "_get_cursor_search_paths"):
        return execute(sql, params, many, context)
    schemas = search_path(connection)
    raw_cursor = context["cursor"].cursor
    raw = connection.connection
    # A named (server-side) cursor runs one statement only: pin through a plain one.
    pin_cursor = raw.cursor() if getattr(raw_cursor, "name", None) else raw_cursor
    status = raw.info.transaction_status
    state = _state(connection)

    with connection.wrap_database_errors:
        if isinstance(sql, str) and _NON_TRANSACTIONAL.match(sql):
            return _outside_transaction(
                connection, pin_cursor, schemas, sql, execute, params, many, context, status
            )
        if status == _IDLE and connection.get_autocommit():
            return _in_own_transaction(
                connection, pin_cursor, schemas, execute, sql, params, many, context
            )
        if status != _INERROR and (status == _IDLE or state.pinned != tuple(schemas)):
            _pin(connection, pin_cursor, schemas)
    try:
        return execute(sql, params, many, context)
    finally:
        if isinstance(sql, str) and _ENDS_TRANSACTION.match(sql):
            state.pinned = None


def _in_own_transaction(
    connection: Any,
    cursor: Any,
    schemas: list[str],
    execute: Callable[..., Any],
    sql: str,
    params: Any,
    many: bool,
    context: dict[str, Any],
) -> Any:
    # An autocommit statement is a transaction of its own; give it an explicit one so the
    # path and the statement reach the same server connection.
    cursor.execute("BEGIN")
    try:
        _pin(connection, cursor, schemas)
        result = execute(sql, params, many, context)
    except BaseException:
        with contextlib.suppress(Exception), connection.connection.cursor() as end:
            end.execute("ROLLBACK")
        _state(connection).pinned = None
        raise
    # A cursor of its own, so the statement's result set stays readable.
    with connection.connection.cursor() as end:
        end.execute("COMMIT")
    _state(connection).pinned = None
    return result


def _outside_transaction(
    connection: Any,
    cursor: Any,
    schemas: list[str],
    sql: str,
    execute: Callable[..., Any],
    params: Any,
    many: bool,
    context: dict[str, Any],
    status: int,
) -> Any:
    if is_pooled(connection):
        statement = " ".join(sql.split())[:80]
        raise PooledStatementError(
            f'Schema "{schemas[0]}": "{statement}" cannot run inside a transaction block, so '
            "its search_path cannot be pinned through a transaction pooler. Run this "
            "migration over a direct (non-pooled) connection: add a DATABASES entry that "
            "points at PostgreSQL itself and pass its alias with --database (or set "
            "TENANTSAFE_TRANSACTION_POOLER = False if no pooler is in between).",
            schema=schemas[0],
        )
    if status == _IDLE:
        # Directly connected the session is ours: a session-level path holds.
        _pin(connection, cursor, schemas, local=False)
    return execute(sql, params, many, context)


def _resetting(method: Callable[..., Any], state: _State) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        finally:
            state.pinned = None

    return wrapper


def install(connection: BaseDatabaseWrapper | None = None, **kwargs: Any) -> None:
    """Put the guard on ``connection`` (default: every connection of this thread). Idempotent."""
    if connection is None:
        for conn in connections.all():
            install(conn)
        connection_created.connect(_on_connection_created, dispatch_uid="tenantsafe.guard")
        return
    if getattr(connection, "_tenantsafe_installed", False):
        return
    if not hasattr(connection, "_get_cursor_search_paths"):
        return
    state = _state(connection)
    connection.execute_wrappers.append(_guard)
    # The pinned path is gone with the transaction; these end it without a statement.
    for name in ("commit", "rollback", "savepoint_rollback", "close"):
        setattr(connection, name, _resetting(getattr(connection, name), state))
    connection._tenantsafe_installed = True  # type: ignore[attr-defined]


def _on_connection_created(sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    install(connection)


__all__ = [
    "PooledStatementError",
    "SchemaMissingError",
    "SearchPathError",
    "guarding",
    "install",
    "is_active",
    "is_pooled",
    "read_path",
]
