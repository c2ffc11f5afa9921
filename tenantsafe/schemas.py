"""Schema names: validation, quoting and existence, in one place."""

from __future__ import annotations

from collections.abc import Iterable

from django.db import connections
from django_tenants.postgresql_backend.base import is_valid_schema_name

from tenantsafe.errors import MAX_NAME_BYTES, SchemaNameError


def problem(schema: object) -> str:
    """Why ``schema`` is not a valid schema name; empty when it is one."""
    if not isinstance(schema, str):
        return f"it is a {type(schema).__name__}, not a string"
    size = len(schema.encode())
    if size > MAX_NAME_BYTES:
        # PostgreSQL would truncate it silently, onto whatever schema has the same prefix.
        return (
            f"it is {size} bytes in UTF-8 ({len(schema)} characters) and PostgreSQL keeps "
            f"only the first {MAX_NAME_BYTES} bytes of a name"
        )
    if not is_valid_schema_name(schema):
        return (
            f"it must be 1 to {MAX_NAME_BYTES} bytes, must not start with 'pg_' and must not "
            "contain quotes, backslashes, semicolons, line breaks or NUL"
        )
    return ""


def is_valid(schema: object) -> bool:
    return not problem(schema)


def validate(schema: str, *, owner: str = "") -> str:
    reason = problem(schema)
    if reason:
        raise SchemaNameError(str(schema), owner=owner, reason=reason)
    return schema


def truncated(schema: str) -> str:
    """The name PostgreSQL stores for ``schema``: its first 63 bytes, whole characters only."""
    return schema.encode()[:MAX_NAME_BYTES].decode(errors="ignore")


def quote(schema: str) -> str:
    """``schema`` as an SQL identifier; refuses names that are not valid schema names."""
    return ident(validate(schema))


def ident(name: str) -> str:
    """``name`` as an SQL identifier, whatever it holds."""
    return '"%s"' % name.replace('"', '""')


def path(names: Iterable[str]) -> str:
    """A search_path value naming ``names`` in order."""
    return ", ".join(ident(name) for name in names)


def literal(value: str) -> str:
    """``value`` as an SQL string literal (standard_conforming_strings is on since PostgreSQL
    9.1, so only quotes need doubling)."""
    return "'%s'" % value.replace("'", "''")


def exists(alias: str, schema: str) -> bool:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", [schema])
        return cursor.fetchone() is not None


def existing(alias: str, names: list[str]) -> set[str]:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s)", [names])
        return {row[0] for row in cursor.fetchall()}


def create(alias: str, schema: str) -> None:
    with connections[alias].cursor() as cursor:
        cursor.execute("CREATE SCHEMA IF NOT EXISTS %s" % quote(schema))


def public_tables(alias: str) -> set[str]:
    from django_tenants.utils import get_public_schema_name

    with connections[alias].cursor() as cursor:
        cursor.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s", [get_public_schema_name()]
        )
        return {row[0] for row in cursor.fetchall()}
