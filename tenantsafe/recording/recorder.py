"""Recording what a migration sends: the execute wrapper, and what of it can be replayed.

:class:`Recorder` keeps every statement that changed its schema and succeeded. What it kept is
replayable only when nothing in it is specific to the schema it was taken from (its name, its
tenant's domain or field values, a read of its tenant's row) and when it can run inside one
transaction; :func:`taken` says why not, or gives the statements as one multi-statement string
with their parameters bound. :func:`record` wraps a fresh schema's migration and keeps the
result in a :class:`~tenantsafe.recording.store.RecordingStore`.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from django.db import Error, connections
from django.db.backends.postgresql.psycopg_any import is_psycopg3
from django_tenants.utils import get_tenant_domain_model, get_tenant_model

from tenantsafe import guard, statements, tenants
from tenantsafe.recording.fingerprints import fingerprint
from tenantsafe.recording.replaying import in_scratch, pinned_path
from tenantsafe.recording.state import Recording
from tenantsafe.recording.store import RecordingStore

if is_psycopg3:
    import psycopg

logger = logging.getLogger("tenantsafe.recording")


@dataclass(frozen=True)
class Statement:
    sql: Any
    params: Any
    many: bool


class Recorder:
    """An execute wrapper keeping every statement that changed ``schema`` and succeeded."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.statements: list[Statement] = []
        # A migration that reads the tenant's own row may write what it read (its pk, a
        # date) where no identifying string shows: such a recording is never replayed.
        self._tenant_tables = re.compile(
            "|".join(
                rf"\b{re.escape(model._meta.db_table)}\b"
                for model in (get_tenant_model(), get_tenant_domain_model())
            ),
            re.IGNORECASE,
        )
        self.read_tenant_row = ""
        # What the migration read in the schema: a deploy's replay depends on those rows.
        self.reads: list[str] = []
        # Inside a block set aside (aside()): statements not part of the recording.
        self._aside = False

    @contextlib.contextmanager
    def aside(self, marker: str) -> Iterator[None]:
        """Keep the block's statements out of the recording, and ``marker`` (an SQL comment)
        where they ran: what a data migration sends is its own in each tenant (the replay runs
        the block itself there, see tenantsafe.migrate.witness)."""
        self.statements.append(Statement(marker, None, False))
        previous, self._aside = self._aside, True
        try:
            yield
        finally:
            self._aside = previous

    def __call__(
        self,
        execute: Callable[..., Any],
        sql: Any,
        params: Any,
        many: bool,
        context: dict[str, Any],
    ) -> Any:
        if many and params is not None and not isinstance(params, (list, tuple)):
            # An iterator would be used up by the driver; keep a list we can replay.
            params = list(params)
        connection = context["connection"]
        ours = getattr(connection, "schema_name", None) == self.schema and not _sets_own_path(
            sql, connection, self.schema
        )
        result = execute(sql, params, many, context)
        if not ours or self._aside:
            return result
        if isinstance(sql, str) and statements.is_read(sql):
            if not self.read_tenant_row and self._tenant_tables.search(sql):
                self.read_tenant_row = sql
            self.reads.append(sql)
        else:
            self.statements.append(Statement(sql, params, many))
        return result


def _sets_own_path(sql: Any, connection: Any, schema: str) -> bool:
    # django-tenants sets the path to the schema (and back) when it opens a cursor and around
    # introspection; that is not part of the migration, and the replay pins the path itself.
    match = isinstance(sql, str) and statements.SET_SEARCH_PATH.match(sql)
    if not match:
        return False
    names = {part.strip().strip('"') for part in match.group(1).split(",")}
    return names <= {schema, "$user", *connection._get_cursor_search_paths()}


@contextlib.contextmanager
def record(store: RecordingStore, tenant: Any) -> Iterator[None]:
    """Record the block's statements in ``tenant``'s (new) schema, and keep them in ``store``
    if it ends without an exception and nothing is recorded for this migration state yet."""
    alias = store.alias
    tenant_type = tenants.tenant_type(tenant)
    state = store.state(tenant_type)
    if store.get(tenant_type, state=state) is not None:
        yield
        return
    connection: Any = connections[alias]
    recorder = Recorder(tenant.schema_name)
    # First in the list is outermost: the recorder sees each statement as the migration sent
    # it, before the guard adds its search_path check to it.
    connection.execute_wrappers.insert(0, recorder)
    try:
        yield
    finally:
        connection.execute_wrappers.remove(recorder)
    parts, problem = _kept(alias, recorder, identifying(tenant, alias))
    if problem:
        store.finish(Recording(state, tenant_type, "", "", problem))
    else:
        store.finish(_built(alias, state, tenant_type, recorder.schema, parts))


def _built(alias: str, state: str, tenant_type: str, schema: str, parts: list[str]) -> Recording:
    """The recording of ``parts``, the statements recorded in ``schema``, with the schema's
    fingerprint; with constraints folded into their tables when that leaves the same schema."""
    path = pinned_path(alias, schema, tenant_type)
    with guard.pinned_transaction(alias, path) as cursor:
        print_ = fingerprint(cursor, schema)
    sql = _joined(parts)
    folded = statements.fold_constraints(parts)
    if folded != parts and _leaves(alias, tenant_type, _joined(folded), print_):
        sql = _joined(folded)
    return Recording(state, tenant_type, sql, print_)


def _leaves(alias: str, tenant_type: str, sql: str, expected: str) -> bool:
    """Whether ``sql`` replayed into a new schema leaves one whose fingerprint is
    ``expected``; rolled back either way."""
    try:
        with in_scratch(alias, tenant_type, sql) as (cursor, scratch):
            # Deferred constraints are checked at commit, which this never reaches.
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
            return fingerprint(cursor, scratch) == expected
    except Error as exc:
        # Only a faster form of what is kept anyway: whatever went wrong, it is not used.
        logger.debug("the recording with constraints folded in fails (%s): kept as recorded", exc)
        return False


def taken(alias: str, recorder: Recorder, identifying: Iterable[str]) -> tuple[str, str]:
    """What ``recorder`` recorded as one multi-statement string, and why it cannot be
    replayed into another schema (empty when it can)."""
    parts, problem = _kept(alias, recorder, identifying)
    return _joined(parts), problem


def _kept(alias: str, recorder: Recorder, identifying: Iterable[str]) -> tuple[list[str], str]:
    """The statements ``recorder`` recorded, parameters bound, or why they cannot be replayed
    into another schema."""
    kept, problem = _checked(recorder, identifying)
    if problem:
        return [], problem
    connection: Any = connections[alias]
    connection.ensure_connection()
    return _bound(connection.connection, kept), ""


def _checked(recorder: Recorder, identifying: Iterable[str]) -> tuple[list[Statement], str]:
    """The statements ``recorder`` recorded, as a replay runs them (normalised, CONCURRENTLY
    dropped), or why they cannot be replayed into another schema: a read of the tenant's row,
    a statement that cannot run in a transaction or controls it, or one that names (in its
    text or parameters) any of ``identifying``."""
    if recorder.read_tenant_row:
        return [], f"{statements.short(recorder.read_tenant_row)!r} reads the tenant's own row"
    words = sorted({w for w in identifying if w}, key=len, reverse=True)
    pattern = (
        re.compile("|".join(rf"(?<![\w$]){re.escape(w)}(?![\w$])" for w in words), re.IGNORECASE)
        if words
        else None
    )
    kept: list[Statement] = []
    for statement in map(_normalised, recorder.statements):
        sql = statement.sql
        if isinstance(sql, str):
            sql = statements.CONCURRENTLY.sub(r"\1", sql)
            if statements.NON_TRANSACTIONAL.match(sql):
                return [], f"{statements.short(sql)!r} cannot run inside a transaction"
            if statements.ENDS_TRANSACTION.search(sql):
                return [], f"{statements.short(sql)!r} controls the transaction"
        if pattern is not None:
            found = pattern.search(sql if isinstance(sql, str) else repr(sql))
            found = found or next(
                (m for m in map(pattern.search, _strings(statement.params)) if m), None
            )
            if found:
                return [], (
                    f"{statements.short(str(sql))!r} names {found.group(0)!r}, which belongs "
                    f'to the tenant of schema "{recorder.schema}"'
                )
        kept.append(Statement(sql, statement.params, statement.many))
    return kept, ""


def _normalised(statement: Statement) -> Statement:
    sql, params = statement.sql, statement.params
    if (
        isinstance(sql, str)
        and not statement.many
        and isinstance(params, (list, tuple))
        and len(params) == 3
        and (found := statements.RECORD_APPLIED.match(sql))
        and sql.startswith("%s, %s, %s)", found.end())
    ):
        # When it was applied is the replay's own time, not the recorded one's (and two
        # recordings of one plan are then the same text).
        at = found.end() + len("%s, %s, ")
        return Statement(f"{sql[:at]}statement_timestamp(){sql[at + 2 :]}", list(params[:2]), False)
    return statement


def identifying(tenant: Any, alias: str) -> list[str]:
    # What a data migration could copy from the tenant it runs for: its schema name, domains
    # and (longer) text fields. A recording naming any of them is specific to that tenant.
    values = [tenant.schema_name]
    if tenant.pk is not None:
        values += list(
            get_tenant_domain_model()
            ._default_manager.db_manager(alias)
            .filter(tenant=tenant)
            .values_list("domain", flat=True)
        )
    for field in tenant._meta.concrete_fields:
        value = getattr(tenant, field.attname, None)
        if isinstance(value, str) and len(value) >= 3:
            values.append(value)
    return values


def _strings(params: Any) -> Iterable[str]:
    if isinstance(params, str):
        yield params
    elif isinstance(params, dict):
        for value in params.values():
            yield from _strings(value)
    elif isinstance(params, (list, tuple)):
        for value in params:
            yield from _strings(value)


def _bound(raw: Any, kept: list[Statement]) -> list[str]:
    with _binder(raw) as bind:
        parts: list[str] = []
        for statement in kept:
            if statement.many:
                parts.extend(bind(statement.sql, params) for params in statement.params)
            elif statement.params is None:
                parts.append(statement.sql)
            else:
                parts.append(bind(statement.sql, statement.params))
    return parts


# Between the statements of a recording: a newline before each ';' so that a statement ending
# in a -- comment still ends.
SEPARATOR = "\n;\n"


def _joined(parts: list[str]) -> str:
    return SEPARATOR.join(parts)


@contextlib.contextmanager
def _binder(raw: Any) -> Iterator[Callable[[str, Any], str]]:
    if is_psycopg3:
        with contextlib.closing(psycopg.ClientCursor(raw)) as client:
            yield lambda sql, params: str(client.mogrify(sql, params))
        return
    encoding = raw.encoding
    with contextlib.closing(raw.cursor()) as cursor:

        def bind(sql: str, params: Any) -> str:
            value = cursor.mogrify(sql, params)
            return value.decode(encoding) if isinstance(value, bytes) else str(value)

        yield bind
