"""A data migration: every tenant starts with the same categories.

TESTPROJECT_FAIL_SEED names a schema whose seeding raises, so tests can watch one tenant's
atomic migration fail while the others go on.
"""

import os

from django.db import connection, migrations

CATEGORIES = ["books", "games", "music"]


def seed(apps, schema_editor):
    Category = apps.get_model("shop", "Category")
    for name in CATEGORIES:
        Category.objects.create(name=name)
    if connection.schema_name == os.environ.get("TESTPROJECT_FAIL_SEED"):
        raise RuntimeError(f"seeding failed on purpose in {connection.schema_name}")


def unseed(apps, schema_editor):
    apps.get_model("shop", "Category").objects.filter(name__in=CATEGORIES).delete()


class Migration(migrations.Migration):
    dependencies = [("shop", "0001_initial")]

    operations = [migrations.RunPython(seed, unseed)]
