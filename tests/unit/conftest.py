"""The database-free layer: pure cores (classifiers, SQL builders, planners, groupings) tested
without PostgreSQL.

``runtests.py`` runs it first, in a process of its own before any cluster starts; pytest-django
refuses database access here, and a test that asks for a database fixture or marker is refused
at collection, with the reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
DATABASE_FIXTURES = {"db", "transactional_db", "django_db_setup", "live_server"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE not in item.path.parents:
            continue
        wanted = DATABASE_FIXTURES & set(getattr(item, "fixturenames", ()))
        if item.get_closest_marker("django_db") or wanted:
            raise pytest.UsageError(
                f"{item.nodeid}: the unit layer (tests/unit) runs without a database; move "
                f"the test next to the PostgreSQL tests in tests/ (it asks for "
                f"{', '.join(sorted(wanted)) or 'django_db'})."
            )
