"""Every error tenantsafe raises for a schema, in one leaf module (it imports nothing of ours)."""

from __future__ import annotations

# PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes, not characters.
MAX_NAME_BYTES = 63


class SchemaNameError(ValueError):
    """A schema name that PostgreSQL or django-tenants would not take as it is."""

    def __init__(self, schema: str, *, owner: str = "", reason: str = "") -> None:
        where = f" ({owner})" if owner else ""
        reason = reason or (
            f"it must be 1 to {MAX_NAME_BYTES} bytes in UTF-8, must not start with 'pg_' and "
            "must not contain quotes, backslashes, semicolons, line breaks or NUL"
        )
        super().__init__(f"{schema!r}{where} is not a valid schema name: {reason}; rename it.")
        self.schema = schema


class SearchPathError(Exception):
    """A statement would have run with a search_path that could not be verified."""

    def __init__(self, message: str, *, schema: str) -> None:
        super().__init__(message)
        self.schema = schema


class SchemaMissingError(SearchPathError):
    def __init__(self, schema: str) -> None:
        super().__init__(
            f'Schema "{schema}" does not exist: run migrate_schemas_safe --create-missing to '
            "create and migrate it, or delete the tenant row that names it.",
            schema=schema,
        )


class PooledStatementError(SearchPathError):
    pass


class LockLostError(SearchPathError):
    def __init__(self, schema: str) -> None:
        super().__init__(
            f'Schema "{schema}": this run lost its lock on the tenant (another run took it '
            "over after the lock expired) before its next statement; nothing more was run "
            "here. Run migrate_schemas_safe again to complete the tenant.",
            schema=schema,
        )
