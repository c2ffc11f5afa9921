"""A data migration. For tests: with TESTPROJECT_NOTE_TENANT_PK set, the note names the pk of
the tenant it is written for, read from the tenant table (what a recorded schema template must
never copy into another tenant)."""

import os

from django.db import migrations


def welcome(apps, schema_editor):
    alias = schema_editor.connection.alias
    Note = apps.get_model("notes", "Note")
    Tag = apps.get_model("notes", "Tag")
    body = "Your workspace is ready."
    if os.environ.get("TESTPROJECT_NOTE_TENANT_PK"):
        Client = apps.get_model("customers", "Client")
        schema = schema_editor.connection.schema_name
        body = f"tenant {Client.objects.using(alias).get(schema_name=schema).pk}"
    note = Note.objects.using(alias).create(title="Welcome", body=body, pinned=True)
    Tag.objects.using(alias).create(label="start").notes.add(note)


class Migration(migrations.Migration):
    dependencies = [("notes", "0002_tag")]

    operations = [migrations.RunPython(welcome, migrations.RunPython.noop)]
