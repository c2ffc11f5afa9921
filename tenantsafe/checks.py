"""System checks (``manage.py check``) for what django-tenants and tenantsafe rely on.

Configuration checks run with every command, so they read settings only (no queries). The
pooler check needs the database and runs only under ``check --database <alias>`` (and in
``migrate``, which passes its ``--database``), as Django's database checks do.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from django.apps import AppConfig, apps
from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, connections
from django.db.utils import load_backend
from django.utils.module_loading import import_string

from tenantsafe import citus, guard

Messages = list[checks.CheckMessage]

_BACKEND = "django_tenants.postgresql_backend"
_ROUTER = "django_tenants.routers.TenantSyncRouter"


def register() -> None:
    # The registry is a set: calling this again (tests, reloads) adds nothing.
    for check in (
        check_backend,
        check_router,
        check_models,
        check_app_lists,
        check_limit_set_calls,
        check_provisioning,
        check_recycling,
    ):
        checks.register(check, "tenantsafe")
    checks.register(check_pooler, "tenantsafe", checks.Tags.database)
    checks.register(check_citus, "tenantsafe", checks.Tags.database)


def _tenant_alias() -> str:
    from django_tenants.utils import get_tenant_database_alias

    return str(get_tenant_database_alias())


def _backend_class(alias: str) -> tuple[type[Any] | None, str]:
    engine = str(settings.DATABASES.get(alias, {}).get("ENGINE", ""))
    try:
        return load_backend(engine).DatabaseWrapper, engine
    except (ImproperlyConfigured, ImportError, AttributeError):
        return None, engine


def check_backend(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> Messages:
    from django_tenants.postgresql_backend.base import DatabaseWrapper as TenantWrapper

    alias = _tenant_alias()
    hint = (
        f"Set DATABASES[{alias!r}]['ENGINE'] to {_BACKEND!r}, or to a backend whose "
        "DatabaseWrapper subclasses django-tenants'. Without it no search_path is set and "
        "every tenant reads and writes public."
    )
    if alias not in settings.DATABASES:
        return [
            checks.Error(
                f"The tenant database alias {alias!r} (TENANT_DB_ALIAS) is not in DATABASES.",
                hint=f"Add DATABASES[{alias!r}] or set TENANT_DB_ALIAS to an existing alias.",
                id="tenantsafe.E001",
            )
        ]
    wrapper, engine = _backend_class(alias)
    if wrapper is None or not issubclass(wrapper, TenantWrapper):
        return [
            checks.Error(
                f"DATABASES[{alias!r}] uses the database backend {engine!r}, which is not "
                "django-tenants' backend or a subclass of it.",
                hint=hint,
                id="tenantsafe.E001",
            )
        ]
    return []


def _router_class(entry: Any) -> type[Any] | None:
    if isinstance(entry, str):
        try:
            entry = import_string(entry)
        except ImportError:
            return None
    return entry if isinstance(entry, type) else type(entry)


def check_router(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> Messages:
    from django_tenants.routers import TenantSyncRouter

    routers = [_router_class(entry) for entry in getattr(settings, "DATABASE_ROUTERS", [])]
    if any(cls is not None and issubclass(cls, TenantSyncRouter) for cls in routers):
        return []
    return [
        checks.Error(
            "DATABASE_ROUTERS does not include django-tenants' TenantSyncRouter or a subclass "
            "of it.",
            hint=f"Add {_ROUTER!r} to DATABASE_ROUTERS. Without it migrate creates the tables "
            "of every app in every schema, tenant tables in public included.",
            id="tenantsafe.E002",
        )
    ]


def _model_problem(setting: str, base: type[Any], base_name: str) -> str | None:
    value = getattr(settings, setting, None)
    if not value:
        return f"{setting} is not set."
    try:
        model = apps.get_model(value)
    except (ValueError, LookupError, TypeError):
        return f"{setting} = {value!r} does not name an installed model."
    if not issubclass(model, base):
        return f"{setting} = {value!r} names a model that does not subclass {base_name}."
    return None


def check_models(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> Messages:
    from django_tenants.models import DomainMixin, TenantMixin

    errors: Messages = []
    problem = _model_problem("TENANT_MODEL", TenantMixin, "django_tenants.models.TenantMixin")
    if problem:
        errors.append(
            checks.Error(
                problem,
                hint="Set TENANT_MODEL to 'app_label.ModelName' of your tenant model, a "
                "subclass of django_tenants.models.TenantMixin in an app of SHARED_APPS.",
                id="tenantsafe.E003",
            )
        )
    problem = _model_problem(
        "TENANT_DOMAIN_MODEL", DomainMixin, "django_tenants.models.DomainMixin"
    )
    if problem:
        errors.append(
            checks.Error(
                problem,
                hint="Set TENANT_DOMAIN_MODEL to 'app_label.ModelName' of your domain model, "
                "a subclass of django_tenants.models.DomainMixin in an app of SHARED_APPS.",
                id="tenantsafe.E004",
            )
        )
    return errors


def _app_lists() -> tuple[dict[str, list[str]], set[str]]:
    """Each routing list by the setting that holds it, and the names of the public one(s)."""
    from django_tenants.utils import (
        get_public_schema_name,
        get_tenant_types,
        has_multi_type_tenants,
    )

    if has_multi_type_tenants():
        public = get_public_schema_name()
        lists = {
            f"TENANT_TYPES[{name!r}]['APPS']": list(config.get("APPS", []))
            for name, config in get_tenant_types().items()
        }
        return lists, {f"TENANT_TYPES[{public!r}]['APPS']"}
    lists = {
        "SHARED_APPS": list(getattr(settings, "SHARED_APPS", [])),
        "TENANT_APPS": list(getattr(settings, "TENANT_APPS", [])),
    }
    return lists, {"SHARED_APPS"}


def _names(config: AppConfig) -> set[str]:
    # The two spellings TenantSyncRouter.app_in_list accepts for an app.
    return {config.name, f"{type(config).__module__}.{type(config).__name__}"}


def _listed(config: AppConfig, entries: Iterable[str]) -> bool:
    names = _names(config)
    return any(entry in names for entry in entries)


def check_app_lists(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> Messages:
    lists, public = _app_lists()
    configs = list(apps.get_app_configs())
    installed = set().union(*(_names(c) for c in configs))
    messages: Messages = []
    for setting, entries in lists.items():
        for entry in entries:
            if entry not in installed:
                messages.append(
                    checks.Error(
                        f"{setting} lists {entry!r}, which is not in INSTALLED_APPS.",
                        hint=f"Add {entry!r} to INSTALLED_APPS (django-tenants migrates "
                        f"installed apps only) or remove it from {setting}.",
                        id="tenantsafe.E005",
                    )
                )
    public_entries = [e for setting in public for e in lists.get(setting, [])]
    for setting in ("TENANT_MODEL", "TENANT_DOMAIN_MODEL"):
        value = getattr(settings, setting, None)
        try:
            config = apps.get_model(value)._meta.app_config if value else None
        except (ValueError, LookupError, TypeError):
            config = None  # reported as E003 / E004
        if config is not None and not _listed(config, public_entries):
            messages.append(
                checks.Error(
                    f"The app of {setting} ({config.name!r}) is not in "
                    f"{' / '.join(sorted(public))}, so its table is never created in public.",
                    hint=f"Add {config.name!r} to {' / '.join(sorted(public))}: django-tenants "
                    "looks tenants and domains up in the public schema.",
                    id="tenantsafe.E006",
                )
            )
    every_entry = [e for entries in lists.values() for e in entries]
    nowhere = (
        "neither SHARED_APPS nor TENANT_APPS"
        if set(lists) == {"SHARED_APPS", "TENANT_APPS"}
        else "no TENANT_TYPES[...]['APPS'] list"
    )
    for config in configs:
        models = [m for m in config.get_models() if m._meta.managed and not m._meta.proxy]
        if models and not _listed(config, every_entry):
            messages.append(
                checks.Warning(
                    f"The installed app {config.label!r} has models but is in {nowhere}, so "
                    "migrate creates its tables in no schema.",
                    hint="Add it to SHARED_APPS (tables in public), TENANT_APPS (tables in "
                    "every tenant schema) or both.",
                    id="tenantsafe.W001",
                )
            )
    return messages


def rollback_forgets_search_path(wrapper_class: type[Any]) -> bool:
    """Whether the backend drops its cached search_path on rollback and savepoint rollback.

    Tried on a wrapper that never connects: its rollbacks have nothing to roll back, so only
    the backend's own bookkeeping runs.
    """
    alias = _tenant_alias()
    try:
        probe = wrapper_class(dict(connections[alias].settings_dict), alias)
        probe.search_path_set_schemas = ["public"]
        probe.rollback()
        after_rollback = probe.search_path_set_schemas
        probe.search_path_set_schemas = ["public"]
        # Outside a transaction savepoint_rollback() returns at once, without connecting.
        probe.get_autocommit = lambda: True
        probe.savepoint_rollback("tenantsafe_probe")
        after_savepoint = probe.search_path_set_schemas
    except Exception:
        return False
    return after_rollback is None and after_savepoint is None


def check_limit_set_calls(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> Messages:
    if not getattr(settings, "TENANT_LIMIT_SET_CALLS", False):
        return []
    wrapper, _ = _backend_class(_tenant_alias())
    if wrapper is None or rollback_forgets_search_path(wrapper):
        return []
    return [
        checks.Warning(
            "TENANT_LIMIT_SET_CALLS is on, but the installed django-tenants backend keeps its "
            "cached search_path after a rollback.",
            hint="PostgreSQL undoes a SET search_path with the transaction (or savepoint) "
            "that issued it; this backend still believes the path is set and skips the SET, "
            "so the next queries run in public or in the previous tenant. Upgrade "
            "django-tenants to a release whose backend clears search_path_set_schemas in "
            "rollback() and savepoint_rollback() (4.0.1 does), or set "
            "TENANT_LIMIT_SET_CALLS = False.",
            id="tenantsafe.W002",
        )
    ]


_PROVISIONING_MODES = (None, "migrate", "replay")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_seconds(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def check_provisioning(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> Messages:
    from django_tenants.utils import has_multi_type_tenants

    messages: Messages = []
    mode = getattr(settings, "TENANTSAFE_PROVISIONING", None)
    if mode not in _PROVISIONING_MODES:
        messages.append(
            checks.Error(
                f"TENANTSAFE_PROVISIONING = {mode!r} is neither 'migrate' nor 'replay', so new "
                "tenants are migrated, as without the setting.",
                hint="Set TENANTSAFE_PROVISIONING = 'replay' to provision new tenants by replay, "
                "or remove it (or set 'migrate') to keep django-tenants' migrating save().",
                id="tenantsafe.E007",
            )
        )
    spares = getattr(settings, "TENANTSAFE_SPARE_SCHEMAS", None)
    if spares is not None and not _is_count(spares):
        messages.append(
            checks.Error(
                f"TENANTSAFE_SPARE_SCHEMAS = {spares!r} is not a whole number of 0 or more.",
                hint="Set it to how many spare schemas to keep provisioned ahead, an int such "
                "as 5, or to 0 for none.",
                id="tenantsafe.E008",
            )
        )
    wait = getattr(settings, "TENANTSAFE_RECORDING_WAIT_SECONDS", None)
    if wait is not None and not _is_seconds(wait):
        messages.append(
            checks.Error(
                f"TENANTSAFE_RECORDING_WAIT_SECONDS = {wait!r} is not a number of seconds of 0 "
                "or more.",
                hint="Set it to how long a new tenant's provisioning may wait for another "
                "process's recording of the migration state, such as 60 (the default).",
                id="tenantsafe.E009",
            )
        )
    if _is_count(spares) and spares and has_multi_type_tenants():
        messages.append(
            checks.Warning(
                f"TENANTSAFE_SPARE_SCHEMAS is {spares}, but spare schemas do not support "
                "multi-type tenants (TENANT_TYPES) yet: migrate_schemas_safe makes none and "
                "tenantsafe_spares refuses to run, so every new tenant is replayed or migrated.",
                hint="Remove TENANTSAFE_SPARE_SCHEMAS (or set it to 0) while "
                "HAS_MULTI_TYPE_TENANTS is on, and any cron job that runs tenantsafe_spares.",
                id="tenantsafe.W005",
            )
        )
    elif _is_count(spares) and spares and mode != "replay":
        messages.append(
            checks.Warning(
                f"TENANTSAFE_SPARE_SCHEMAS is {spares}, but TENANTSAFE_PROVISIONING is not "
                "'replay': saving a new tenant migrates its schema and never claims a spare, "
                "so the spares migrate_schemas_safe and tenantsafe_spares keep go unused "
                "(only tenantsafe.provisioning.provision() claims them).",
                hint="Set TENANTSAFE_PROVISIONING = 'replay', or remove TENANTSAFE_SPARE_SCHEMAS "
                "(or set it to 0) if new tenants are not provisioned with provision().",
                id="tenantsafe.W006",
            )
        )
    return messages


def _tenant_connections(databases: Sequence[str] | None) -> Iterator[tuple[str, Any]]:
    """The connections of ``databases`` that switch schemas (django-tenants' backend)."""
    for alias in databases or ():
        connection = connections[alias]
        if hasattr(connection, "_get_cursor_search_paths"):
            yield alias, connection


def check_recycling(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> Messages:
    value = getattr(settings, "TENANTSAFE_RECYCLE_AFTER_SCHEMAS", None)
    if value is None or (_is_count(value) and value > 0):
        return []
    return [
        checks.Error(
            f"TENANTSAFE_RECYCLE_AFTER_SCHEMAS = {value!r} is not a whole number above 0, so "
            "connections are never recycled.",
            hint="Set it to after how many distinct tenant schemas a connection is recycled, "
            "an int such as 1000, or remove it (None) to never recycle.",
            id="tenantsafe.E010",
        )
    ]


def check_pooler(
    app_configs: Sequence[AppConfig] | None = None,
    databases: Sequence[str] | None = None,
    **kwargs: Any,
) -> Messages:
    messages: Messages = []
    for alias, connection in _tenant_connections(databases):
        # tenantsafe's guard (on during migrate_schemas_safe, or everywhere with
        # TENANTSAFE_RUNTIME_GUARD) pins the path.
        if guard.is_active(connection):
            continue
        try:
            pooled = guard.is_pooled(connection)
        except DatabaseError as exc:
            messages.append(
                checks.Warning(
                    f"Could not ask database {alias!r} whether a transaction pooler is in "
                    f"between: {' '.join(str(exc).split())}",
                    hint="Make the database reachable, or set TENANTSAFE_TRANSACTION_POOLER "
                    "to True or False for this alias.",
                    id="tenantsafe.W004",
                )
            )
            continue
        if pooled:
            messages.append(
                checks.Warning(
                    f"Database {alias!r} reaches PostgreSQL through a transaction pooler, which "
                    "can run django-tenants' SET search_path and the statements after it on "
                    "different server connections.",
                    hint="Migrate with migrate_schemas_safe (not migrate_schemas or migrate), "
                    "which pins the search_path to every statement; run non-atomic migrations "
                    "over a direct connection; set TENANTSAFE_RUNTIME_GUARD = True to guard "
                    "requests too. If nothing pools in between, set "
                    "TENANTSAFE_TRANSACTION_POOLER = False.",
                    id="tenantsafe.W003",
                )
            )
    return messages


def check_citus(
    app_configs: Sequence[AppConfig] | None = None,
    databases: Sequence[str] | None = None,
    **kwargs: Any,
) -> Messages:
    messages: Messages = []
    for alias, connection in _tenant_connections(databases):
        try:
            found = citus.detect(connection)
        except DatabaseError:
            continue  # unreachable: the command itself (or W004) says so
        if found.installed and not found.sharding:
            messages.append(
                checks.Warning(
                    f"Database {alias!r} is a Citus database without schema-based sharding "
                    "(citus.enable_schema_based_sharding is off): every new tenant schema stays "
                    "on the coordinator.",
                    hint="Run ALTER DATABASE <name> SET citus.enable_schema_based_sharding = on "
                    "on the coordinator, then distribute the tenants made meanwhile "
                    "(tenantsafe_doctor lists them).",
                    id="tenantsafe.W007",
                )
            )
    return messages
