"""The cursor-level search_path guard.

django-tenants issues a session-level ``SET search_path`` when Django opens a cursor. In
autocommit that ``SET`` is a transaction of its own, so a transaction pooler (pgbouncer in
``pool_mode = transaction``, RDS Proxy) may run it on one server connection and the statements
after it on another. The guard pins the path to the statements themselves: while it is on for
a connection, every statement runs in a transaction that set the tenant's search_path with
``set_config(..., is_local => true)`` and checked ``current_schema()`` before the statement.

It is one execute wrapper, put on every connection by :func:`install` (called from
``AppConfig.ready()`` and on ``connection_created``). It is switched on

* for one alias while ``migrate_schemas_safe`` runs (:func:`guarding`), which forked executor
  workers inherit;
* for every alias when ``TENANTSAFE_RUNTIME_GUARD = True`` (``tenantsafe.conf``).

How a statement is pinned, cheapest first:

* merged: ``<check>; <statement>`` as one simple query. PostgreSQL runs a multi-statement query
  as one transaction (an implicit one in autocommit), so no pooler can separate the two, and it
  costs no extra round trip. Used for Django's default cursors (psycopg 3 client-side binding,
  psycopg2).
* pipelined (psycopg 3 server-side binding cursors, ``executemany``): ``BEGIN``, the check, the
  statement and ``COMMIT`` sent in one pipeline, one round trip.
* step by step (named cursors, psycopg2 ``executemany``): ``BEGIN``, the pin verified in Python,
  the statement, ``COMMIT``.

The check raises inside PostgreSQL when ``current_schema()`` is not the tenant's schema, so the
transaction is aborted before the statement runs; the error is re-raised as
:class:`SearchPathError`.

What execute wrappers do not see, the guard's cursor wrapper class (:class:`_GuardedCursor`, put
on every cursor by the connection's ``make_cursor``/``make_debug_cursor``) covers:

* ``copy()`` and ``stream()`` (psycopg 3), ``copy_expert``/``copy_from``/``copy_to`` (psycopg2)
  and ``callproc`` run pinned: in autocommit inside ``BEGIN; <check>`` ... ``COMMIT`` of their
  own.
* A server-side cursor opened in autocommit through a pooler cannot live in the session (its
  FETCHes would reach other server connections), so its DECLARE runs in a transaction the guard
  opens and pins (a *stream*), kept open while the cursor is read. It ends (CLOSE, COMMIT) when
  the cursor is closed, read to the end or garbage-collected (then at the connection's next
  use), or when the connection runs anything else: a live cursor's remaining rows are then
  fetched into memory first, so it reads on correctly without holding the transaction.
* With ``DEBUG``, ``connection.queries`` records the statement the code ran: the connection's
  ``ops.last_executed_query`` leaves the merged check out.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.db import connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.postgresql.psycopg_any import is_psycopg3
from django.db.backends.signals import connection_created
from django.db.backends.utils import CursorDebugWrapper, CursorWrapper

from tenantsafe import conf, pooler, schemas, statements
from tenantsafe.errors import (
    LockLostError,
    PooledStatementError,
    SchemaMissingError,
    SearchPathError,
)
from tenantsafe.locks import Fence
from tenantsafe.statements import NON_TRANSACTIONAL, SETTING, TRANSACTION_CONTROL

if is_psycopg3:
    import psycopg

logger = logging.getLogger("tenantsafe.guard")

# libpq transaction status values; psycopg 3 and psycopg2 (``connection.info``) share them.
_IDLE = 0
_INTRANS = 2
_INERROR = 3

_PIN_SQL = "SELECT set_config('search_path', %s, %s), current_schema()"

# Appears in the error PostgreSQL raises when the in-statement check fails.
_MARK = "tenantsafe-search-path:"

# How many guarding() blocks are open per alias, across the threads of this process.
_active_aliases: collections.Counter[str] = collections.Counter()
_active_lock = threading.Lock()


@dataclass(frozen=True)
class Terms:
    """What every pinned transaction of a migrating connection also sets and checks."""

    # The tenant's lease: still this run's, and locked for the rest of the transaction.
    fence: Fence | None = None
    # PostgreSQL's lock_timeout for the transaction, in milliseconds; None leaves it alone.
    lock_timeout_ms: int | None = None


@dataclass
class _Stream:
    """A transaction the guard holds open for server-side cursors (by name) through a pooler."""

    path: tuple[str, ...]
    cursors: dict[str, weakref.ref[_GuardedCursor]] = field(default_factory=dict)


@dataclass
class _State:
    pinned: tuple[str, ...] | None = None
    terms: Terms | None = None
    stream: _Stream | None = None
    # The check merged into the last statement (and whether it was %-escaped): left out of
    # connection.queries.
    merged: tuple[str, bool] | None = None


def _state(connection: Any) -> _State:
    state: _State | None = getattr(connection, "_tenantsafe_state", None)
    if state is None:
        state = _State()
        connection._tenantsafe_state = state
    return state


def is_active(connection: BaseDatabaseWrapper) -> bool:
    return _active_aliases[connection.alias] > 0 or conf.runtime_guard_enabled()


@contextlib.contextmanager
def guarding(alias: str) -> Iterator[None]:
    """Guard every statement on ``alias`` (in this process and in processes it forks)."""
    for connection in connections.all(initialized_only=True):
        install(connection)
    with _active_lock:
        _active_aliases[alias] += 1
    try:
        yield
    finally:
        with _active_lock:
            _active_aliases[alias] -= 1


@contextlib.contextmanager
def with_terms(connection: Any, value: Terms) -> Iterator[None]:
    """Add ``value`` to every transaction the guard pins on ``connection`` in the block."""
    state = _state(connection)
    previous, state.terms = state.terms, value
    try:
        yield
    finally:
        state.terms = previous


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


def is_pooled(connection: Any) -> bool:
    """Whether a transaction pooler may stand between this connection and PostgreSQL."""
    return pooler.detect(connection).pooled


def _mismatch(current: str | None, path: list[str]) -> SearchPathError:
    return SearchPathError(
        f"current_schema() is {current!r} after setting search_path to "
        f'{schemas.path(path)}, expected "{path[0]}"; nothing was run.',
        schema=path[0],
    )


def _log_pin(path: list[str], current: str | None) -> None:
    logger.debug(
        "schema %s: search_path set to %s, current_schema() = %s",
        path[0],
        schemas.path(path),
        current,
    )


def pin(connection: Any, cursor: Any, path: list[str], *, local: bool = True) -> None:
    """Set ``path`` as the path on ``cursor`` and verify it, or raise SearchPathError."""
    cursor.execute(_PIN_SQL, [schemas.path(path), local])
    _, current = cursor.fetchone()
    expected = path[0]
    _log_pin(path, current)
    if current != expected:
        cursor.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", [expected])
        if cursor.fetchone() is None:
            raise SchemaMissingError(expected)
        raise _mismatch(current, path)
    state = _state(connection)
    if local and state.terms is not None:
        cursor.execute(_terms_sql(state.terms))
        if not cursor.fetchone()[0]:
            raise LockLostError(state.terms.fence.schema if state.terms.fence else expected)
    state.pinned = tuple(path) if local else None


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


def _terms_sql(terms: Terms) -> str:
    # True unless the fence fails; no parameters, so no % to escape.
    parts = ["SELECT true"]
    if terms.lock_timeout_ms is not None:
        parts.append(f"set_config('lock_timeout', '{terms.lock_timeout_ms}', true) IS NOT NULL")
    if terms.fence is not None:
        parts.append(_fence_exists(terms.fence))
    return " AND ".join(parts)


def _fence_exists(fence: Fence) -> str:
    return (
        f"EXISTS (SELECT 1 FROM {fence.table} WHERE schema_name = "  # noqa: S608
        f"{schemas.literal(fence.key)} AND token = {schemas.literal(fence.token)} "
        "FOR KEY SHARE)"
    )


@functools.lru_cache(maxsize=1024)
def _check_sql(path: tuple[str, ...], escape_percent: bool, terms: Terms | None = None) -> str:
    """One SELECT that pins the path and fails unless ``current_schema()`` is the tenant's.

    CASE evaluates its branches in order, so set_config runs before current_schema() looks.
    The failure is a cast error on a value computed at run time (from current_schema()): a
    constant one (``1/0``, ``'x'::int``) is folded, and raised, at plan time whichever branch
    is taken.
    """
    schema = schemas.literal(path[0])
    sql = (
        f"SELECT CASE WHEN set_config('search_path', {schemas.literal(schemas.path(path))}, "
        f"true) IS NULL THEN NULL "
        f"{_terms_cases(terms) if terms is not None else ''}"
        f"WHEN current_schema() = {schema} THEN current_schema() "
        f"ELSE ((CASE WHEN to_regnamespace({schema}) IS NULL THEN '{_MARK}missing:' "
        f"ELSE '{_MARK}current=' END) || coalesce(current_schema(), '-'))::int::text END"
    )
    # With parameters the driver formats the query and reads % as a placeholder.
    return sql.replace("%", "%%") if escape_percent else sql


def _terms_cases(terms: Terms) -> str:
    cases = ""
    if terms.lock_timeout_ms is not None:
        cases += (
            f"WHEN set_config('lock_timeout', '{terms.lock_timeout_ms}', true) IS NULL THEN NULL "
        )
    if terms.fence is not None:
        cases += (
            f"WHEN NOT {_fence_exists(terms.fence)} "
            f"THEN ('{_MARK}lease:' || coalesce(current_schema(), '-'))::int::text "
        )
    return cases


def _check_failure(
    exc: BaseException, path: list[str], terms: Terms | None = None
) -> SearchPathError | None:
    """The SearchPathError for ``exc`` if it is the check failing (maybe wrapped by Django)."""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        at = text.find(_MARK)
        if at >= 0:
            detail = text[at + len(_MARK) :].split('"', 1)[0]
            if detail.startswith("missing:"):
                return SchemaMissingError(path[0])
            if detail.startswith("lease:"):
                fence = terms.fence if terms is not None else None
                return LockLostError(fence.schema if fence is not None else path[0])
            current = detail.removeprefix("current=")
            return _mismatch(None if current == "-" else current, path)
        seen = seen.__cause__
    return None


def _guard(
    execute: Callable[..., Any],
    sql: str,
    params: Any,
    many: bool,
    context: dict[str, Any],
) -> Any:
    connection = context["connection"]
    state = _state(connection)
    if state.stream is not None:
        # Any other statement ends the stream: the pooler's server connection is not kept
        # for the statements around a cursor being read.
        _end_stream(connection)
    if not is_active(connection) or not hasattr(connection, "_get_cursor_search_paths"):
        return execute(sql, params, many, context)
    text = sql if isinstance(sql, str) else None
    if text is not None:
        if TRANSACTION_CONTROL.match(text):
            try:
                return execute(sql, params, many, context)
            finally:
                state.pinned = None
        if SETTING.match(text):
            return execute(sql, params, many, context)

    path = search_path(connection)
    raw_cursor = context["cursor"].cursor
    raw = connection.connection
    status = raw.info.transaction_status
    named = bool(getattr(raw_cursor, "name", None))
    if text is not None and NON_TRANSACTIONAL.match(text):
        with _pin_cursor(raw, raw_cursor, named) as pin_cursor, connection.wrap_database_errors:
            return _outside_transaction(
                connection, pin_cursor, path, text, execute, params, many, context, status
            )
    if status == _INERROR or (status == _INTRANS and state.pinned == tuple(path)):
        return execute(sql, params, many, context)
    own = status == _IDLE and connection.get_autocommit()
    if named and own and is_pooled(connection):
        with connection.wrap_database_errors:
            return _streamed(connection, raw, path, execute, sql, params, many, context)

    if text and not many and not named and _merges(raw, raw_cursor):
        return _merged(connection, raw, raw_cursor, path, execute, text, params, context)
    if not named and _pipelines(raw):
        return _pipelined(connection, raw, path, execute, sql, params, many, context, own)
    with _pin_cursor(raw, raw_cursor, named) as pin_cursor, connection.wrap_database_errors:
        if own:
            return _in_own_transaction(
                connection, pin_cursor, path, execute, sql, params, many, context
            )
        if status != _INERROR:
            pin(connection, pin_cursor, path)
    return execute(sql, params, many, context)


@contextlib.contextmanager
def _pin_cursor(raw: Any, raw_cursor: Any, named: bool) -> Iterator[Any]:
    if not named:
        yield raw_cursor
        return
    # A named (server-side) cursor runs one statement only: pin through a plain one.
    with contextlib.closing(raw.cursor()) as cursor:
        yield cursor


def _merges(raw: Any, raw_cursor: Any) -> bool:
    if is_psycopg3:
        # A client-side binding cursor sends a simple query, which may hold several
        # statements; a pipeline would force the extended protocol, which may not.
        return isinstance(raw_cursor, psycopg.ClientCursor) and not raw.pgconn.pipeline_status
    return True


def _pipelines(raw: Any) -> bool:
    return is_psycopg3 and psycopg.Pipeline.is_supported() and not raw.pgconn.pipeline_status


def _merged(
    connection: Any,
    raw: Any,
    raw_cursor: Any,
    path: list[str],
    execute: Callable[..., Any],
    sql: str,
    params: Any,
    context: dict[str, Any],
) -> Any:
    state = _state(connection)
    check = _check_sql(tuple(path), params is not None, state.terms)
    try:
        result = execute(f"{check};\n{sql}", params, False, context)
    except Exception as exc:
        state.pinned = None
        failure = _check_failure(exc, path, state.terms)
        if failure is None:
            raise
        raise failure from exc
    if is_psycopg3:
        # The check's row comes first; leave the cursor on the statement's results.
        if logger.isEnabledFor(logging.DEBUG):
            row = raw_cursor.fetchone()
            _log_pin(path, row[0] if row else None)
        raw_cursor.nextset()
    else:
        # psycopg2 keeps the last result only; the check raised if it did not hold.
        _log_pin(path, path[0])
    state.pinned = tuple(path) if raw.info.transaction_status == _INTRANS else None
    state.merged = (check, params is not None)
    return result


def _pipelined(
    connection: Any,
    raw: Any,
    path: list[str],
    execute: Callable[..., Any],
    sql: Any,
    params: Any,
    many: bool,
    context: dict[str, Any],
    own: bool,
) -> Any:
    # Explicit BEGIN/COMMIT: a sync psycopg issued inside the pipeline would end an implicit
    # transaction between the check and the statement, but cannot end this one.
    state = _state(connection)
    helper = raw.cursor()
    try:
        with raw.pipeline():
            if own:
                helper.execute("BEGIN")
            helper.execute(_check_sql(tuple(path), False, state.terms))
            result = execute(sql, params, many, context)
            if own:
                helper.execute("COMMIT")
    except Exception as exc:
        state.pinned = None
        if own and raw.info.transaction_status != _IDLE:
            with contextlib.suppress(Exception):
                helper.execute("ROLLBACK")
        failure = _check_failure(exc, path, state.terms)
        if failure is None:
            raise
        raise failure from exc
    finally:
        helper.close()
    _log_pin(path, path[0])
    state.pinned = tuple(path) if raw.info.transaction_status == _INTRANS else None
    return result


def _in_own_transaction(
    connection: Any,
    cursor: Any,
    path: list[str],
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
        pin(connection, cursor, path)
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
    path: list[str],
    sql: str,
    execute: Callable[..., Any],
    params: Any,
    many: bool,
    context: dict[str, Any],
    status: int,
) -> Any:
    if is_pooled(connection):
        statement = statements.short(sql, 80)
        if _active_aliases[connection.alias] > 0:
            advice = (
                "Run this migration over a direct (non-pooled) connection: add a DATABASES "
                "entry that points at PostgreSQL itself and pass its alias with --database"
            )
        else:
            advice = (
                "Run it over a direct (non-pooled) connection: add a DATABASES entry that "
                "points at PostgreSQL itself and use it for this statement "
                "(connections[alias].cursor())"
            )
        raise PooledStatementError(
            f'Schema "{path[0]}": "{statement}" cannot run inside a transaction block, so '
            f"its search_path cannot be pinned through a transaction pooler. {advice} (or set "
            "TENANTSAFE_TRANSACTION_POOLER = False if no pooler is in between).",
            schema=path[0],
        )
    if status == _IDLE:
        # Directly connected the session is ours: a session-level path holds.
        pin(connection, cursor, path, local=False)
    return execute(sql, params, many, context)


def _begin_pinned(connection: Any, cursor: Any, path: list[str]) -> None:
    """``BEGIN`` and the check in one simple query: an explicit transaction pinned to ``path``."""
    state = _state(connection)
    try:
        cursor.execute(f"BEGIN;\n{_check_sql(tuple(path), False, state.terms)}")
    except Exception as exc:
        state.pinned = None
        with contextlib.suppress(Exception):
            cursor.execute("ROLLBACK")
        failure = _check_failure(exc, path, state.terms)
        if failure is None:
            raise
        raise failure from exc
    _log_pin(path, path[0])
    state.pinned = tuple(path)


def _streamed(
    connection: Any,
    raw: Any,
    path: list[str],
    execute: Callable[..., Any],
    sql: Any,
    params: Any,
    many: bool,
    context: dict[str, Any],
) -> Any:
    # Django declares the cursor WITH HOLD in autocommit, to outlive its transaction in the
    # session; through a pooler it must stay inside one instead. It is closed before COMMIT,
    # which would otherwise materialize its remaining rows and leave it on the server
    # connection for whichever client comes next.
    wrapper: _GuardedCursor = context["cursor"]
    state = _state(connection)
    with contextlib.closing(raw.cursor()) as helper:
        _begin_pinned(connection, helper, path)
        try:
            result = execute(sql, params, many, context)
        except BaseException:
            with contextlib.suppress(Exception):
                helper.execute("ROLLBACK")
            state.pinned = None
            raise
    stream = _Stream(tuple(path))
    stream.cursors[wrapper.cursor.name] = weakref.ref(wrapper)
    state.stream = stream
    wrapper._tenantsafe_stream = stream
    wrapper._tenantsafe_rows = None
    return result


def _end_stream(connection: Any, *, keep_rows: bool = True) -> None:
    """End the stream's transaction; a cursor still open reads its remaining rows from memory.

    Never from a finalizer: a garbage-collected cursor is closed here, by name, at the
    connection's next use (the driver's connection may be busy, or owned by another thread,
    while the collector runs).
    """
    state = _state(connection)
    stream = state.stream
    if stream is None:
        return
    state.stream = None
    state.pinned = None
    raw = connection.connection
    if raw is None or raw.closed:
        return
    status = raw.info.transaction_status
    with contextlib.closing(raw.cursor()) as helper:
        for name, ref in stream.cursors.items():
            wrapper = ref()
            if wrapper is not None:
                wrapper._tenantsafe_detach(keep_rows and status == _INTRANS)
            elif status == _INTRANS:
                helper.execute(f"CLOSE {connection.ops.quote_name(name)}")
        if status == _INTRANS:
            helper.execute("COMMIT")
        elif status == _INERROR:
            helper.execute("ROLLBACK")


@contextlib.contextmanager
def _pinned(wrapper: CursorWrapper) -> Iterator[None]:
    """Pin the path around one driver call that execute wrappers do not see (COPY, callproc)."""
    connection: Any = wrapper.db
    _end_stream(connection)
    if not is_active(connection) or not hasattr(connection, "_get_cursor_search_paths"):
        yield
        return
    path = search_path(connection)
    state = _state(connection)
    raw = connection.connection
    status = raw.info.transaction_status
    if status == _INERROR or (status == _INTRANS and state.pinned == tuple(path)):
        yield
        return
    own = status == _IDLE and connection.get_autocommit()
    with contextlib.closing(raw.cursor()) as helper:
        with connection.wrap_database_errors:
            if own:
                _begin_pinned(connection, helper, path)
            else:
                pin(connection, helper, path)
        if not own:
            yield
            return
        # COPY and callproc are transactions of their own in autocommit: give them an
        # explicit one, as _in_own_transaction does for statements.
        try:
            yield
        except BaseException:
            state.pinned = None
            with contextlib.suppress(Exception):
                helper.execute("ROLLBACK")
            raise
        state.pinned = None
        with connection.wrap_database_errors:
            helper.execute("COMMIT")


class _GuardedCursor(CursorWrapper):
    """Django's cursor wrapper with the calls execute wrappers do not see pinned too.

    Mixed in front of whatever class the connection's ``make_cursor``/``make_debug_cursor``
    returns (Django's, a backend's, a debug toolbar's base).
    """

    # The stream this (server-side) cursor is read in; rows once it was detached from it.
    _tenantsafe_stream: _Stream | None = None
    _tenantsafe_rows: collections.deque[Any] | None = None

    def callproc(self, procname: Any, params: Any = None, kparams: Any = None) -> Any:
        with _pinned(self):
            return super().callproc(procname, params, kparams)

    @contextlib.contextmanager
    def copy(self, statement: Any, params: Any = None, **kwargs: Any) -> Iterator[Any]:
        debug = (
            self.debug_sql(statement)
            if isinstance(self, CursorDebugWrapper)
            else contextlib.nullcontext()
        )
        with debug, _pinned(self), self.cursor.copy(statement, params, **kwargs) as copy:
            yield copy

    def stream(self, query: Any, params: Any = None, **kwargs: Any) -> Iterator[Any]:
        # psycopg 3's single-row mode: pinned from the first row to the last.
        with _pinned(self):
            yield from self.cursor.stream(query, params, **kwargs)

    def copy_expert(self, sql: Any, file: Any, *args: Any, **kwargs: Any) -> Any:
        with _pinned(self):
            return self._tenantsafe_inner("copy_expert")(sql, file, *args, **kwargs)

    def copy_from(self, file: Any, table: str, *args: Any, **kwargs: Any) -> Any:
        with _pinned(self):
            return self._tenantsafe_inner("copy_from")(file, table, *args, **kwargs)

    def copy_to(self, file: Any, table: str, *args: Any, **kwargs: Any) -> Any:
        with _pinned(self):
            return self._tenantsafe_inner("copy_to")(file, table, *args, **kwargs)

    def _tenantsafe_inner(self, name: str) -> Any:
        # The backend's debug wrapper records psycopg2's COPY methods; the plain one has none.
        try:
            return getattr(super(), name)
        except AttributeError:
            return getattr(self.cursor, name)

    # Not streaming (almost always): as Django's wrapper, one attribute check more.
    def fetchone(self) -> Any:
        if self._tenantsafe_stream is None and self._tenantsafe_rows is None:
            with self.db.wrap_database_errors:
                return self.cursor.fetchone()
        if self._tenantsafe_rows is not None:
            return self._tenantsafe_rows.popleft() if self._tenantsafe_rows else None
        return self._tenantsafe_read(self.cursor.fetchone, lambda row: row is None)

    def fetchmany(self, size: int | None = None) -> Any:
        if self._tenantsafe_stream is None and self._tenantsafe_rows is None:
            with self.db.wrap_database_errors:
                return self.cursor.fetchmany(size) if size else self.cursor.fetchmany()
        size = size or self.cursor.arraysize
        if self._tenantsafe_rows is not None:
            rows = self._tenantsafe_rows
            return [rows.popleft() for _ in range(min(size, len(rows)))]
        return self._tenantsafe_read(
            lambda: self.cursor.fetchmany(size), lambda rows: len(rows) < size
        )

    def fetchall(self) -> Any:
        if self._tenantsafe_stream is None and self._tenantsafe_rows is None:
            with self.db.wrap_database_errors:
                return self.cursor.fetchall()
        if self._tenantsafe_rows is not None:
            rows = list(self._tenantsafe_rows)
            self._tenantsafe_rows.clear()
            return rows
        return self._tenantsafe_read(self.cursor.fetchall, lambda rows: True)

    def __iter__(self) -> Iterator[Any]:
        if self._tenantsafe_stream is None and self._tenantsafe_rows is None:
            yield from super().__iter__()
            return
        size = getattr(self.cursor, "itersize", 100)
        while rows := self.fetchmany(size):
            yield from rows

    def close(self) -> None:
        if self._tenantsafe_stream is not None:
            self._tenantsafe_release()
            self._tenantsafe_rows = None
        self.cursor.close()

    def _tenantsafe_read(self, fetch: Callable[[], Any], done: Callable[[Any], bool]) -> Any:
        try:
            with self.db.wrap_database_errors:
                result = fetch()
        except BaseException:
            # The transaction is aborted (or the connection broken): do not leave it so.
            with contextlib.suppress(Exception):
                _end_stream(self.db, keep_rows=False)
            raise
        if done(result):
            self._tenantsafe_release()
            # Read to the end: later reads find nothing, as on an open cursor.
            self._tenantsafe_rows = collections.deque()
        return result

    def _tenantsafe_release(self) -> None:
        """This cursor is done: close it; the last one of the stream ends the transaction."""
        stream = self._tenantsafe_stream
        assert stream is not None
        self._tenantsafe_stream = None
        stream.cursors.pop(self.cursor.name, None)
        self.cursor.close()
        if not stream.cursors and _state(self.db).stream is stream:
            _end_stream(self.db)

    def _tenantsafe_detach(self, keep_rows: bool) -> None:
        stream = self._tenantsafe_stream
        assert stream is not None
        self._tenantsafe_stream = None
        rows = self.cursor.fetchall() if keep_rows else []
        if rows:
            logger.warning(
                "schema %s: server-side cursor %s was still open when the connection ran "
                "another statement; through a transaction pooler it cannot stay open across "
                "that, so its remaining %d rows were fetched into memory. Run the loop inside "
                "transaction.atomic() to keep streaming.",
                stream.path[0],
                self.cursor.name,
                len(rows),
            )
        self._tenantsafe_rows = collections.deque(rows) if keep_rows else None
        self.cursor.close()


_guarded_classes: dict[type[CursorWrapper], type[CursorWrapper]] = {}


def _guarded_class(base: type[CursorWrapper]) -> type[CursorWrapper]:
    guarded = _guarded_classes.get(base)
    if guarded is None:
        if issubclass(base, _GuardedCursor):
            guarded = base
        elif base is CursorWrapper:
            guarded = _GuardedCursor
        else:
            guarded = type(f"Guarded{base.__name__}", (_GuardedCursor, base), {})
        _guarded_classes[base] = guarded
    return guarded


def _guarding_cursors(make: Callable[[Any], CursorWrapper]) -> Callable[[Any], CursorWrapper]:
    def wrapper(cursor: Any) -> CursorWrapper:
        wrapped = make(cursor)
        wrapped.__class__ = _guarded_class(type(wrapped))
        return wrapped

    return wrapper


def _user_query(connection: Any, last_executed_query: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(cursor: Any, sql: Any, params: Any) -> Any:
        query = last_executed_query(cursor, sql, params)
        merged = _state(connection).merged
        if isinstance(query, str) and merged is not None:
            check, escaped = merged
            prefix = f"{check.replace('%%', '%') if escaped else check};\n"
            if query.startswith(prefix):
                return query[len(prefix) :]
        return query

    return wrapper


def _ending_stream(
    method: Callable[..., Any], connection: Any, *, keep_rows: bool = True, cleanup: bool = False
) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _state(connection).stream is not None:
            if not cleanup:
                _end_stream(connection, keep_rows=keep_rows)
            else:
                try:
                    _end_stream(connection, keep_rows=keep_rows)
                except Exception:
                    # Closing or checking the connection anyway: one that could not end the
                    # transaction is unusable, and Django closes it.
                    connection.errors_occurred = True
        return method(*args, **kwargs)

    return wrapper


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
    # Calls execute wrappers do not see (COPY, callproc, a server-side cursor's fetches).
    for name in ("make_cursor", "make_debug_cursor"):
        setattr(connection, name, _guarding_cursors(getattr(connection, name)))
    connection.ops.last_executed_query = _user_query(  # type: ignore[method-assign]
        connection, connection.ops.last_executed_query
    )
    # The pinned path is gone with the transaction; these end it without a statement.
    for name in ("commit", "rollback", "savepoint_rollback", "close"):
        setattr(connection, name, _resetting(getattr(connection, name), state))
    # A stream's transaction must end before Django starts or ends one of its own, and at
    # request boundaries (the connection may sit unused until the next request).
    for name in ("commit", "rollback", "set_autocommit"):
        setattr(connection, name, _ending_stream(getattr(connection, name), connection))
    connection.close_if_unusable_or_obsolete = _ending_stream(  # type: ignore[method-assign]
        connection.close_if_unusable_or_obsolete, connection, cleanup=True
    )
    connection.close = _ending_stream(  # type: ignore[method-assign]
        connection.close, connection, keep_rows=False, cleanup=True
    )
    connection._tenantsafe_installed = True  # type: ignore[attr-defined]


def _on_connection_created(sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    install(connection)


__all__ = [
    "guarding",
    "install",
    "is_active",
    "is_pooled",
    "read_path",
]
