"""Warm migrations: Django's migrate in each tenant, its work shared across the run.

Django's ``migrate`` spends most of a tenant's time in Python that gives every tenant the same
answer: it loads the migration graph from disk, replays every applied migration's operations
into a project state, renders that state's models (several times: before the plan, at each
``RunPython``, for ``post_migrate``), and only then sends a few statements. Tenants that have
the same migrations applied get the same graph, the same states and the same models.

So ``migrate_schemas_safe`` runs django-tenants' ``run_migrations`` per tenant as always, with
``TENANT_BASE_MIGRATE_COMMAND`` pointing at :class:`Command`, a subclass of Django's migrate
command. For a tenant whose plan it can serve warm (forwards, no ``--fake``/``--fake-initial``,
``--plan``, ``--check``, ``--prune`` or ``--run-syncdb``), the command reads the tenant's
``django_migrations`` (as Django's loader does) and takes, from the run's :class:`WarmRun`,
what that applied set needs, made once per run and kept for the next tenants:

* the loader and graph (one per run; another only where a squashed migration is partly
  applied), with the set's plan;
* the project state before the plan and its rendered models (``pre_migrate``'s ``apps``);
* for each operation of each migration of the plan, the states before and after it;
* the models ``post_migrate`` gets.

Then it does what Django's ``migrate`` does, with Django's own code: the same output, the same
``pre_migrate`` and ``post_migrate`` signals (with those ``apps`` and the plan), the executor's
``migrate()`` with its transactions, ``django_migrations`` rows and squash bookkeeping, each
operation's ``database_forwards()`` against this tenant's connection (so introspection, routers
and ``RunPython`` code see this tenant), and the same errors. Only the states are shared.

Why sharing them is sound: a project state is computed from the migration files alone
(``state_forwards()`` never reads the database), so two tenants with the same applied set get
equal states; Django's operations only read the states they are given. Two things would break
that, and neither is done by Django's operations or contrib apps: code that mutates the
historical models or the ``apps`` it is handed (a ``RunPython`` that adds a field to a
historical model class, say), and a ``pre_migrate``/``post_migrate`` handler that keeps the
``apps`` it got and changes it. With such code, turn warm migrations off
(``TENANTSAFE_WARM_MIGRATIONS = False``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from importlib import import_module
from typing import Any

from django.apps import apps as global_apps
from django.conf import settings
from django.core.management.base import no_translations
from django.core.management.commands import migrate
from django.core.management.sql import emit_post_migrate_signal, emit_pre_migrate_signal
from django.db import connections
from django.db.migrations.recorder import MigrationRecorder
from django.test.utils import override_settings
from django.utils.module_loading import module_has_submodule

from tenantsafe import conf, plan, registry
from tenantsafe.errors import PlanError
from tenantsafe.migrate.states import Key, WarmPlan
from tenantsafe.options import RunOptions

logger = logging.getLogger("tenantsafe.migrate")


# The runs in progress, by database alias (a run registers itself for its duration).
_runs: dict[str, WarmRun] = registry.cache("tenantsafe.migrate.warm.runs")

# What the command class path is while a run serves tenants warm.
COMMAND = "tenantsafe.migrate.warm.Command"


class WarmRun:
    """The warm plans of one ``migrate_schemas_safe`` run, by applied set."""

    def __init__(self, planner: plan.Planner) -> None:
        self.planner = planner
        self._plans: dict[frozenset[Key], WarmPlan | None] = {}
        # Django refuses a graph with conflicts in every tenant: let it say so.
        self.usable = not planner.loader.detect_conflicts()

    def prepare(self, applied_sets: Iterable[frozenset[Key] | None]) -> None:
        """Make the warm plans of ``applied_sets`` (forwards ones) before any tenant needs
        them; one that cannot be made is left to the first tenant (which then goes through
        Django's own migrate if it cannot be made then either)."""
        for applied in set(applied_sets):
            if applied is None:
                continue
            warm = self.plan_for(applied)
            if warm is None or not warm.plan or any(back for _, back in warm.plan):
                continue
            try:
                warm.prepare()
            except Exception:
                logger.debug("cannot prepare the warm plan of an applied set", exc_info=True)
                self._plans[applied] = None

    def plan_for(self, applied: frozenset[Key]) -> WarmPlan | None:
        if applied not in self._plans:
            found = self.planner.executor_plan(applied)
            self._plans[applied] = (
                None
                if found is None
                else WarmPlan(found.loader, found.applied, found.targets, found.plan)
            )
        return self._plans[applied]


def current(alias: str) -> WarmRun | None:
    """The warm run serving ``alias`` now, if any."""
    return _runs.get(alias)


@contextlib.contextmanager
def serving(opts: RunOptions, applied_sets: Iterable[frozenset[Key] | None] = ()) -> Iterator[None]:
    """While the block runs, the tenants ``opts``' run migrates through Django are served warm
    (unless turned off, or a project's own TENANT_BASE_MIGRATE_COMMAND is set: its command may
    do more than Django's). ``applied_sets``: those the run's read found, prepared first."""
    if (
        opts.plan
        or opts.check
        or not conf.warm_migrations()
        or getattr(settings, "TENANT_BASE_MIGRATE_COMMAND", None)
    ):
        yield
        return
    try:
        planner = plan.Planner(opts.app_label, opts.migration_name)
    except PlanError:
        # migrate reports the bad target in each tenant.
        yield
        return
    with (
        override_settings(TENANT_BASE_MIGRATE_COMMAND=COMMAND),
        warming(opts.database, planner) as run,
    ):
        run.prepare(applied_sets)
        yield


@contextlib.contextmanager
def warming(alias: str, planner: plan.Planner) -> Iterator[WarmRun]:
    """Serve tenants migrated on ``alias`` warm while the block runs (TENANT_BASE_MIGRATE_COMMAND
    must be :data:`COMMAND` meanwhile)."""
    run = WarmRun(planner)
    previous = _runs.get(alias)
    _runs[alias] = run
    try:
        yield run
    finally:
        if previous is None:
            _runs.pop(alias, None)
        else:
            _runs[alias] = previous


# Options under which Django's migrate does something else than apply a plan.
_COLD = ("plan", "check_unapplied", "prune", "run_syncdb", "fake", "fake_initial")


class Command(migrate.Command):
    """Django's migrate command, served warm inside a :func:`warming` block."""

    @no_translations
    def handle(self, *args: Any, **options: Any) -> None:
        database = options["database"]
        run = _runs.get(database)
        warm = None
        if run is not None and run.usable and not any(options.get(o) for o in _COLD):
            connection = connections[database]
            applied = frozenset(MigrationRecorder(connection).applied_migrations())
            warm = run.plan_for(applied)
        if warm is None or not warm.plan or any(backwards for _, backwards in warm.plan):
            super().handle(*args, **options)
            return
        self._handle_warm(connections[database], warm, options)

    def _handle_warm(self, connection: Any, warm: WarmPlan, options: dict[str, Any]) -> None:
        self.verbosity = options["verbosity"]
        self.interactive = options["interactive"]
        _import_management_modules()
        connection.prepare_database()
        executor = warm.executor(connection, self.migration_progress_callback)
        self._announce(warm, options)
        pre_migrate_state = warm.before(executor)
        emit_pre_migrate_signal(
            self.verbosity,
            self.interactive,
            connection.alias,
            stdout=self.stdout,
            apps=pre_migrate_state.apps,
            plan=warm.plan,
        )
        if self.verbosity >= 1:
            self.stdout.write(self.style.MIGRATE_HEADING("Running migrations:"))
        post_migrate_state = executor.migrate(
            warm.targets, plan=warm.plan, state=pre_migrate_state.clone()
        )
        emit_post_migrate_signal(
            self.verbosity,
            self.interactive,
            connection.alias,
            stdout=self.stdout,
            apps=warm.post_apps(post_migrate_state),
            plan=warm.plan,
        )

    def _announce(self, warm: WarmPlan, options: dict[str, Any]) -> None:
        # migrate's "Operations to perform" for a plan that applies migrations.
        if self.verbosity < 1:
            return
        self.stdout.write(self.style.MIGRATE_HEADING("Operations to perform:"))
        if options.get("app_label") and options.get("migration_name"):
            app_label, name = warm.targets[0]
            self.stdout.write(
                self.style.MIGRATE_LABEL("  Target specific migration: ")
                + f"{name}, from {app_label}"
            )
        else:
            labels = ", ".join(sorted({a for a, _ in warm.targets})) or "(none)"
            self.stdout.write(self.style.MIGRATE_LABEL("  Apply all migrations: ") + labels)


def _import_management_modules() -> None:
    # As migrate does first: an app's management module may connect signal handlers.
    for app_config in global_apps.get_app_configs():
        if module_has_submodule(app_config.module, "management"):
            import_module(".management", app_config.name)


__all__ = ["COMMAND", "Command", "WarmPlan", "WarmRun", "serving", "warming"]
