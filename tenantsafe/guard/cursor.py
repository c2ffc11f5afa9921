"""Where calls enter the guard: the execute wrapper (:func:`guarded_execute`) and the cursor
wrapper class for what execute wrappers do not see (:class:`GuardedCursor`), with the streams
that keep a server-side cursor's transaction open while it is read through a pooler."""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from django.db.backends.utils import CursorDebugWrapper, CursorWrapper

from tenantsafe import registry
from tenantsafe.guard import dispatch, state, strategies
from tenantsafe.guard.state import INERROR, INTRANS, Stream

logger = logging.getLogger("tenantsafe.guard")


def _guarded(connection: Any) -> bool:
    return state.is_active(connection) and hasattr(connection, "_get_cursor_search_paths")


def guarded_execute(
    execute: Callable[..., Any], sql: Any, params: Any, many: bool, context: dict[str, Any]
) -> Any:
    """The execute wrapper: every statement Django runs on the connection comes through."""
    connection = context["connection"]
    if state.of(connection).stream is not None:
        # Any other statement ends the stream: the pooler's server connection is not kept
        # for the statements around a cursor being read.
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


def end_stream(connection: Any, *, keep_rows: bool = True) -> None:
    """End the stream's transaction; a cursor still open reads its remaining rows from memory.

    Never from a finalizer: a garbage-collected cursor is closed here, by name, at the
    connection's next use (the driver's connection may be busy, or owned by another thread,
    while the collector runs).
    """
    kept = state.of(connection)
    stream = kept.stream
    if stream is None:
        return
    kept.stream = None
    kept.pinned = None
    raw = connection.connection
    if raw is None or raw.closed:
        return
    status = raw.info.transaction_status
    with contextlib.closing(raw.cursor()) as helper:
        for name, ref in stream.cursors.items():
            wrapper = ref()
            if wrapper is not None:
                wrapper._tenantsafe_detach(keep_rows and status == INTRANS)
            elif status == INTRANS:
                helper.execute(f"CLOSE {connection.ops.quote_name(name)}")
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
        if isinstance(self._tenantsafe, Stream):
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
        stream.cursors.pop(self.cursor.name, None)
        self.cursor.close()
        if not stream.cursors and state.of(self.db).stream is stream:
            end_stream(self.db)

    def _tenantsafe_detach(self, keep_rows: bool) -> None:
        """Leave the stream (end_stream() ends it), with the remaining rows if ``keep_rows``."""
        stream = self._tenantsafe
        assert isinstance(stream, Stream)
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
