"""A non-atomic migration: CREATE INDEX CONCURRENTLY cannot run inside a transaction block."""

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [("search", "0001_initial")]

    operations = [
        AddIndexConcurrently(
            model_name="searchentry",
            index=models.Index(fields=["term"], name="search_term_idx"),
        ),
    ]
