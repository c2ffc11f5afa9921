"""The classifier tables of tests/unit/test_statements.py, answered by PostgreSQL itself."""

from __future__ import annotations

from tests.dbtools import connect, direct_url
from tests.unit.test_statements import NON_TRANSACTIONAL

# SQLSTATE active_sql_transaction: "... cannot run inside a transaction block".
ACTIVE_SQL_TRANSACTION = "25001"


def refused_inside_a_transaction(conn, sql: str) -> bool:
    """Whether PostgreSQL refuses ``sql`` inside a transaction block (and only for that)."""
    conn.execute("BEGIN")
    try:
        conn.execute("CREATE TEMP TABLE t (id integer)")
        conn.execute("CREATE INDEX t_idx ON t (id)")
        try:
            conn.execute(sql)
        except Exception as exc:
            error = exc
        else:
            return False
    finally:
        conn.execute("ROLLBACK")
    state = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    if state != ACTIVE_SQL_TRANSACTION:
        raise AssertionError(f"{sql}: {error}") from error
    return "cannot run inside a transaction block" in str(error)


def test_postgresql_refuses_inside_a_transaction_what_the_guard_takes_for_non_transactional():
    # A database of its own is not needed: everything runs in a transaction rolled back.
    with connect(direct_url()) as conn:
        answers = {sql: refused_inside_a_transaction(conn, sql) for sql, _ in NON_TRANSACTIONAL}
    assert answers == dict(NON_TRANSACTIONAL)
