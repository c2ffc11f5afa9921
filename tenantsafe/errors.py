"""Every error tenantsafe raises for a schema, in one leaf module (it imports nothing of ours)."""

from __future__ import annotations

import warnings

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


class ReplayMismatch(Exception):
    """A replayed schema is not what the recording left in the schema it was recorded from;
    its transaction is rolled back and the schema is provisioned or migrated another way."""

    def __init__(self, message: str = "", *, schema: str = "") -> None:
        super().__init__(message or schema)
        self.schema = schema


class ProvisionError(RuntimeError):
    """Migrating a new tenant's schema failed; nothing of it was kept."""

    def __init__(self, schema: str, error: str, traceback: str = "") -> None:
        super().__init__(self._message(schema, error) + (f"\n{traceback}" if traceback else ""))
        self.schema = schema
        self.error = error
        self.traceback = traceback

    @staticmethod
    def _message(schema: str, error: str) -> str:
        return f'Provisioning schema "{schema}" failed: {error}'


class TenantProvisionError(ProvisionError):
    """``create_tenant`` could not migrate the test tenant's schema."""

    @staticmethod
    def _message(schema: str, error: str) -> str:
        return f'create_tenant({schema!r}): migrating schema "{schema}" failed: {error}'


class MissingTenantFields(TypeError):
    """``create_tenant`` was not given a value the tenant model requires."""

    def __init__(self, schema: str, model: type, fields: list[str]) -> None:
        names = ", ".join(fields)
        example = ", ".join(f"{name}=..." for name in fields)
        super().__init__(
            f"create_tenant({schema!r}): {model.__name__} requires {names}, which was not "
            f"given; pass it: create_tenant({schema!r}, {example})."
        )
        self.schema = schema
        self.fields = fields


class PlanError(Exception):
    """The targets cannot be planned here; ``migrate`` itself will report why."""


def moved(module: str, name: str) -> type[Exception]:
    """``name`` for a module's ``__getattr__`` where the docs promised it before it moved here."""
    warnings.warn(
        f"{module}.{name} is tenantsafe.errors.{name} now; import it from there.",
        DeprecationWarning,
        stacklevel=3,
    )
    found: type[Exception] = globals()[name]
    return found


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of ``exc`` or of the driver error it wraps (Django's wrappers keep it as
    the cause), the first found along the chain; None when there is none."""
    seen: BaseException | None = exc
    while seen is not None:
        code = getattr(seen, "sqlstate", None) or getattr(seen, "pgcode", None)
        if code:
            return str(code)
        seen = seen.__cause__ or seen.__context__
    return None
