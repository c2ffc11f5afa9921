"""A data migration: every tenant starts with the same categories.

For tests: TESTPROJECT_FAIL_SEED names a schema whose seeding raises (one tenant's atomic
migration fails while the others go on), or is ``*`` to fail it in every schema;
TESTPROJECT_HOLD can hold a run here (see testproject.faults); TESTPROJECT_LEAK_PUBLIC names a
schema whose seeding also creates a table in public (what a --tenant run must notice).
"""

import os

from django.db import migrations

from testproject import faults

CATEGORIES = ["books", "games", "music"]


def seed(apps, schema_editor):
    # The migration's own connection, as Django advises for data migrations: it is the one
    # migrate --database chose and the one whose schema is being migrated.
    connection = schema_editor.connection
    faults.hold("seed", connection)
    Category = apps.get_model("shop", "Category")
    for name in CATEGORIES:
        Category.objects.using(connection.alias).create(name=name)
    if connection.schema_name == os.environ.get("TESTPROJECT_LEAK_PUBLIC"):
        schema_editor.execute("CREATE TABLE public.shop_leaked (id integer)")
    if faults.fail_seed(connection.schema_name):
        raise RuntimeError(f"seeding failed on purpose in {connection.schema_name}")


def unseed(apps, schema_editor):
    Category = apps.get_model("shop", "Category")
    Category.objects.using(schema_editor.connection.alias).filter(name__in=CATEGORIES).delete()


class Migration(migrations.Migration):
    dependencies = [("shop", "0001_initial")]

    operations = [migrations.RunPython(seed, unseed)]
