"""The test project's Celery app, with tenant-schemas-celery's tenant-aware tasks:
``celery -A testproject.celery worker``. Tasks sent with a ``_schema_name`` header (or from
inside ``schema_context()``) run on that tenant's schema."""

from __future__ import annotations

import collections
import os
from typing import Any

from django.db.backends.signals import connection_created
from tenant_schemas_celery.app import CeleryApp

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")

app = CeleryApp("testproject")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# Statements this process ran that read the tenant table: tenant-schemas-celery looks a task's
# tenant up there unless CELERY_TASK_TENANT_CACHE_SECONDS keeps it cached.
lookups: collections.Counter[str] = collections.Counter()


def _count_lookups(execute: Any, sql: Any, params: Any, many: bool, context: Any) -> Any:
    if isinstance(sql, str) and '"customers_client"' in sql:
        lookups["tenant"] += 1
    return execute(sql, params, many, context)


def _on_connection(sender: Any, connection: Any, **kwargs: Any) -> None:
    if _count_lookups not in connection.execute_wrappers:
        connection.execute_wrappers.insert(0, _count_lookups)


connection_created.connect(_on_connection, dispatch_uid="testproject.celery.lookups")
