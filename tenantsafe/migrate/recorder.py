"""Django's question "does this schema have django_migrations?", answered by name during a run.

``MigrationRecorder.has_table()`` lists every table on the path and looks for
``django_migrations`` among them; django-tenants' introspection sets the path to the schema being
migrated. PostgreSQL finds the tables of one schema only by scanning all of ``pg_class`` (it has
no index on ``relnamespace``), so each call grows with every tenant: at 10,000 tenants of the
test project, 730,000 rows and 0.36 s, and ``migrate`` asks about five times per schema (its
consistency check, the loader, the executor's recorder). Asked by name, the same question uses
``pg_class``'s (relname, relnamespace) index and costs the same at any size.

:func:`by_name` swaps ``MigrationRecorder.has_table`` for the run's duration, and only that: the
one Django method tenantsafe replaces, in this one place, because no hook reaches every recorder
``migrate`` makes. The answer is the one Django would give (a table, partitioned table or
foreign table of that name in the connection's schema; not a view), and connections that are
not django-tenants' get Django's own method.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from django.db.migrations.recorder import MigrationRecorder

# What Django's table_names() lists (get_table_list's tables, partitioned and foreign tables;
# views left out), by name in one schema.
_EXISTS = (
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c "
    "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relname = %s AND n.nspname = %s AND c.relkind IN ('f', 'p', 'r'))"
)


def has_table(recorder: MigrationRecorder, django: Callable[[MigrationRecorder], bool]) -> bool:
    """Whether the recorder's connection's schema has the recorder's table, asked by name;
    ``django``'s answer for a connection without a tenant schema. Remembered on the recorder
    as Django's method does (once there, the table is not asked about again)."""
    known: Any = recorder
    if known._has_table:
        return True
    connection: Any = recorder.connection
    schema = getattr(connection, "schema_name", None)
    if connection.vendor != "postgresql" or not schema:
        return django(recorder)
    with connection.cursor() as cursor:
        cursor.execute(_EXISTS, [recorder.Migration._meta.db_table, schema])
        found = bool(cursor.fetchone()[0])
    known._has_table = found
    return found


@contextlib.contextmanager
def by_name() -> Iterator[None]:
    """While the block runs, every MigrationRecorder asks for its table by name."""
    django = MigrationRecorder.has_table
    if getattr(django, "tenantsafe_by_name", False):
        # A run inside a run (call_command from a post_migrate handler): already asked by name.
        yield
        return

    def asked_by_name(self: MigrationRecorder) -> bool:
        return has_table(self, django)

    asked_by_name.tenantsafe_by_name = True  # type: ignore[attr-defined]
    MigrationRecorder.has_table = asked_by_name  # type: ignore[method-assign]
    try:
        yield
    finally:
        MigrationRecorder.has_table = django  # type: ignore[method-assign]
