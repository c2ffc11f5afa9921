"""Schema names: validation, quoting and existence, in one place."""

from __future__ import annotations

from django.db import connections
from django_tenants.postgresql_backend.base import is_valid_schema_name


class SchemaNameError(ValueError):
    def __init__(self, schema: str, *, owner: str = "") -> None:
        where = f" ({owner})" if owner else ""
        super().__init__(
            f"{schema!r}{where} is not a valid schema name: it must be 1 to 63 characters, "
            "must not start with 'pg_' and must not contain quotes, backslashes, semicolons, "
            "line breaks or NUL; rename it."
        )
        self.schema = schema


class MissingSchema(LookupError):
    def __init__(self, schema: str) -> None:
        super().__init__(
            f'schema "{schema}" does not exist; run with --create-missing to create and '
            "migrate it, or delete the tenant row that names it"
        )
        self.schema = schema


def validate(schema: str, *, owner: str = "") -> str:
    if not is_valid(schema):
        raise SchemaNameError(str(schema), owner=owner)
    return schema


def is_valid(schema: str) -> bool:
    return isinstance(schema, str) and bool(is_valid_schema_name(schema))


def quote(schema: str) -> str:
    return '"%s"' % validate(schema)


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
