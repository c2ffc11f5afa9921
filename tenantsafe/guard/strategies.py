"""The ways the guard pins a call, each taking the :class:`~tenantsafe.guard.dispatch.Call`
that :func:`~tenantsafe.guard.dispatch.decide` chose it for.

Statements run through :func:`run`; driver calls execute wrappers do not see (COPY,
callproc) run inside :func:`around`. What every strategy shares is written once: a check that
failed in PostgreSQL is raised as SearchPathError (:func:`_translated`), and a transaction the
guard opened is rolled back and its pin forgotten when anything fails (:func:`_rolled_back`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from django.db.backends.postgresql.psycopg_any import is_psycopg3

from tenantsafe import statements
from tenantsafe.errors import PooledStatementError
from tenantsafe.guard import sql, state
from tenantsafe.guard.dispatch import Call, Strategy
from tenantsafe.guard.pinning import log_pin, pin
from tenantsafe.guard.state import IDLE, INTRANS
from tenantsafe.guard.streams import Stream

logger = logging.getLogger("tenantsafe.guard")


def run(strategy: Strategy, call: Call) -> Any:
    """Run the statement of ``call`` pinned as ``strategy`` says; return what execute returns."""
    return _STATEMENTS[strategy](call)


@contextlib.contextmanager
def around(strategy: Strategy, call: Call) -> Iterator[None]:
    """Pin the path around one driver call (``call.driver``) that execute wrappers do not see."""
    if strategy is Strategy.AS_IS:
        yield
        return
    connection = call.connection
    with contextlib.closing(call.raw.cursor()) as helper:
        if strategy is Strategy.IN_TRANSACTION:
            with connection.wrap_database_errors:
                pin(connection, helper, call.path)
            yield
            return
        assert strategy is Strategy.OWN_TRANSACTION, strategy
        # COPY and callproc are transactions of their own in autocommit: give them an
        # explicit one, as statements get.
        with connection.wrap_database_errors:
            _begin_checked(call, helper)
        with _rolled_back(call):
            yield
        with connection.wrap_database_errors:
            _commit(call)


def _forget(call: Call) -> None:
    # The transaction the path was pinned in has ended, or may have.
    state.of(call.connection).pinned = None


def _pinned_while_open(call: Call) -> None:
    # After a statement: pinned while the transaction it ran in is still open.
    kept = state.of(call.connection)
    kept.pinned = call.path if call.raw.info.transaction_status == INTRANS else None


@contextlib.contextmanager
def _translated(call: Call) -> Iterator[None]:
    """The check failing inside PostgreSQL, raised as the SearchPathError it stands for."""
    try:
        yield
    except Exception as exc:
        _forget(call)
        failure = sql.check_failure(exc, call.path, call.terms)
        if failure is None:
            raise
        raise failure from exc


@contextlib.contextmanager
def _rolled_back(call: Call) -> Iterator[None]:
    """On any failure, roll back the transaction the guard opened and forget its pin."""
    try:
        yield
    except BaseException:
        _forget(call)
        # A cursor of its own: the one that failed may be unusable (a named one, a COPY).
        with contextlib.suppress(Exception), call.raw.cursor() as end:
            if call.raw.info.transaction_status != IDLE:
                end.execute("ROLLBACK")
        raise


def _commit(call: Call) -> None:
    # A cursor of its own, so the statement's result set stays readable.
    try:
        with call.raw.cursor() as end:
            end.execute("COMMIT")
    finally:
        _forget(call)


def _begin_checked(call: Call, cursor: Any, *, isolation: bool = False) -> str | None:
    """``BEGIN`` and the check in one simple query: an explicit transaction pinned to the path.
    With ``isolation``, the transaction's isolation level, read in the same query."""
    level: str | None = None
    with _translated(call), _rolled_back(call):
        cursor.execute(sql.begin_checked(call.path, call.terms, isolation=isolation))
        if isolation:
            if is_psycopg3:
                cursor.nextset()  # past BEGIN's result; psycopg2 keeps only the last one
            level = cursor.fetchone()[1]
    log_pin(call.path, call.path[0])
    state.of(call.connection).pinned = call.path
    return level


@contextlib.contextmanager
def _pin_cursor(call: Call) -> Iterator[Any]:
    if not call.named:
        yield call.raw_cursor
        return
    # A named (server-side) cursor runs one statement only: pin through a plain one.
    with contextlib.closing(call.raw.cursor()) as cursor:
        yield cursor


def _as_is(call: Call) -> Any:
    return call.run()


def _control(call: Call) -> Any:
    try:
        return call.run()
    finally:
        _forget(call)


def _refused(call: Call) -> Any:
    schema = call.path[0]
    if state.is_guarded(call.connection.alias):
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
        f'Schema "{schema}": "{statements.short(call.text or "", 80)}" cannot run inside a '
        "transaction block, so its search_path cannot be pinned through a transaction pooler. "
        f"{advice} (or set TENANTSAFE_TRANSACTION_POOLER = False if no pooler is in between).",
        schema=schema,
    )


def _session(call: Call) -> Any:
    # Directly connected the session is ours: a session-level path holds.
    with _pin_cursor(call) as cursor, call.connection.wrap_database_errors:
        pin(call.connection, cursor, call.path, local=False)
        return call.run()


def _merged(call: Call) -> Any:
    escaped = call.params is not None
    check = sql.check(call.path, escaped, call.terms)
    with _translated(call):
        result = call.run(sql.merged(check, call.sql))
    if is_psycopg3:
        # The check's row comes first; leave the cursor on the statement's results.
        if logger.isEnabledFor(logging.DEBUG):
            row = call.raw_cursor.fetchone()
            log_pin(call.path, row[0] if row else None)
        call.raw_cursor.nextset()
    else:
        # psycopg2 keeps the last result only; the check raised if it did not hold.
        log_pin(call.path, call.path[0])
    _pinned_while_open(call)
    state.of(call.connection).merged = (check, escaped)
    return result


def _pipelined(call: Call) -> Any:
    # Explicit BEGIN/COMMIT: a sync psycopg issued inside the pipeline would end an implicit
    # transaction between the check and the statement, but cannot end this one.
    own = call.own
    helper = call.raw.cursor()
    try:
        with (
            _translated(call),
            _rolled_back(call) if own else contextlib.nullcontext(),
            call.raw.pipeline(),
        ):
            if own:
                helper.execute("BEGIN")
            helper.execute(sql.check(call.path, False, call.terms))
            result = call.run()
            if own:
                helper.execute("COMMIT")
    finally:
        helper.close()
    log_pin(call.path, call.path[0])
    _pinned_while_open(call)
    return result


def _streamed(call: Call) -> Any:
    # Django declares the cursor WITH HOLD in autocommit, to outlive its transaction in the
    # session; through a pooler it must stay inside one instead. It is closed before COMMIT,
    # which would otherwise materialize its remaining rows and leave it on the server
    # connection for whichever client comes next.
    wrapper = call.context["cursor"]
    with call.connection.wrap_database_errors:
        with contextlib.closing(call.raw.cursor()) as helper:
            level = _begin_checked(call, helper, isolation=True)
        with _rolled_back(call):
            result = call.run()
    stream = Stream(call.path, read_committed=level == "read committed")
    stream.add(wrapper.cursor.name, wrapper)
    state.of(call.connection).stream = stream
    # The guarded cursor reads its rows in the stream (cursor.GuardedCursor).
    wrapper._tenantsafe = stream
    wrapper._tenantsafe_streamed = True
    return result


# Around a read that joins a stream: its failure must not abort the stream's transaction.
_SAVEPOINT = "SAVEPOINT tenantsafe_read"
_RELEASE = "RELEASE SAVEPOINT tenantsafe_read"


def _joined(call: Call) -> Any:
    """A read in the stream's transaction, behind a savepoint; pinned to the path unless the
    transaction already is (psycopg 3: all in one pipeline, one round trip)."""
    kept = state.of(call.connection)
    pinned = kept.pinned
    helper = call.raw.cursor()
    try:
        with call.connection.wrap_database_errors:
            if call.pipelines:
                with call.raw.pipeline():
                    helper.execute(_SAVEPOINT)
                    if not call.pinned:
                        helper.execute(sql.check(call.path, False, call.terms))
                    result = call.run()
                    helper.execute(_RELEASE)
            else:
                helper.execute(_SAVEPOINT)
                if not call.pinned:
                    pin(call.connection, helper, call.path)
                result = call.run()
                helper.execute(_RELEASE)
    except Exception as exc:
        # Rolling back to the savepoint undoes a path the check set: the one before holds.
        kept.pinned = pinned
        with contextlib.suppress(Exception):
            helper.execute(f"ROLLBACK TO {_SAVEPOINT}")
            helper.execute(_RELEASE)
        failure = sql.check_failure(exc, call.path, call.terms)
        if failure is None:
            raise
        raise failure from exc
    finally:
        helper.close()
    kept.pinned = call.path
    return result


def _own_transaction(call: Call) -> Any:
    # An autocommit statement is a transaction of its own; give it an explicit one so the
    # path and the statement reach the same server connection.
    with _pin_cursor(call) as cursor, call.connection.wrap_database_errors:
        cursor.execute("BEGIN")
        with _rolled_back(call):
            pin(call.connection, cursor, call.path)
            result = call.run()
        _commit(call)
    return result


def _in_transaction(call: Call) -> Any:
    with _pin_cursor(call) as cursor, call.connection.wrap_database_errors:
        pin(call.connection, cursor, call.path)
    return call.run()


_STATEMENTS: dict[Strategy, Callable[[Call], Any]] = {
    Strategy.AS_IS: _as_is,
    Strategy.CONTROL: _control,
    Strategy.REFUSED: _refused,
    Strategy.SESSION: _session,
    Strategy.MERGED: _merged,
    Strategy.PIPELINED: _pipelined,
    Strategy.STREAMED: _streamed,
    Strategy.JOINED: _joined,
    Strategy.OWN_TRANSACTION: _own_transaction,
    Strategy.IN_TRANSACTION: _in_transaction,
}
