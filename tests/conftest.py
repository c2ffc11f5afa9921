from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def drop_tenant_schemas(transactional_db: None) -> Iterator[None]:
    """Tenant schemas (and the lease rows of runs on them) outlive a transactional test's
    flush; drop them afterwards."""
    yield
    from tests.dbtools import connection

    connection.set_schema_to_public()
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname NOT IN ('public', "
            "'information_schema') AND nspname NOT LIKE 'pg\\_%%'"
        )
        for (name,) in cursor.fetchall():
            cursor.execute('DROP SCHEMA "%s" CASCADE' % name.replace('"', '""'))
        cursor.execute("SELECT to_regclass('public.tenantsafe_lease')")
        if cursor.fetchone()[0] is not None:
            cursor.execute("DELETE FROM public.tenantsafe_lease")
