"""What went wrong in a tenant, in one line, and getting the connection back afterwards.

A failed tenant is reported by one sentence (its error, with the class of error for anything
but tenantsafe's own, which already name the schema); a lock timeout says which statement
waited and who held the lock. The classifiers read the SQLSTATE along the exception chain
(:func:`tenantsafe.errors.sqlstate`), so they work on the driver's error and on Django's
wrapper alike.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from typing import Any

from django.db import connections

from tenantsafe import statements
from tenantsafe.errors import SchemaNameError, SearchPathError, sqlstate
from tenantsafe.options import RunOptions

logger = logging.getLogger("tenantsafe.migrate")

LOCK_TIMEOUT = "55P03"
# Server going away: terminated by an administrator, crash shutdown, cannot connect now.
_SHUTDOWN = ("57P01", "57P02", "57P03")
# What the summary's "connection lost" failures start with (the run checks for an outage).
CONNECTION_LOST = "the connection to the database was lost"


class LockWaits:
    """Execute wrapper noting the statement that hit lock_timeout, and in which kind of
    migration (atomic ones are rolled back whole and can be tried again)."""

    def __init__(self) -> None:
        self.sql = ""
        self.atomic = False

    def __call__(
        self, execute: Any, sql: Any, params: Any, many: bool, context: dict[str, Any]
    ) -> Any:
        try:
            return execute(sql, params, many, context)
        except Exception as exc:
            if is_lock_timeout(exc):
                self.sql = sql if isinstance(sql, str) else repr(sql)
                self.atomic = context["connection"].in_atomic_block
            raise


def is_lock_timeout(exc: BaseException) -> bool:
    return sqlstate(exc) == LOCK_TIMEOUT


def is_connection_lost(exc: BaseException) -> bool:
    # Class 08 (connection exception), 57P01-57P03 (terminated, shutting down), or the
    # driver's own "the connection is lost/closed" without a SQLSTATE.
    code = sqlstate(exc)
    if code:
        return code.startswith("08") or code in _SHUTDOWN
    seen: BaseException | None = exc
    while seen is not None:
        if type(seen).__name__ in ("OperationalError", "InterfaceError"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def one_line(exc: BaseException) -> str:
    """``exc`` on one line, after its class name unless it is one of ours naming the schema."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (SearchPathError, SchemaNameError)):
        return text
    return f"{type(exc).__name__}: {text}"


def failure(
    exc: BaseException, opts: RunOptions, schema: str, waits: LockWaits, attempts: int
) -> str:
    """The summary's sentence for a tenant whose migration raised ``exc``."""
    if is_lock_timeout(exc):
        return lock_timeout(opts, waits, attempts, blockers(opts.database, schema, waits.sql))
    if is_connection_lost(exc) and not isinstance(exc, SearchPathError):
        return f"{CONNECTION_LOST}: {one_line(exc)}"
    return one_line(exc)


def lock_timeout(opts: RunOptions, waits: LockWaits, attempts: int, held: str) -> str:
    """The sentence for a lock timeout on ``waits.sql`` while ``held`` held the lock."""
    if not waits.atomic:
        tried = "in a non-atomic migration, which is not tried again (part of it is applied)"
    else:
        tried = f"tried {attempts} time(s) (--lock-retries {opts.lock_retries})"
    return (
        f"lock timeout ({opts.lock_timeout_ms} ms) on "
        f"{statements.short(waits.sql, 120)!r} waiting for "
        f"{held}; {tried}. Run again once that lock is released, or raise --lock-timeout."
    )


def named_relations(sql: str) -> list[str]:
    """Every quoted or bare word of ``sql`` that may name a relation, sorted."""
    return sorted(set(re.findall(r'"([^"]+)"', sql)) | set(re.findall(r"\b(\w+)\b", sql)))


def blockers(alias: str, schema: str, sql: str) -> str:
    """Which relations of ``schema`` that ``sql`` names are locked by others, and by whom."""
    try:
        connection: Any = connections[alias]
        connection.set_schema_to_public()
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT DISTINCT c.relname, l.pid, a.state, left(a.query, 100) "
                "FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE n.nspname = %s AND c.relname = ANY(%s) AND l.granted "
                "AND l.pid <> pg_backend_pid() ORDER BY 1, 2",
                [schema, named_relations(sql)],
            )
            rows = cursor.fetchall()
    except Exception:
        logger.debug("cannot read who holds the locks in %s", schema, exc_info=True)
        rows = []
    if not rows:
        return "a lock that is no longer held"
    return "; ".join(
        f'"{schema}".{rel} held by pid {pid}'
        + (f" ({state}: {' '.join(str(query).split())})" if state else "")
        for rel, pid, state, query in rows
    )


def to_public(alias: str) -> None:
    connection: Any = connections[alias]
    connection.set_schema_to_public()


def reset(alias: str) -> None:
    """After a failure: a fresh connection next time (the old one may be in any state)."""
    connection: Any = connections[alias]
    with contextlib.suppress(Exception):
        connection.close()
    connection.set_schema_to_public()


def reachable(alias: str) -> str:
    """Empty when ``alias`` answers within a few short tries; else the last error."""
    error = ""
    for pause in (0.0, 0.5, 1.0, 2.0, 4.0):
        time.sleep(pause)
        try:
            reset(alias)
            connection: Any = connections[alias]
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
            return ""
        except Exception as exc:
            error = " ".join(str(exc).split()) or type(exc).__name__
    return error
