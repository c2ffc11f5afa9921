"""Provisioning tenant schemas from a recording of the statements their migration ran.

Migrating a schema mostly costs Python: loading the graph, rendering model states, running
post_migrate handlers. The SQL it sends is small and, for a fresh schema, the same every time.
So the first schema for a given migration state is migrated while an execute wrapper records
every statement that changed something; later schemas replay that recording in one
transaction with the search_path pinned, which leaves the same tables, rows and sequence
values.

A recording is only trusted when nothing in it is specific to the schema it was taken from
(its name, its tenant's domain or field values) and when it can run inside one transaction.
Otherwise every schema is migrated, as without tenantsafe.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import connections, transaction
from django.db.backends.postgresql.psycopg_any import is_psycopg3
from django.db.migrations.loader import MigrationLoader

from tenantsafe import guard, schemas, statements

if is_psycopg3:
    import psycopg

logger = logging.getLogger("tenantsafe.testing")


@dataclass(frozen=True)
class Statement:
    sql: Any
    params: Any
    many: bool


@dataclass(frozen=True)
class Template:
    key: str
    statements: tuple[Statement, ...]
    # Why the recording cannot be replayed; empty when it can.
    problem: str = ""


_templates: dict[str, Template] = {}


def state_key(alias: str, tenant_type: str = "") -> str:
    """A digest of everything a fresh schema's migration depends on.

    Every migration the loader finds on disk (so a new, removed or edited migration file
    changes it), which apps migrate into tenant schemas, and the database.
    """
    loader = MigrationLoader(None, ignore_no_migrations=True)
    digest = hashlib.sha256()
    settings_dict = connections[alias].settings_dict
    for part in (
        alias,
        str(settings_dict.get("NAME")),
        tenant_type,
        repr(list(getattr(settings, "TENANT_APPS", []))),
        repr(getattr(settings, "TENANT_TYPES", None)),
        repr(list(getattr(settings, "DATABASE_ROUTERS", []))),
    ):
        digest.update(part.encode() + b"\0")
    for key in sorted(loader.disk_migrations):
        migration = loader.disk_migrations[key]
        digest.update(repr(key).encode() + b"\0")
        digest.update(_source(type(migration).__module__) + b"\0")
    return digest.hexdigest()


def _source(module_name: str) -> bytes:
    path = getattr(sys.modules.get(module_name), "__file__", None)
    if not path:
        return module_name.encode()
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return module_name.encode()


def get(key: str) -> Template | None:
    return _templates.get(key)


def discard(key: str, problem: str) -> None:
    """Stop replaying for ``key``: schemas for it are migrated one by one from now on."""
    _templates[key] = Template(key, (), problem)
    logger.warning("tenantsafe: new tenant schemas will be migrated, not replayed: %s", problem)


class Recorder:
    """An execute wrapper keeping every statement that changed ``schema`` and succeeded."""

    def __init__(self, schema: str) -> None:
        from django_tenants.utils import get_tenant_domain_model, get_tenant_model

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
        if not ours:
            return result
        if isinstance(sql, str) and statements.is_read(sql):
            if not self.read_tenant_row and self._tenant_tables.search(sql):
                self.read_tenant_row = sql
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


def build(key: str, recorder: Recorder, identifying: Iterable[str]) -> Template:
    """Turn a recording into a template (usable or with the reason it is not) and keep it."""
    kept: list[Statement] = []
    problem = ""
    words = sorted({w for w in identifying if w}, key=len, reverse=True)
    pattern = (
        re.compile("|".join(rf"(?<![\w$]){re.escape(w)}(?![\w$])" for w in words), re.IGNORECASE)
        if words
        else None
    )
    if recorder.read_tenant_row:
        problem = f"{_short(recorder.read_tenant_row)!r} reads the tenant's own row"
    for statement in () if problem else recorder.statements:
        sql = statement.sql
        if isinstance(sql, str):
            sql = statements.CONCURRENTLY.sub(r"\1", sql)
            if statements.NON_TRANSACTIONAL.match(sql):
                problem = f"{_short(sql)!r} cannot run inside a transaction"
            elif statements.ENDS_TRANSACTION.search(sql):
                problem = f"{_short(sql)!r} controls the transaction"
        if not problem and pattern is not None:
            found = pattern.search(sql if isinstance(sql, str) else repr(sql))
            found = found or next(
                (m for m in map(pattern.search, _strings(statement.params)) if m), None
            )
            if found:
                problem = (
                    f"{_short(str(sql))!r} names {found.group(0)!r}, which belongs to the "
                    f'tenant of schema "{recorder.schema}"'
                )
        if problem:
            break
        kept.append(Statement(sql, statement.params, statement.many))
    if problem:
        discard(key, problem)
    else:
        _templates[key] = Template(key, tuple(kept))
    return _templates[key]


def _strings(params: Any) -> Iterable[str]:
    if isinstance(params, str):
        yield params
    elif isinstance(params, dict):
        for value in params.values():
            yield from _strings(value)
    elif isinstance(params, (list, tuple)):
        for value in params:
            yield from _strings(value)


def _short(sql: str) -> str:
    return " ".join(sql.split())[:100]


def replay(alias: str, schema: str, template: Template, tenant_type: str = "") -> None:
    """Create ``schema`` and run the template in it, inside one transaction."""
    connection: Any = connections[alias]
    started = time.perf_counter()
    # The path the migration ran with: the schema, then public and any extra paths.
    connection.set_schema(schema, tenant_type=tenant_type or None)
    path = guard.search_path(connection)
    connection.set_schema_to_public()
    with transaction.atomic(using=alias), connection.wrap_database_errors:
        connection.ensure_connection()
        with connection.connection.cursor() as cursor:
            cursor.execute("CREATE SCHEMA %s" % schemas.quote(schema))
            # Pinned for this transaction only and checked, as the guard does: through a
            # transaction pooler the batch below runs on this same server connection.
            guard.pin(connection, cursor, path)
            # One round trip: the statements, their parameters bound client-side, as one
            # multi-statement query.
            cursor.execute(_batch(connection.connection, template))
    logger.debug(
        "schema %s: replayed %d statements in %.1f ms",
        schema,
        len(template.statements),
        (time.perf_counter() - started) * 1000,
    )


def _batch(raw: Any, template: Template) -> str:
    with _binder(raw) as bind:
        parts: list[str] = []
        for statement in template.statements:
            if statement.many:
                parts.extend(bind(statement.sql, params) for params in statement.params)
            elif statement.params is None:
                parts.append(statement.sql)
            else:
                parts.append(bind(statement.sql, statement.params))
    # A newline before each ';' so that a statement ending in a -- comment still ends.
    return "\n;\n".join(parts)


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
