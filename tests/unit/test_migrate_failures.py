"""What a failed tenant's summary says, from the exception alone (tenantsafe.migrate.failures)."""

from __future__ import annotations

from types import SimpleNamespace

import psycopg
import pytest
from django.db import utils as db

from tenantsafe.errors import SchemaMissingError, SchemaNameError
from tenantsafe.migrate import failures
from tenantsafe.options import RunOptions


def wrapped(
    driver_error: BaseException, wrapper: type[Exception] = db.OperationalError
) -> Exception:
    """``driver_error`` as Django raises it: its wrapper, with the driver's error as the cause."""
    try:
        try:
            raise driver_error
        except Exception as exc:
            raise wrapper(str(exc)) from exc
    except Exception as outer:
        return outer


class Psycopg2Style(Exception):
    """psycopg2 names the SQLSTATE ``pgcode``."""

    def __init__(self, message: str, pgcode: str) -> None:
        super().__init__(message)
        self.pgcode = pgcode


@pytest.mark.parametrize(
    ("exc", "lock_timeout", "connection_lost"),
    [
        (psycopg.errors.LockNotAvailable("canceling statement due to lock timeout"), True, False),
        (wrapped(psycopg.errors.LockNotAvailable("lock timeout")), True, False),
        (Psycopg2Style("canceling statement due to lock timeout", "55P03"), True, False),
        (psycopg.errors.QueryCanceled("statement timeout"), False, False),
        (wrapped(psycopg.errors.AdminShutdown("terminating connection")), False, True),
        (psycopg.errors.CannotConnectNow("the database system is starting up"), False, True),
        (Psycopg2Style("server closed the connection unexpectedly", "08006"), False, True),
        # The driver's own "connection is lost", without a SQLSTATE, also wrapped by Django.
        (psycopg.OperationalError("the connection is lost"), False, True),
        (
            wrapped(psycopg.OperationalError("consuming input failed"), db.InterfaceError),
            False,
            True,
        ),
        (
            wrapped(
                psycopg.errors.UndefinedTable('relation "x" does not exist'), db.ProgrammingError
            ),
            False,
            False,
        ),
        (ValueError("bad value"), False, False),
        (SchemaMissingError("acme"), False, False),
    ],
)
def test_classification_from_the_sqlstate_along_the_chain(exc, lock_timeout, connection_lost):
    assert failures.is_lock_timeout(exc) is lock_timeout
    assert failures.is_connection_lost(exc) is connection_lost


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (ValueError("bad\n   value\tin  it"), "ValueError: bad value in it"),
        (RuntimeError(), "RuntimeError: RuntimeError"),
        (
            wrapped(
                psycopg.errors.UndefinedTable('relation "x"\nLINE 1: ...'), db.ProgrammingError
            ),
            'ProgrammingError: relation "x" LINE 1: ...',
        ),
        # tenantsafe's own errors are sentences naming the schema: no class name before them.
        (
            SchemaMissingError("acme"),
            'Schema "acme" does not exist: run migrate_schemas_safe --create-missing to create '
            "and migrate it, or delete the tenant row that names it.",
        ),
        (
            SchemaNameError("a;b", owner="--schema", reason="it holds a semicolon"),
            "'a;b' (--schema) is not a valid schema name: it holds a semicolon; rename it.",
        ),
    ],
)
def test_one_line(exc, line):
    assert failures.one_line(exc) == line


def test_a_lost_connection_is_said_so_but_not_for_a_search_path_error():
    opts = RunOptions(database="default", migrate={})
    waits = failures.LockWaits()
    lost = wrapped(
        psycopg.errors.AdminShutdown("terminating connection due to administrator command")
    )
    assert failures.failure(lost, opts, "acme", waits, 1) == (
        "the connection to the database was lost: OperationalError: terminating connection due "
        "to administrator command"
    )
    missing = SchemaMissingError("acme")
    assert failures.failure(missing, opts, "acme", waits, 1) == failures.one_line(missing)


@pytest.mark.parametrize(
    ("atomic", "tried"),
    [
        (True, "tried 4 time(s) (--lock-retries 3)"),
        (False, "in a non-atomic migration, which is not tried again (part of it is applied)"),
    ],
)
def test_a_lock_timeout_names_the_statement_the_holder_and_what_to_do(atomic, tried):
    opts = RunOptions(database="default", migrate={}, lock_timeout_ms=500, lock_retries=3)
    waits = failures.LockWaits()
    waits.sql, waits.atomic = 'ALTER TABLE "shop_product" ADD COLUMN "sku" varchar(20)', atomic
    held = '"acme".shop_product held by pid 42 (idle in transaction: SELECT 1)'

    text = failures.lock_timeout(opts, waits, 4, held)

    assert text == (
        'lock timeout (500 ms) on \'ALTER TABLE "shop_product" ADD COLUMN "sku" varchar(20)\' '
        f"waiting for {held}; {tried}. Run again once that lock is released, or raise "
        "--lock-timeout."
    )


def test_the_relations_a_statement_may_name():
    names = failures.named_relations('ALTER TABLE "shop product" ADD CONSTRAINT x FOREIGN KEY (a)')
    assert "shop product" in names
    assert {"ALTER", "TABLE", "x", "a"} <= set(names)
    assert names == sorted(names)


def test_lock_waits_notes_the_statement_and_whether_its_migration_is_atomic():
    waits = failures.LockWaits()
    timeout = psycopg.errors.LockNotAvailable("canceling statement due to lock timeout")

    def execute(sql, params, many, context):
        raise timeout

    context = {"connection": SimpleNamespace(in_atomic_block=True)}
    with pytest.raises(psycopg.errors.LockNotAvailable):
        waits(execute, "ALTER TABLE t ADD COLUMN c int", None, False, context)
    assert (waits.sql, waits.atomic) == ("ALTER TABLE t ADD COLUMN c int", True)

    def fails_otherwise(sql, params, many, context):
        raise ValueError("no")

    other = failures.LockWaits()
    with pytest.raises(ValueError, match="no"):
        other(fails_otherwise, "SELECT 1", None, False, context)
    assert (other.sql, other.atomic) == ("", False)
