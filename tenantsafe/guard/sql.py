"""The SQL the guard sends to pin a path, and what its failures mean: pure, no database.

Two forms pin a path:

* the *check* (:func:`check`): one SELECT that sets the path (and the terms) for the
  transaction and raises inside PostgreSQL unless ``current_schema()`` is the tenant's. It is
  merged into the statement (``<check>;\\n<statement>``), sent after ``BEGIN`` in one simple
  query (:func:`begin_checked`), or pipelined.
* *step by step*: :data:`PIN_SQL` returns ``current_schema()`` for Python to compare, then
  :func:`terms_check` returns whether the terms hold.

Each term is rendered once (:func:`_settings`, :func:`_conditions`); the two forms only
assemble those expressions differently.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from tenantsafe import schemas
from tenantsafe.errors import LockLostError, SchemaMissingError, SearchPathError
from tenantsafe.locks import Fence

PIN_SQL = "SELECT set_config('search_path', %s, %s), current_schema()"
SCHEMA_EXISTS_SQL = "SELECT 1 FROM pg_namespace WHERE nspname = %s"

# Appears in the error PostgreSQL raises when the in-statement check fails.
MARK = "tenantsafe-search-path:"


@dataclass(frozen=True)
class Terms:
    """What every pinned transaction of a migrating connection also sets and checks."""

    # The tenant's lease: still this run's, and locked for the rest of the transaction.
    fence: Fence | None = None
    # PostgreSQL's lock_timeout for the transaction, in milliseconds; None leaves it alone.
    lock_timeout_ms: int | None = None


def _settings(terms: Terms) -> list[str]:
    # Set for the transaction; each expression is never NULL.
    if terms.lock_timeout_ms is None:
        return []
    return [f"set_config('lock_timeout', '{terms.lock_timeout_ms}', true)"]


def _conditions(terms: Terms) -> list[str]:
    # True while the terms hold; false means the lease is lost.
    if terms.fence is None:
        return []
    fence = terms.fence
    return [
        f"EXISTS (SELECT 1 FROM {fence.table} WHERE schema_name = "  # noqa: S608
        f"{schemas.literal(fence.key)} AND token = {schemas.literal(fence.token)} "
        "FOR KEY SHARE)"
    ]


def terms_check(terms: Terms) -> str:
    """Step by step: one SELECT of a boolean, false unless the terms hold. No parameters, so
    no % to escape."""
    parts = ["SELECT true"]
    parts += [f"{setting} IS NOT NULL" for setting in _settings(terms)]
    parts += _conditions(terms)
    return " AND ".join(parts)


def _terms_cases(terms: Terms) -> str:
    cases = "".join(f"WHEN {setting} IS NULL THEN NULL " for setting in _settings(terms))
    cases += "".join(
        f"WHEN NOT {condition} THEN ('{MARK}lease:' || coalesce(current_schema(), '-'))::int::text "
        for condition in _conditions(terms)
    )
    return cases


@functools.lru_cache(maxsize=1024)
def check(path: tuple[str, ...], escape_percent: bool, terms: Terms | None = None) -> str:
    """One SELECT that pins the path and fails unless ``current_schema()`` is the tenant's.

    CASE evaluates its branches in order, so set_config runs before current_schema() looks.
    The failure is a cast error on a value computed at run time (from current_schema()): a
    constant one (``1/0``, ``'x'::int``) is folded, and raised, at plan time whichever branch
    is taken. Cached (bounded): the same few paths come back for every statement.
    """
    schema = schemas.literal(path[0])
    sql = (
        f"SELECT CASE WHEN set_config('search_path', {schemas.literal(schemas.path(path))}, "
        f"true) IS NULL THEN NULL "
        f"{_terms_cases(terms) if terms is not None else ''}"
        f"WHEN current_schema() = {schema} THEN current_schema() "
        f"ELSE ((CASE WHEN to_regnamespace({schema}) IS NULL THEN '{MARK}missing:' "
        f"ELSE '{MARK}current=' END) || coalesce(current_schema(), '-'))::int::text END"
    )
    # With parameters the driver formats the query and reads % as a placeholder.
    return sql.replace("%", "%%") if escape_percent else sql


def merged(check_sql: str, statement: str) -> str:
    """The check and the statement as one simple query: one (implicit) transaction."""
    return f"{check_sql};\n{statement}"


def begin_checked(path: tuple[str, ...], terms: Terms | None, *, isolation: bool = False) -> str:
    """``BEGIN`` and the check in one simple query: an explicit transaction pinned to ``path``.
    With ``isolation``, the check's row also has the transaction's isolation level."""
    if isolation:
        return f"BEGIN;\n{check(path, False, terms)}, current_setting('transaction_isolation')"
    return f"BEGIN;\n{check(path, False, terms)}"


def without_check(query: str, check_sql: str, escaped: bool) -> str:
    """``query`` (as the driver formatted a merged statement) without the check in front."""
    prefix = f"{check_sql.replace('%%', '%') if escaped else check_sql};\n"
    return query[len(prefix) :] if query.startswith(prefix) else query


def mismatch(current: str | None, path: Sequence[str]) -> SearchPathError:
    return SearchPathError(
        f"current_schema() is {current!r} after setting search_path to "
        f'{schemas.path(path)}, expected "{path[0]}"; nothing was run.',
        schema=path[0],
    )


def check_failure(
    exc: BaseException, path: Sequence[str], terms: Terms | None = None
) -> SearchPathError | None:
    """The SearchPathError for ``exc`` if it is the check failing (maybe wrapped by Django)."""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        at = text.find(MARK)
        if at >= 0:
            detail = text[at + len(MARK) :].split('"', 1)[0]
            if detail.startswith("missing:"):
                return SchemaMissingError(path[0])
            if detail.startswith("lease:"):
                fence = terms.fence if terms is not None else None
                return LockLostError(fence.schema if fence is not None else path[0])
            current = detail.removeprefix("current=")
            return mismatch(None if current == "-" else current, path)
        seen = seen.__cause__
    return None
