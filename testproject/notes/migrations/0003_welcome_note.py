from django.db import migrations


def welcome(apps, schema_editor):
    alias = schema_editor.connection.alias
    Note = apps.get_model("notes", "Note")
    Tag = apps.get_model("notes", "Tag")
    note = Note.objects.using(alias).create(
        title="Welcome", body="Your workspace is ready.", pinned=True
    )
    Tag.objects.using(alias).create(label="start").notes.add(note)


class Migration(migrations.Migration):
    dependencies = [("notes", "0002_tag")]

    operations = [migrations.RunPython(welcome, migrations.RunPython.noop)]
