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
import contextvars
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

from django.apps import apps as global_apps
from django.conf import settings
from django.core.management.base import no_translations
from django.core.management.commands import migrate
from django.core.management.sql import emit_post_migrate_signal, emit_pre_migrate_signal
from django.db import connections
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.loader import MigrationLoader
from django.db.migrations.migration import Migration
from django.db.migrations.operations import RunPython
from django.db.migrations.recorder import MigrationRecorder
from django.db.migrations.state import ModelState, ProjectState
from django.test.utils import override_settings
from django.utils.module_loading import module_has_submodule

from tenantsafe import conf, plan, registry
from tenantsafe.errors import PlanError
from tenantsafe.options import RunOptions

logger = logging.getLogger("tenantsafe.migrate")

Key = tuple[str, str]

# The runs in progress, by database alias (a run registers itself for its duration).
_runs: dict[str, WarmRun] = registry.cache("tenantsafe.migrate.warm.runs")

# What the command class path is while a run serves tenants warm.
COMMAND = "tenantsafe.migrate.warm.Command"


@dataclass(frozen=True)
class Python:
    """A RunPython operation of a plan: ``operations[index]`` of migration ``app``.``name``."""

    app: str
    name: str
    index: int

    @property
    def marker(self) -> str:
        """Where this RunPython runs, as a part of a recording (an SQL comment)."""
        return f"{_MARKER}{self.app} {self.name} {self.index}"

    @classmethod
    def at(cls, part: str) -> Python | None:
        """The RunPython a recording's ``part`` marks; None for a statement."""
        if not part.startswith(_MARKER):
            return None
        app, name, index = part[len(_MARKER) :].split(" ")
        return cls(app, name, int(index))


_MARKER = "-- tenantsafe: RunPython "

# Watches a RunPython of a warm migration: entered as it starts, left when it ends.
Watcher = Callable[[Python], contextlib.AbstractContextManager[Any]]
_watchers: contextvars.ContextVar[tuple[Watcher, ...]] = contextvars.ContextVar(
    "tenantsafe_warm_watchers", default=()
)


@contextlib.contextmanager
def watching_python(watcher: Watcher) -> Iterator[None]:
    """Have ``watcher`` watch each RunPython of a warm migration in this thread (a recorder
    keeps a data migration's own statements apart from the schema's)."""
    token = _watchers.set((*_watchers.get(), watcher))
    try:
        yield
    finally:
        _watchers.reset(token)


@dataclass(frozen=True)
class Step:
    """One operation of a migration with the states Django's ``Migration.apply()`` gives it."""

    operation: Any
    before: ProjectState
    after: ProjectState


@dataclass
class WarmPlan:
    """What every tenant with one applied set shares: made once, used by each."""

    loader: MigrationLoader
    applied: dict[Key, Any]
    targets: list[tuple[str, str | None]]
    plan: list[tuple[Migration, bool]]
    _before: ProjectState | None = None
    _steps: dict[Key, list[Step]] = field(default_factory=dict)
    _post_apps: Any = None

    def executor(self, connection: Any, progress_callback: Any) -> _Executor:
        # The loader is shared by the applied sets whose partly applied squashes agree: say
        # whose set this tenant has.
        self.loader.applied_migrations = self.applied
        return _Executor(connection, progress_callback, self)

    def before(self, executor: MigrationExecutor) -> ProjectState:
        """The state before the plan, its models rendered (what ``pre_migrate`` gets)."""
        if self._before is None:
            # Django's own, not _Executor's (which asks for this).
            create = MigrationExecutor._create_project_state  # type: ignore[attr-defined]
            state = create(executor, with_applied_migrations=True)
            state.apps  # noqa: B018 - rendered once, for every tenant
            self._before = state
        return self._before

    def steps(self, migration: Migration, state: ProjectState) -> list[Step]:
        """Each operation of ``migration`` with its states, from ``state`` (the state before
        ``migration`` in the plan) the first time."""
        key = (migration.app_label, migration.name)
        found = self._steps.get(key)
        if found is None:
            found = []
            for operation in migration.operations:
                after = state.clone()
                operation.state_forwards(migration.app_label, after)
                found.append(Step(operation, state, after))
                state = after
            self._steps[key] = found
        return found

    def prepare(self) -> None:
        """Compute every state of the plan now (no database is needed): forked workers then
        inherit them instead of each computing its own."""
        executor = _Executor(None, None, self)
        state = self.before(executor)
        for migration, _ in self.plan:
            steps = self.steps(migration, state)
            state = steps[-1].after if steps else state
            for step in steps:
                if isinstance(step.operation, RunPython):
                    _settle(step.before)
        self.post_apps(state)

    def step(self, python: Python) -> Step:
        """The RunPython ``python`` of this plan with its states (computed already)."""
        return self._steps[(python.app, python.name)][python.index]

    def post_apps(self, state: ProjectState) -> Any:
        """The ``apps`` Django's migrate gives ``post_migrate``, from the plan's last state."""
        if self._post_apps is None:
            self._post_apps = _post_migrate_apps(state.clone())
        return self._post_apps


def _post_migrate_apps(state: ProjectState) -> Any:
    # As migrate.Command.handle(): all models reloaded, and the real apps' models re-rendered
    # with their relationships.
    state.clear_delayed_apps_cache()
    post_apps = state.apps
    with post_apps.bulk_update():
        model_keys = []
        for model_state in post_apps.real_models:
            model_key = model_state.app_label, model_state.name_lower
            model_keys.append(model_key)
            post_apps.unregister_model(*model_key)
    post_apps.render_multiple(
        [ModelState.from_model(global_apps.get_model(*model)) for model in model_keys]
    )
    return post_apps


class _Applied:
    """A migration of the plan as the executor applies it, with the shared states.

    ``MigrationExecutor.apply_migration()`` (its transaction, recording and progress) runs
    as it is; only ``Migration.apply()``'s loop takes the states from the plan's cache.
    """

    def __init__(self, migration: Migration, warm: WarmPlan) -> None:
        self._migration = migration
        self._warm = warm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._migration, name)

    def __str__(self) -> str:
        return str(self._migration)

    def apply(self, project_state: ProjectState, schema_editor: Any) -> ProjectState:
        migration = self._migration
        steps = self._warm.steps(migration, project_state)
        for index, step in enumerate(steps):
            atomic_operation = step.operation.atomic or (
                migration.atomic and step.operation.atomic is not False
            )
            if not isinstance(step.operation, RunPython):
                _forwards(migration, step, schema_editor, atomic_operation)
                continue
            _settle(step.before)
            python = Python(migration.app_label, migration.name, index)
            with contextlib.ExitStack() as watched:
                for watcher in _watchers.get():
                    watched.enter_context(watcher(python))
                _forwards(migration, step, schema_editor, atomic_operation)
        return steps[-1].after if steps else project_state


def _settle(state: ProjectState) -> None:
    # RunPython reloads a delayed state's models before it hands them over, which on a shared
    # state would render them again in every tenant: do it once, and the state is no longer
    # delayed.
    if state.is_delayed:
        state.clear_delayed_apps_cache()
        state.apps  # noqa: B018
        state.is_delayed = False


def _forwards(migration: Migration, step: Step, schema_editor: Any, atomic: bool) -> None:
    from django.db.transaction import atomic as atomic_block

    if not schema_editor.atomic_migration and atomic:
        # As Migration.apply(): an atomic operation inside a non-atomic migration.
        with atomic_block(schema_editor.connection.alias):
            step.operation.database_forwards(
                migration.app_label, schema_editor, step.before, step.after
            )
    else:
        step.operation.database_forwards(
            migration.app_label, schema_editor, step.before, step.after
        )


class _Executor(MigrationExecutor):
    """Django's executor on the run's loader and states."""

    def __init__(self, connection: Any, progress_callback: Any, warm: WarmPlan) -> None:
        # Not MigrationExecutor.__init__: it would load the graph from disk and the database.
        self.connection = connection
        self.loader = warm.loader
        self.recorder = MigrationRecorder(connection)
        self.progress_callback = progress_callback
        self._warm = warm

    def _create_project_state(self, with_applied_migrations: bool = False) -> ProjectState:
        if with_applied_migrations:
            return self._warm.before(self).clone()
        state: ProjectState = super()._create_project_state(  # type: ignore[misc]
            with_applied_migrations
        )
        return state

    def apply_migration(
        self,
        state: ProjectState,
        migration: Migration,
        fake: bool = False,
        fake_initial: bool = False,
    ) -> ProjectState:
        applied: Any = _Applied(migration, self._warm)
        return super().apply_migration(state, applied, fake=fake, fake_initial=fake_initial)


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
