"""A large tenant app for the benchmarks, generated at run time: ``generate(directory)`` writes the
package ``bench_bigapp`` (``models.py`` and ``migrations/0001_initial.py``) into ``directory``.

One ``Hub`` model and ``models`` more, each with a unique and an indexed column and a foreign key
to the model before it (the first one's to ``Hub``), all created by one migration. Put
``directory`` on PYTHONPATH and use ``bench.bigapp_settings``, which adds the app to
``TENANT_APPS``.
"""

from __future__ import annotations

import itertools
from pathlib import Path

APP = "bench_bigapp"

_MODEL = """

class {name}(models.Model):
    code = models.CharField(max_length=40, unique=True)
    rank = models.IntegerField(db_index=True)
    parent = models.ForeignKey("{parent}", on_delete=models.CASCADE)
"""

_CREATE = """        migrations.CreateModel(
            name="{name}",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("code", models.CharField(max_length=40, unique=True)),
                ("rank", models.IntegerField(db_index=True)),{parent}
            ],
        ),
"""

_PARENT = """
                (
                    "parent",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE, to="{app}.{parent}"
                    ),
                ),"""


def names(models: int) -> list[str]:
    return ["Hub"] + [f"Model{number:03d}" for number in range(1, models + 1)]


def generate(directory: Path, models: int = 150) -> Path:
    """Write the app's package into ``directory``; returns the package's path."""
    package = directory / APP
    (package / "migrations").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "migrations" / "__init__.py").write_text("")
    all_names = names(models)
    source = ["from django.db import models", "", "", "class Hub(models.Model):"]
    source += [
        "    code = models.CharField(max_length=40, unique=True)",
        "    rank = models.IntegerField(db_index=True)",
    ]
    operations = [_CREATE.format(name="Hub", parent="")]
    for parent, name in itertools.pairwise(all_names):
        source.append(_MODEL.format(name=name, parent=parent).rstrip("\n"))
        operations.append(
            _CREATE.format(name=name, parent=_PARENT.format(app=APP, parent=parent.lower()))
        )
    (package / "models.py").write_text("\n".join(source) + "\n")
    (package / "migrations" / "0001_initial.py").write_text(
        "import django.db.models.deletion\n"
        "from django.db import migrations, models\n\n\n"
        "class Migration(migrations.Migration):\n"
        "    initial = True\n\n"
        "    dependencies = []\n\n"
        "    operations = [\n" + "".join(operations) + "    ]\n"
    )
    return package
