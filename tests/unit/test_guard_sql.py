"""The SQL the guard sends to pin a path, and how it reads the check's failures."""

from __future__ import annotations

import pytest

from tenantsafe.errors import LockLostError, SchemaMissingError, SearchPathError
from tenantsafe.guard import sql
from tenantsafe.guard.sql import Terms
from tenantsafe.locks import Fence

FENCE = Fence('"public"."tenantsafe_lease"', "Alpha", "0b6f")
EXISTS = (
    """EXISTS (SELECT 1 FROM "public"."tenantsafe_lease" WHERE schema_name = 'alpha' """
    "AND token = '0b6f' FOR KEY SHARE)"
)
SET_PATH = (
    "SELECT CASE WHEN set_config('search_path', '\"alpha\", \"public\"', true) IS NULL THEN NULL "
)
CHECK_TAIL = (
    "WHEN current_schema() = 'alpha' THEN current_schema() "
    "ELSE ((CASE WHEN to_regnamespace('alpha') IS NULL THEN 'tenantsafe-search-path:missing:' "
    "ELSE 'tenantsafe-search-path:current=' END) || coalesce(current_schema(), '-'))::int::text END"
)
LOCK_TIMEOUT_CASE = "WHEN set_config('lock_timeout', '1500', true) IS NULL THEN NULL "
FENCE_CASE = (
    f"WHEN NOT {EXISTS} "
    "THEN ('tenantsafe-search-path:lease:' || coalesce(current_schema(), '-'))::int::text "
)


@pytest.mark.parametrize(
    ("terms", "cases"),
    [
        (None, ""),
        (Terms(), ""),
        (Terms(lock_timeout_ms=1500), LOCK_TIMEOUT_CASE),
        (Terms(fence=FENCE), FENCE_CASE),
        (Terms(FENCE, 1500), LOCK_TIMEOUT_CASE + FENCE_CASE),
    ],
    ids=["no terms", "empty terms", "lock timeout", "fence", "both"],
)
def test_check_sets_the_path_then_the_terms_then_compares(terms, cases):
    assert sql.check(("alpha", "public"), False, terms) == SET_PATH + cases + CHECK_TAIL


def test_check_escapes_percent_only_when_the_driver_formats_the_query():
    path = ("te%st",)
    plain = sql.check(path, False)
    escaped = sql.check(path, True)
    assert "'\"te%st\"'" in plain
    assert "'te%st'" in plain
    assert escaped == plain.replace("%", "%%")
    # The check itself holds no other %: only the schema's are doubled.
    assert escaped.count("%%") == plain.count("%") == 3


def test_check_quotes_names_as_literals_and_identifiers():
    check = sql.check(("o'neil\"s",), False)
    assert "set_config('search_path', '\"o''neil\"\"s\"', true)" in check
    assert "WHEN current_schema() = 'o''neil\"s' THEN" in check
    assert "to_regnamespace('o''neil\"s')" in check


@pytest.mark.parametrize(
    ("terms", "expected"),
    [
        (Terms(), "SELECT true"),
        (
            Terms(lock_timeout_ms=0),
            "SELECT true AND set_config('lock_timeout', '0', true) IS NOT NULL",
        ),
        (Terms(fence=FENCE), f"SELECT true AND {EXISTS}"),
        (
            Terms(FENCE, 1500),
            f"SELECT true AND set_config('lock_timeout', '1500', true) IS NOT NULL AND {EXISTS}",
        ),
    ],
    ids=["empty", "lock timeout", "fence", "both"],
)
def test_terms_check_step_by_step(terms, expected):
    assert sql.terms_check(terms) == expected


def test_fence_is_looked_up_by_its_key_with_quotes_doubled():
    fence = Fence('"public"."tenantsafe_lease"', "O'Neil", "to'ken")
    assert "WHERE schema_name = 'o''neil' AND token = 'to''ken' FOR KEY SHARE" in sql.terms_check(
        Terms(fence=fence)
    )


def test_begin_checked_and_merged_are_one_simple_query():
    check = sql.check(("alpha", "public"), False, Terms(lock_timeout_ms=1500))
    assert sql.begin_checked(("alpha", "public"), Terms(lock_timeout_ms=1500)) == (
        f"BEGIN;\n{check}"
    )
    assert sql.merged(check, "SELECT 1") == f"{check};\nSELECT 1"


def test_begin_checked_can_read_the_isolation_level_in_the_same_query():
    # A stream reads its transaction's isolation level with BEGIN: whether reads may join it.
    check = sql.check(("alpha", "public"), False, None)
    assert sql.begin_checked(("alpha", "public"), None, isolation=True) == (
        f"BEGIN;\n{check}, current_setting('transaction_isolation')"
    )


@pytest.mark.parametrize("escaped", [False, True])
def test_without_check_gives_back_the_statement_the_code_ran(escaped):
    check = sql.check(("te%st",), escaped)
    # The driver formats a query with parameters, turning the check's %% back into %.
    sent = check.replace("%%", "%") if escaped else check
    assert sql.without_check(f"{sent};\nSELECT 'a%'", check, escaped) == "SELECT 'a%'"
    assert sql.without_check("SELECT 2", check, escaped) == "SELECT 2"


def cast_error(detail: str) -> Exception:
    return Exception(f'invalid input syntax for type integer: "tenantsafe-search-path:{detail}"')


def test_missing_schema():
    failure = sql.check_failure(cast_error("missing:public"), ["alpha", "public"])
    assert type(failure) is SchemaMissingError
    assert failure.schema == "alpha"
    assert str(failure).startswith('Schema "alpha" does not exist')


@pytest.mark.parametrize(
    ("terms", "schema"),
    [(Terms(fence=FENCE), "Alpha"), (Terms(lock_timeout_ms=5), "alpha"), (None, "alpha")],
    ids=["fenced: the fence's schema", "no fence: the path's", "no terms: the path's"],
)
def test_lost_lease(terms, schema):
    failure = sql.check_failure(cast_error("lease:alpha"), ["alpha", "public"], terms)
    assert type(failure) is LockLostError
    assert failure.schema == schema
    assert str(failure).startswith(f'Schema "{schema}": this run lost its lock on the tenant')


@pytest.mark.parametrize(("detail", "current"), [("current=beta", "'beta'"), ("current=-", "None")])
def test_another_schema(detail, current):
    failure = sql.check_failure(cast_error(detail), ["alpha", "public"])
    assert type(failure) is SearchPathError
    assert failure.schema == "alpha"
    assert str(failure) == (
        f'current_schema() is {current} after setting search_path to "alpha", "public", '
        'expected "alpha"; nothing was run.'
    )


def test_failure_found_in_the_cause_django_raises_from():
    driver = cast_error("current=beta")
    try:
        try:
            raise driver
        except Exception as exc:
            raise RuntimeError("the database error Django raises") from exc
    except RuntimeError as wrapped:
        failure = sql.check_failure(wrapped, ["alpha"])
    assert type(failure) is SearchPathError
    assert "current_schema() is 'beta'" in str(failure)


def test_other_errors_are_not_the_check():
    assert sql.check_failure(Exception('relation "shop_product" does not exist'), ["alpha"]) is None
    assert sql.check_failure(KeyboardInterrupt(), ["alpha"]) is None
