"""What ``migrate_schemas_safe`` does: django-tenants' executors, guarded and fault-isolated.

Internal: this package may change without notice; the command and the settings are the public
surface. The layers, each importing only those below it:

- :mod:`~tenantsafe.migrate.run`: :class:`MigrationRun`, one run (public, the read, the
  tenants) collecting its results into a :class:`~tenantsafe.results.Summary`;
- :mod:`~tenantsafe.migrate.deploy`: :class:`DeployRun`, the tenants with migrations to apply,
  by replay to groups of alike tenants (:mod:`~tenantsafe.migrate.groups`) after two
  witnesses (:mod:`~tenantsafe.migrate.witness`), the others through Django;
- :mod:`~tenantsafe.migrate.skipping`: which tenants need migrate at all, from one read;
- :mod:`~tenantsafe.migrate.executor`: :class:`Executor`, running a tenant path for many
  tenants in order or on forked workers (:mod:`~tenantsafe.migrate.pool`) under the run's
  stop rules;
- :mod:`~tenantsafe.migrate.tenant`: one tenant through Django, with retries
  (:func:`migrate_tenant`, also what provisioning uses);
- :mod:`~tenantsafe.migrate.failures` (what went wrong, in one line) and
  :mod:`~tenantsafe.migrate.output` (where a run writes);
- :mod:`~tenantsafe.migrate.report`: the summary the command prints.

A run's state lives on its objects (``MigrationRun``, ``DeployRun``, ``Executor``), which the
forked workers inherit with the work they are given; no module keeps a global of a run.
"""

from __future__ import annotations

from tenantsafe.migrate.deploy import DeployRun
from tenantsafe.migrate.executor import Executor, TenantPath
from tenantsafe.migrate.report import report
from tenantsafe.migrate.run import MigrationRun, run
from tenantsafe.migrate.tenant import Place, migrate_tenant

__all__ = [
    "DeployRun",
    "Executor",
    "MigrationRun",
    "Place",
    "TenantPath",
    "migrate_tenant",
    "report",
    "run",
]
