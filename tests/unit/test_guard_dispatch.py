"""The guard's decision table: which strategy pins which call."""

from __future__ import annotations

from typing import Any

import pytest

from tenantsafe.guard.dispatch import Call, Strategy, decide
from tenantsafe.guard.state import IDLE, INERROR, INTRANS

S = Strategy


def not_asked() -> bool:
    raise AssertionError("asked whether a pooler is in between (that may run a query)")


def pooled() -> bool:
    return True


def direct() -> bool:
    return False


# Django's default cursor, in autocommit, between transactions, on psycopg 3 with pipelines.
DEFAULT = Call(
    connection=None,
    path=("alpha", "public"),
    status=IDLE,
    autocommit=True,
    pinned=False,
    pooled=not_asked,
    sql="SELECT 1",
    merges=True,
    pipelines=True,
)

STATEMENTS: list[tuple[str, dict[str, Any], Strategy]] = [
    # Reads no tenant data, or is not the guard's to pin.
    ("BEGIN", {"sql": "BEGIN"}, S.CONTROL),
    ("COMMIT in a transaction", {"sql": " commit", "status": INTRANS}, S.CONTROL),
    ("ROLLBACK TO SAVEPOINT", {"sql": "ROLLBACK TO SAVEPOINT s1", "status": INTRANS}, S.CONTROL),
    ("SET", {"sql": "SET statement_timeout = 5"}, S.AS_IS),
    ("RESET", {"sql": "RESET ALL", "status": INERROR}, S.AS_IS),
    ("failed transaction", {"status": INERROR}, S.AS_IS),
    ("already pinned", {"status": INTRANS, "pinned": True}, S.AS_IS),
    ("pinned flag outside a transaction", {"pinned": True}, S.MERGED),
    # Statements PostgreSQL refuses in a transaction block.
    ("VACUUM through a pooler", {"sql": "VACUUM shop_product", "pooled": pooled}, S.REFUSED),
    (
        "CREATE INDEX CONCURRENTLY through a pooler, in a transaction",
        {"sql": "CREATE INDEX CONCURRENTLY i ON t (c)", "pooled": pooled, "status": INTRANS},
        S.REFUSED,
    ),
    ("VACUUM direct, idle", {"sql": "VACUUM", "pooled": direct}, S.SESSION),
    ("VACUUM direct, named cursor", {"sql": "VACUUM", "pooled": direct, "named": True}, S.SESSION),
    (
        "VACUUM direct, in a transaction (PostgreSQL refuses it)",
        {"sql": "VACUUM", "pooled": direct, "status": INTRANS},
        S.AS_IS,
    ),
    # Django's default cursors.
    ("default cursor, autocommit", {}, S.MERGED),
    ("default cursor, in a transaction", {"status": INTRANS}, S.MERGED),
    ("default cursor, atomic not yet begun", {"autocommit": False}, S.MERGED),
    ("psycopg2", {"pipelines": False}, S.MERGED),
    # What cannot be merged.
    ("executemany", {"many": True}, S.PIPELINED),
    ("server-side binding cursor", {"merges": False}, S.PIPELINED),
    ("composed SQL (not a str)", {"sql": object()}, S.PIPELINED),
    ("executemany without pipelines", {"many": True, "pipelines": False}, S.OWN_TRANSACTION),
    (
        "executemany without pipelines, in a transaction",
        {"many": True, "pipelines": False, "status": INTRANS},
        S.IN_TRANSACTION,
    ),
    (
        "executemany without pipelines, atomic not yet begun",
        {"many": True, "pipelines": False, "autocommit": False},
        S.IN_TRANSACTION,
    ),
    # Named (server-side) cursors run one statement only: never merged nor pipelined.
    ("named cursor, autocommit, through a pooler", {"named": True, "pooled": pooled}, S.STREAMED),
    ("named cursor, autocommit, direct", {"named": True, "pooled": direct}, S.OWN_TRANSACTION),
    ("named cursor, in a transaction", {"named": True, "status": INTRANS}, S.IN_TRANSACTION),
    ("named cursor, atomic not yet begun", {"named": True, "autocommit": False}, S.IN_TRANSACTION),
    # A read that joined an open stream (cursor.joins_stream): in its transaction.
    ("read during a stream", {"streaming": True, "status": INTRANS}, S.JOINED),
    (
        "read during a stream, transaction pinned to its path",
        {"streaming": True, "status": INTRANS, "pinned": True},
        S.JOINED,
    ),
    ("setting during a stream", {"sql": "SET search_path = alpha", "streaming": True}, S.AS_IS),
]


@pytest.mark.parametrize(
    ("facts", "expected"), [row[1:] for row in STATEMENTS], ids=[row[0] for row in STATEMENTS]
)
def test_statement(facts, expected):
    assert decide(DEFAULT._replace(**facts)) is expected


DRIVER = DEFAULT._replace(driver=True, sql=None, merges=False, pipelines=False)

DRIVER_CALLS: list[tuple[str, dict[str, Any], Strategy]] = [
    ("autocommit: a transaction of its own", {}, S.OWN_TRANSACTION),
    ("in a transaction", {"status": INTRANS}, S.IN_TRANSACTION),
    ("atomic not yet begun", {"autocommit": False}, S.IN_TRANSACTION),
    ("already pinned", {"status": INTRANS, "pinned": True}, S.AS_IS),
    ("failed transaction", {"status": INERROR}, S.AS_IS),
    # Whether a pooler is in between does not matter: COPY has no server-side cursor to keep.
    ("pipelines available", {"pipelines": True, "merges": True}, S.OWN_TRANSACTION),
]


@pytest.mark.parametrize(
    ("facts", "expected"), [row[1:] for row in DRIVER_CALLS], ids=[row[0] for row in DRIVER_CALLS]
)
def test_driver_call(facts, expected):
    assert decide(DRIVER._replace(**facts)) is expected


def test_own_means_idle_in_autocommit():
    assert DEFAULT.own
    assert not DEFAULT._replace(status=INTRANS).own
    assert not DEFAULT._replace(autocommit=False).own


def test_text_is_the_statement_only_when_it_is_a_str():
    assert DEFAULT.text == "SELECT 1"
    assert DEFAULT._replace(sql=b"SELECT 1").text is None
    assert DRIVER.text is None
