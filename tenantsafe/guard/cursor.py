"""Where calls enter the guard: the execute wrapper (:func:`guarded_execute`) and the cursor
wrapper class for what execute wrappers do not see (:class:`GuardedCursor`), with the streams
that keep a server-side cursor's transaction open while it is read through a pooler: which
statements join one (:func:`joins_stream`), and how it ends (:func:`end_stream`).

Every driver call here is made by the thread that owns the connection (``streams`` says why):
a cursor another thread closes is only handed over, and closed at the connection's next use."""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from django.db.backends.utils import CursorDebugWrapper, CursorWrapper

from tenantsafe import registry, statements
from tenantsafe.guard import dispatch, state, strategies
from tenantsafe.guard.state import INERROR, INTRANS
from tenantsafe.guard.streams import Stream, owns
from tenantsafe.statements import SETTING

logger = logging.getLogger("tenantsafe.guard")


def _guarded(connection: Any) -> bool:
    return state.is_active(connection) and hasattr(connection, "_get_cursor_search_paths")


def guarded_execute(
    execute: Callable[..., Any], sql: Any, params: Any, many: bool, context: dict[str, Any]
) -> Any:
    """The execute wrapper: every statement Django runs on the connection comes through."""
    connection = context["connection"]
    stream = state.of(connection).stream
    if stream is not None and not joins_stream(connection, stream, sql, many, context):
        # The pooler's server connection is not kept for other statements around a cursor
        # being read.
        end_stream(connection)
    if not _guarded(connection):
        return execute(sql, params, many, context)
    call = dispatch.statement(execute, sql, params, many, context)
    return strategies.run(dispatch.decide(call), call)


@contextlib.contextmanager
def _pinned(wrapper: CursorWrapper) -> Iterator[None]:
    """Pin the path around one driver call that execute wrappers do not see (COPY, callproc)."""
    connection: Any = wrapper.db
    end_stream(connection)
    if not _guarded(connection):
        yield
        return
    call = dispatch.driver_call(connection)
    with strategies.around(dispatch.decide(call), call):
        yield


def joins_stream(connection: Any, stream: Stream, sql: Any, many: bool, context: Any) -> bool:
    """Whether ``sql`` runs in the open stream's transaction, which then stays open.

    Under READ COMMITTED a read there sees what it would see in a transaction of its own (a
    snapshot of its own), so it joins (``statements.joins_stream`` says which statements are
    such reads): the stream keeps streaming. So does a session setting. Anything else (a
    write, a lock, another server-side cursor, Django's own transactions, REPEATABLE READ or
    SERIALIZABLE) ends the stream first. Cursors another thread closed are closed here.
    """
    abandoned, live = stream.settle()
    for driver_cursor in abandoned:
        with connection.wrap_database_errors:
            driver_cursor.close()
    if not live or many or not isinstance(sql, str):
        return False
    if SETTING.match(sql):
        # django-tenants' SET search_path before a cursor's first statement: a session
        # setting, whose meaning a transaction does not change.
        return True
    return (
        stream.read_committed
        and statements.joins_stream(sql)
        and not getattr(context["cursor"].cursor, "name", None)
        and _guarded(connection)
    )


def end_stream(connection: Any, *, keep_rows: bool = True) -> None:
    """End the stream's transaction; a cursor still open reads its remaining rows from memory.

    The connection's owner only, never from a finalizer: a cursor garbage-collected, or closed
    by another thread, is closed here, at the connection's next use or when the request ends.
    """
    kept = state.of(connection)
    stream = kept.stream
    if stream is None:
        return
    kept.stream = None
    kept.pinned = None
    cursors, abandoned = stream.end()
    raw = connection.connection
    if raw is None or raw.closed:
        return
    status = raw.info.transaction_status
    with contextlib.closing(raw.cursor()) as helper:
        for name, wrapper in cursors:
            if wrapper is not None:
                wrapper._tenantsafe_detach(stream, keep_rows and status == INTRANS)
            elif status == INTRANS:
                helper.execute(f"CLOSE {connection.ops.quote_name(name)}")
        for driver_cursor in abandoned:
            # Before COMMIT, which would materialize a WITH HOLD cursor's remaining rows.
            driver_cursor.close()
        if status == INTRANS:
            helper.execute("COMMIT")
        elif status == INERROR:
            helper.execute("ROLLBACK")


class GuardedCursor(CursorWrapper):
    """Django's cursor wrapper with the calls execute wrappers do not see pinned too.

    Mixed in front of whatever class the connection's ``make_cursor``/``make_debug_cursor``
    returns (Django's, a backend's, a debug toolbar's base).
    """

    # How this cursor is read. None: as Django's wrapper reads it. A Stream: a server-side
    # cursor read in the transaction the guard holds open for it. A deque: its rows in
    # memory (fetched when it left its stream; empty once read to the end).
    _tenantsafe: Stream | collections.deque[Any] | None = None
    # Declared in a stream once: from then on only the connection's owner closes its driver
    # cursor (whose close waits for the connection's lock).
    _tenantsafe_streamed = False

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
        reading = self._tenantsafe
        if reading is None:
            with self.db.wrap_database_errors:
                return self.cursor.fetchone()
        if isinstance(reading, collections.deque):
            return reading.popleft() if reading else None
        return self._tenantsafe_read(self.cursor.fetchone, lambda row: row is None)

    def fetchmany(self, size: int | None = None) -> Any:
        reading = self._tenantsafe
        if reading is None:
            with self.db.wrap_database_errors:
                return self.cursor.fetchmany(size) if size else self.cursor.fetchmany()
        size = size or self.cursor.arraysize
        if isinstance(reading, collections.deque):
            return [reading.popleft() for _ in range(min(size, len(reading)))]
        return self._tenantsafe_read(
            lambda: self.cursor.fetchmany(size), lambda rows: len(rows) < size
        )

    def fetchall(self) -> Any:
        reading = self._tenantsafe
        if reading is None:
            with self.db.wrap_database_errors:
                return self.cursor.fetchall()
        if isinstance(reading, collections.deque):
            rows = list(reading)
            reading.clear()
            return rows
        return self._tenantsafe_read(self.cursor.fetchall, lambda rows: True)

    def __iter__(self) -> Iterator[Any]:
        if self._tenantsafe is None:
            yield from super().__iter__()
            return
        size = getattr(self.cursor, "itersize", 100)
        while rows := self.fetchmany(size):
            yield from rows

    def close(self) -> None:
        reading = self._tenantsafe
        if self._tenantsafe_streamed and not owns(self.db):
            # Another thread (an event loop collecting an abandoned async iterator): no
            # driver call, which would wait for the owner's; the owner closes it.
            if isinstance(reading, Stream) and reading.abandon(self.cursor.name, self.cursor):
                self._tenantsafe = collections.deque()
            return
        if isinstance(reading, Stream):
            self._tenantsafe_release()
        self.cursor.close()

    def _tenantsafe_read(self, fetch: Callable[[], Any], done: Callable[[Any], bool]) -> Any:
        try:
            with self.db.wrap_database_errors:
                result = fetch()
        except BaseException:
            # The transaction is aborted (or the connection broken): do not leave it so.
            with contextlib.suppress(Exception):
                end_stream(self.db, keep_rows=False)
            raise
        if done(result):
            self._tenantsafe_release()
            # Read to the end: later reads find nothing, as on an open cursor.
            self._tenantsafe = collections.deque()
        return result

    def _tenantsafe_release(self) -> None:
        """This cursor is done: close it; the last one of the stream ends the transaction."""
        stream = self._tenantsafe
        assert isinstance(stream, Stream)
        self._tenantsafe = None
        last = stream.release(self.cursor.name)
        self.cursor.close()
        if last and state.of(self.db).stream is stream:
            end_stream(self.db)

    def _tenantsafe_detach(self, stream: Stream, keep_rows: bool) -> None:
        """Leave ``stream`` (end_stream() ends it), with the remaining rows if ``keep_rows``."""
        self._tenantsafe = None
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
        self._tenantsafe = collections.deque(rows) if keep_rows else None
        self.cursor.close()


# Base cursor wrapper class -> its guarded subclass, made once per base.
_classes: dict[type[CursorWrapper], type[CursorWrapper]] = registry.cache(
    "tenantsafe.guard.cursor.classes"
)


def guarded_class(base: type[CursorWrapper]) -> type[CursorWrapper]:
    guarded = _classes.get(base)
    if guarded is None:
        if issubclass(base, GuardedCursor):
            guarded = base
        elif base is CursorWrapper:
            guarded = GuardedCursor
        else:
            guarded = type(f"Guarded{base.__name__}", (GuardedCursor, base), {})
        _classes[base] = guarded
    return guarded
