"""tenantsafe's own tables in the public schema (leases, recordings), created on first use.

As Django's MigrationRecorder creates ``django_migrations``: they need no entry in
``SHARED_APPS`` and no migration, and they exist before public's first migration runs.
"""

from __future__ import annotations

from typing import Any

from django.db import connections, transaction
from django_tenants.utils import get_public_schema_name

from tenantsafe import registry, schemas

# The first keys of tenantsafe's two-int transaction advisory locks (the second is a hash of
# a name), one list so that no two uses share one: creating one of these tables, writing a
# tenant type's recording, filling a tenant type's spare schemas.
CREATE_LOCK = 0x7455
RECORDING_LOCK = 0x7456
SPARES_LOCK = 0x7458


def lock(cursor: Any, key: int, name: str) -> None:
    """Take the transaction advisory lock ``(key, hashtext(name))``."""
    cursor.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", [key, name])


# (alias, database, table) of the tables known to exist (the values are unused).
_known: dict[tuple[str, str, str], bool] = registry.cache("tenantsafe.own_tables.known")


def qualified(name: str) -> str:
    return f"{schemas.ident(get_public_schema_name())}.{name}"


def _seen(alias: str, name: str) -> tuple[str, str, str]:
    return (alias, str(connections[alias].settings_dict.get("NAME")), name)


def ensure(alias: str, name: str, columns: str) -> None:
    """Create public.``name`` with ``columns`` unless it exists."""
    seen = _seen(alias, name)
    if seen in _known:
        return
    connection: Any = connections[alias]
    connection.set_schema_to_public()
    with transaction.atomic(using=alias), connection.cursor() as cursor:
        # Two first runs at once would both try to create it.
        lock(cursor, CREATE_LOCK, name)
        cursor.execute(f"CREATE TABLE IF NOT EXISTS {qualified(name)} ({columns})")
    _known[seen] = True


def exists(alias: str, name: str) -> bool:
    """Whether public.``name`` exists (asked once it does, per database)."""
    seen = _seen(alias, name)
    if seen not in _known:
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [qualified(name)])
            if not cursor.fetchone()[0]:
                return False
        _known[seen] = True
    return True
