"""The cursor-level search_path guard. Internal: its modules may change without notice; the
names below are what the rest of tenantsafe uses.

django-tenants issues a session-level ``SET search_path`` when Django opens a cursor. In
autocommit that ``SET`` is a transaction of its own, so a transaction pooler (pgbouncer in
``pool_mode = transaction``, RDS Proxy) may run it on one server connection and the statements
after it on another. The guard pins the path to the statements themselves: while it is on for
a connection, every statement runs in a transaction that set the tenant's search_path with
``set_config(..., is_local => true)`` and checked ``current_schema()`` before the statement.

It is one execute wrapper, put on every connection by :func:`install` (called from
``AppConfig.ready()`` and on ``connection_created``; ``install`` says what else it wraps and
why). It is switched on

* for one alias while ``migrate_schemas_safe`` runs (:func:`guarding`), which forked executor
  workers inherit;
* for every alias when ``TENANTSAFE_RUNTIME_GUARD = True`` (``tenantsafe.conf``).

Every call goes the same way: ``dispatch`` describes it as one frozen value (a ``Call``: the
path, the transaction status, the cursor, whether a pooler is in between...), ``decide()``
picks a strategy, and ``strategies`` runs it. How a statement is pinned, cheapest first:

* merged: ``<check>; <statement>`` as one simple query. PostgreSQL runs a multi-statement query
  as one transaction (an implicit one in autocommit), so no pooler can separate the two, and it
  costs no extra round trip. Used for Django's default cursors (psycopg 3 client-side binding,
  psycopg2).
* pipelined (psycopg 3 server-side binding cursors, ``executemany``): ``BEGIN``, the check, the
  statement and ``COMMIT`` sent in one pipeline, one round trip.
* step by step (named cursors, psycopg2 ``executemany``): ``BEGIN``, the pin verified in Python,
  the statement, ``COMMIT``.

The check (``sql``) raises inside PostgreSQL when ``current_schema()`` is not the tenant's
schema, so the transaction is aborted before the statement runs; the error is re-raised as
:class:`~tenantsafe.errors.SearchPathError`.

What execute wrappers do not see, the guard's cursor wrapper class (``cursor.GuardedCursor``,
put on every cursor by the connection's ``make_cursor``/``make_debug_cursor``) covers:

* ``copy()`` and ``stream()`` (psycopg 3), ``copy_expert``/``copy_from``/``copy_to`` (psycopg2)
  and ``callproc`` run pinned: in autocommit inside ``BEGIN; <check>`` ... ``COMMIT`` of their
  own.
* A server-side cursor opened in autocommit through a pooler cannot live in the session (its
  FETCHes would reach other server connections), so its DECLARE runs in a transaction the guard
  opens and pins (a *stream*), kept open while the cursor is read. Under READ COMMITTED a read
  meanwhile runs in that transaction, behind a savepoint (it takes a snapshot of its own there
  too). Anything else ends the stream first, a live cursor's remaining rows fetched into
  memory so that it reads on correctly. The stream also ends (CLOSE, COMMIT) when its cursors
  are closed or read to the end; a cursor closed by another thread (an event loop finalizing
  an abandoned async iterator) or garbage-collected is closed by the connection's own thread
  at its next use or when the request ends: no driver call is made from a thread that does
  not own the connection.
* With ``DEBUG``, ``connection.queries`` records the statement the code ran: the connection's
  ``ops.last_executed_query`` leaves the merged check out.

The modules, each using only those above it:

* ``sql``: the SQL that pins a path and checks the terms, and what its failures mean (pure);
* ``streams``: a stream's books, and who may touch them from which thread;
* ``state``: what the guard keeps per connection (one attribute) and which aliases it guards;
* ``pooler``: whether a transaction pooler stands in between;
* ``pinning``: pinning by hand, for driver cursors the guard does not see;
* ``dispatch``: the ``Call`` value and ``decide()``;
* ``strategies``: one function per strategy;
* ``cursor``: the execute wrapper, the guarded cursor class, which statements join a stream
  and how a stream ends;
* ``install``: putting the guard on connections and switching it on.
"""

from __future__ import annotations

from tenantsafe.guard.install import guarding, install
from tenantsafe.guard.pinning import (
    pin,
    pinned_transaction,
    raw_transaction,
    read_path,
    search_path,
    with_terms,
)
from tenantsafe.guard.pooler import is_pooled
from tenantsafe.guard.sql import Terms
from tenantsafe.guard.state import is_active

__all__ = [
    "Terms",
    "guarding",
    "install",
    "is_active",
    "is_pooled",
    "pin",
    "pinned_transaction",
    "raw_transaction",
    "read_path",
    "search_path",
    "with_terms",
]
