"""The states a warm migration shares between tenants (see :mod:`tenantsafe.migrate.warm`):
each applied set's plan, the state before it and each operation's, and post_migrate's models;
and where a plan's RunPython operations run, for recorders and replays."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from django.apps import apps as global_apps
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.loader import MigrationLoader
from django.db.migrations.migration import Migration
from django.db.migrations.operations import RunPython
from django.db.migrations.recorder import MigrationRecorder
from django.db.migrations.state import ModelState, ProjectState
from django.db.transaction import atomic as atomic_block

Key = tuple[str, str]


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
