"""The database-free layer: pure cores (classifiers, SQL builders, planners, groupings) tested
without PostgreSQL. ``runtests.py`` runs it first, before any cluster starts; pytest-django
refuses database access here (no test asks for ``db``)."""
