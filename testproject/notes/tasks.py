"""Per-tenant tasks for the Celery tests: each writes a note and reads the tenant's products."""

from __future__ import annotations

import os
from typing import Any

from django.db import connection

from testproject.celery import app, lookups
from testproject.notes.models import Note
from testproject.shop.models import Product


@app.task
def write_and_read(title: str) -> dict[str, Any]:
    Note.objects.create(title=title)
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_schema()")
        (current,) = cursor.fetchone()
    return {
        "schema": connection.schema_name,
        "current_schema": current,
        "products": sorted(Product.objects.values_list("name", flat=True)),
        "process": os.getpid(),
        "tenant_lookups": lookups["tenant"],
    }
