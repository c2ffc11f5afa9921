"""How the guard pins one call: the facts about it (:class:`Call`) and the one decision
(:func:`decide`) that the execute wrapper and the driver calls it does not see (COPY,
callproc) share.

A new way to pin (another driver, another server: a connection on Citus) is a new fact on
:class:`Call`, read in :func:`decide`, and a new :class:`Strategy` in ``strategies``.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

from django.db.backends.postgresql.psycopg_any import is_psycopg3

from tenantsafe.guard import state
from tenantsafe.guard.pinning import search_path
from tenantsafe.guard.pooler import is_pooled
from tenantsafe.guard.sql import Terms
from tenantsafe.guard.state import IDLE, INERROR, INTRANS
from tenantsafe.statements import NON_TRANSACTIONAL, SETTING, TRANSACTION_CONTROL

if is_psycopg3:
    import psycopg


class Strategy(enum.Enum):
    # Run as it is: reads no tenant data, already pinned, or the transaction already failed.
    AS_IS = "as is"
    # Starts or ends a transaction: run it, then forget the pin.
    CONTROL = "control"
    # Cannot run in a transaction, and a pooler is in between: refused.
    REFUSED = "refused"
    # Cannot run in a transaction, connected directly and idle: the session's path is pinned.
    SESSION = "session"
    # ``<check>;\n<statement>`` as one simple query.
    MERGED = "merged"
    # BEGIN, the check, the statement, COMMIT in one pipeline (psycopg 3).
    PIPELINED = "pipelined"
    # A server-side cursor through a pooler: declared in a pinned transaction kept open while
    # it is read.
    STREAMED = "streamed"
    # A read while a stream is open, under READ COMMITTED: in the stream's transaction,
    # behind a savepoint, so the stream keeps streaming (cursor.joins_stream decided it).
    JOINED = "joined"
    # Autocommit: a transaction of its own, pinned, around the statement or driver call.
    OWN_TRANSACTION = "own transaction"
    # In the caller's transaction: pinned step by step before the statement or driver call.
    IN_TRANSACTION = "in transaction"


class Call(NamedTuple):
    """One statement (or driver call) on a guarded connection, and what decides how it is
    pinned. Immutable; a NamedTuple rather than a frozen dataclass because one is made for
    every statement, and a frozen dataclass takes several times longer to make."""

    connection: Any
    path: tuple[str, ...]
    # libpq's transaction status before the call.
    status: int
    autocommit: bool
    # The transaction is already pinned to ``path``.
    pinned: bool
    # Asked only when the decision needs it: detecting a pooler may run a query.
    pooled: Callable[[], bool]
    terms: Terms | None = None
    # A driver call execute wrappers do not see (COPY, callproc, stream): nothing to merge.
    driver: bool = False
    # The statement as Django's execute wrappers get it; ``text`` when it is a str.
    sql: Any = None
    params: Any = None
    many: bool = False
    execute: Callable[..., Any] | None = None
    context: Any = None
    # A named (server-side) cursor: it runs one statement only.
    named: bool = False
    # The cursor sends a simple query, which may hold several statements.
    merges: bool = False
    # The driver can pipeline (psycopg 3 on libpq >= 14, not in a pipeline already).
    pipelines: bool = False
    # A stream is open on the connection: the statement runs in its transaction.
    streaming: bool = False

    @property
    def text(self) -> str | None:
        return self.sql if isinstance(self.sql, str) else None

    @property
    def own(self) -> bool:
        """Autocommit and idle: the call would be a transaction of its own."""
        return self.status == IDLE and self.autocommit

    @property
    def raw(self) -> Any:
        """The driver's connection."""
        return self.connection.connection

    @property
    def raw_cursor(self) -> Any:
        return self.context["cursor"].cursor

    def run(self, sql: Any = None) -> Any:
        """Run the statement (or ``sql`` in its place) through the remaining execute wrappers."""
        assert self.execute is not None
        if sql is None:
            return self.execute(self.sql, self.params, self.many, self.context)
        return self.execute(sql, self.params, False, self.context)


def statement(execute: Callable[..., Any], sql: Any, params: Any, many: bool, context: Any) -> Call:
    """The call an execute wrapper was given."""
    connection = context["connection"]
    raw_cursor = context["cursor"].cursor
    return _call(
        connection,
        sql=sql,
        params=params,
        many=many,
        execute=execute,
        context=context,
        named=bool(getattr(raw_cursor, "name", None)),
        merges=_merges(connection.connection, raw_cursor),
        pipelines=_pipelines(connection.connection),
    )


def driver_call(connection: Any) -> Call:
    """A driver call on ``connection`` (COPY, callproc, stream)."""
    return _call(connection, driver=True)


def _call(connection: Any, **call: Any) -> Call:
    kept = state.of(connection)
    path = tuple(search_path(connection))
    return Call(
        connection=connection,
        path=path,
        status=connection.connection.info.transaction_status,
        autocommit=connection.get_autocommit(),
        pinned=kept.pinned == path,
        streaming=kept.stream is not None,
        pooled=functools.partial(_pooled, connection),
        terms=kept.terms,
        **call,
    )


def _pooled(connection: Any) -> bool:
    # Detection may query the server: its errors are Django's, as the statement's would be.
    with connection.wrap_database_errors:
        return is_pooled(connection)


def decide(call: Call) -> Strategy:
    """How to pin ``call``: the first rule that applies, cheapest strategy first."""
    text = call.text
    if text is not None:
        if TRANSACTION_CONTROL.match(text):
            return Strategy.CONTROL
        if SETTING.match(text):
            return Strategy.AS_IS
        if NON_TRANSACTIONAL.match(text):
            if call.pooled():
                return Strategy.REFUSED
            return Strategy.SESSION if call.status == IDLE else Strategy.AS_IS
    if call.streaming:
        return Strategy.JOINED
    if call.status == INERROR or (call.status == INTRANS and call.pinned):
        return Strategy.AS_IS
    if call.driver:
        return Strategy.OWN_TRANSACTION if call.own else Strategy.IN_TRANSACTION
    if call.named and call.own and call.pooled():
        return Strategy.STREAMED
    if text is not None and not call.many and not call.named and call.merges:
        return Strategy.MERGED
    if not call.named and call.pipelines:
        return Strategy.PIPELINED
    return Strategy.OWN_TRANSACTION if call.own else Strategy.IN_TRANSACTION


def _merges(raw: Any, raw_cursor: Any) -> bool:
    if is_psycopg3:
        # A client-side binding cursor sends a simple query, which may hold several
        # statements; a pipeline would force the extended protocol, which may not.
        return isinstance(raw_cursor, psycopg.ClientCursor) and not raw.pgconn.pipeline_status
    return True


def _pipelines(raw: Any) -> bool:
    return is_psycopg3 and _pipeline_supported() and not raw.pgconn.pipeline_status


@functools.cache
def _pipeline_supported() -> bool:
    # The libpq psycopg loaded is the process's for good; asking costs microseconds.
    return bool(psycopg.Pipeline.is_supported())
