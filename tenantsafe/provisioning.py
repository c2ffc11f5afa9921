"""Provisioning a new tenant's schema by replaying a recording of its migration.

With ``TENANTSAFE_PROVISIONING = "replay"``, ``tenant.save()`` of a new tenant (with
``auto_create_schema`` on) runs django-tenants' save as always, but its ``create_schema`` step
replays the recording for the current migration state (``tenantsafe.recording``) instead of
migrating: a ``pre_save`` receiver shadows ``create_schema`` on that instance only, so the
user's model is unchanged and django-tenants still sends ``post_schema_sync``, and deletes the
row and schema when provisioning fails. :func:`provision` does the same explicitly.

A spare schema (``tenantsafe.spares``) of the current migration state is claimed first when
there is one. Without a usable recording the schema is migrated under the tenant's lease, as
``migrate_schemas_safe`` migrates, and recorded for the next tenants; processes that find no
recording at the same time wait for the first one's (``RecordingStore.turn_to_record``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import uuid
from typing import Any

from django.conf import settings
from django.db import connections
from django.db.models import Model
from django_tenants.models import TenantMixin
from django_tenants.signals import post_schema_sync
from django_tenants.utils import (
    get_creation_fakes_migrations,
    get_multi_type_database_field_name,
    get_tenant_base_migrate_command_class,
    get_tenant_database_alias,
    get_tenant_model,
)

from tenantsafe import conf, errors, guard, locks, migrate, recording, schemas, spares, tenants
from tenantsafe.errors import ProvisionError
from tenantsafe.migrate import recorder
from tenantsafe.options import RunOptions
from tenantsafe.results import FAILED, MIGRATED, REPLAYED, SPARE, TenantRef

logger = logging.getLogger("tenantsafe.provisioning")

__all__ = [
    "MIGRATED",
    "REPLAYED",
    "SPARE",
    "ensure_recording",
    "fill_spares",
    "provision",
]


def __getattr__(name: str) -> Any:
    # docs/provisioning.md named ProvisionError without saying where it lives.
    if name == "ProvisionError":
        return errors.moved(__name__, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def provision(tenant: Any) -> str:
    """Create ``tenant``'s schema: a claimed spare schema, else by replay when a recording
    allows it, else by migrating.

    A new tenant is saved first (django-tenants' save, ``post_schema_sync`` included); a saved
    one must have no schema yet. Returns ``"spare"``, ``"replayed"`` or ``"migrated"``.
    """
    if getattr(tenant, "_skip_auto_migrate", False):
        raise ValueError(
            f"provision({tenant.schema_name!r}): the tenant has _skip_auto_migrate set, which "
            "forbids creating its schema; clear it first."
        )
    alias = get_tenant_database_alias()
    # Guarded throughout: behind a transaction pooler even django-tenants' row checks in
    # save() need their path.
    with guard.guarding(alias):
        return _provision(tenant, alias)


def _provision(tenant: Any, alias: str) -> str:
    if schemas.exists(alias, tenant.schema_name):
        raise ValueError(
            f'provision({tenant.schema_name!r}): schema "{tenant.schema_name}" exists already; '
            "nothing was saved or provisioned (migrate it with migrate_schemas_safe)."
        )
    if tenant._state.adding:
        _arm(tenant, forced=True)
        try:
            tenant.save()
        finally:
            _disarm(tenant)
        how: str = tenant.__dict__.pop("_tenantsafe_provisioned", "")
        if not how:
            # Another process created the schema between the check and the save.
            raise ValueError(
                f'provision({tenant.schema_name!r}): schema "{tenant.schema_name}" was created '
                "by someone else meanwhile; the tenant row is saved, its schema was left alone."
            )
        return how
    try:
        how = _provision_schema(tenant, alias)
    except BaseException:
        # As django-tenants' save() of an existing row does: only the schema goes.
        with connections[alias].cursor() as cursor:
            cursor.execute("DROP SCHEMA IF EXISTS %s CASCADE" % schemas.quote(tenant.schema_name))
        raise
    post_schema_sync.send(sender=TenantMixin, tenant=tenant.serializable_fields())
    return how


def arm_on_save(sender: type[Model], instance: Model, raw: bool = False, **kwargs: Any) -> None:
    """``pre_save`` receiver: with ``TENANTSAFE_PROVISIONING = "replay"``, the schema that
    saving a new tenant creates is provisioned by :func:`_create_schema`."""
    if not isinstance(instance, TenantMixin) or instance.__dict__.get("_tenantsafe_forced"):
        return
    _disarm(instance)
    if (
        instance._state.adding
        and not raw
        and conf.provisioning() == "replay"
        and not getattr(instance, "_skip_auto_migrate", False)
        and instance.auto_create_schema
    ):
        _arm(instance, forced=False)


def _arm(tenant: Any, *, forced: bool) -> None:
    state = tenant.__dict__
    _disarm(tenant)
    state["create_schema"] = functools.partial(_create_schema, tenant)
    if forced:
        state["_tenantsafe_forced"] = True
        state["_tenantsafe_auto_create_before"] = state.get("auto_create_schema", _UNSET)
        state["auto_create_schema"] = True


def _disarm(tenant: Any) -> None:
    state = tenant.__dict__
    state.pop("create_schema", None)
    if state.pop("_tenantsafe_forced", False):
        before = state.pop("_tenantsafe_auto_create_before", _UNSET)
        if before is _UNSET:
            state.pop("auto_create_schema", None)
        else:
            state["auto_create_schema"] = before


_UNSET = object()


def _create_schema(
    tenant: Any, check_if_exists: bool = False, sync_schema: bool = True, verbosity: int = 1
) -> bool:
    """What TenantMixin.create_schema() does, with the schema provisioned by replay."""
    _disarm(tenant)
    alias = get_tenant_database_alias()
    if not sync_schema or get_creation_fakes_migrations():
        # Cloning from TENANT_BASE_SCHEMA (or no sync): django-tenants' own way.
        return bool(
            type(tenant).create_schema(
                tenant,
                check_if_exists=check_if_exists,
                sync_schema=sync_schema,
                verbosity=verbosity,
            )
        )
    schemas.validate(tenant.schema_name)
    if check_if_exists and schemas.exists(alias, tenant.schema_name):
        return False
    tenant.__dict__["_tenantsafe_provisioned"] = _provision_schema(tenant, alias, verbosity)
    connection: Any = connections[alias]
    connection.set_schema_to_public()
    return True


def _provision_schema(tenant: Any, alias: str, verbosity: int = 1) -> str:
    connection: Any = connections[alias]
    store = recording.RecordingStore(alias)
    with guard.guarding(alias):
        if spares.claim(store, tenant):
            return SPARE
        if recording.replay(store, tenant):
            logger.info("schema %s: provisioned by replay", tenant.schema_name)
            return REPLAYED
    if connection.in_atomic_block:
        # A migration under a lease commits as it goes, which the caller's transaction
        # forbids: django-tenants migrates it inside that transaction, as without tenantsafe.
        type(tenant).create_schema(tenant, check_if_exists=True, verbosity=verbosity)
        return MIGRATED
    with (
        guard.guarding(alias),
        store.turn_to_record(tenants.tenant_type(tenant)) as found,
    ):
        # Another process recorded the state while this one waited.
        if found is not None and recording.replay(store, tenant):
            logger.info("schema %s: provisioned by replay", tenant.schema_name)
            return REPLAYED
        with locks.leased(alias, tenant.schema_name, purpose="provision") as lease:
            migrate_schema(tenant, alias, lease, record_into=store)
            lease.complete()
    logger.info("schema %s: provisioned by migrating", tenant.schema_name)
    return MIGRATED


def ensure_recording(alias: str | None = None, tenant_type: str = "") -> bool:
    """Record the current migration state if nothing is recorded for it yet, by migrating a
    scratch schema that is dropped afterwards, so that the first signup after a deploy replays
    too. True when a usable recording exists afterwards.

    A migration that needs its tenant's row (the scratch schema has none) fails here; then
    nothing is recorded, and the first new tenant is migrated (and recorded, if it can be).
    """
    alias = alias or get_tenant_database_alias()
    store = recording.RecordingStore(alias)
    with guard.guarding(alias), store.turn_to_record(tenant_type) as found:
        if found is None:
            _record_scratch(store, tenant_type)
            found = store.get(tenant_type)
    return found is not None and not found.problem


def fill_spares(
    alias: str | None = None, count: int | None = None, tenant_type: str = ""
) -> spares.Filled:
    """Keep ``count`` (default ``TENANTSAFE_SPARE_SCHEMAS``) spare schemas of the current
    migration state, recording the state first if needed (see :func:`ensure_recording`)."""
    alias = alias or get_tenant_database_alias()
    wanted = conf.spare_schemas() if count is None else count
    with guard.guarding(alias):
        if wanted:
            ensure_recording(alias, tenant_type)
        return spares.fill(recording.RecordingStore(alias), wanted, tenant_type)


def _record_scratch(store: recording.RecordingStore, tenant_type: str) -> None:
    alias = store.alias
    scratch = f"tenantsafe_scratch_{uuid.uuid4().hex[:12]}"
    tenant = get_tenant_model()(schema_name=scratch)
    if tenant_type:
        setattr(tenant, get_multi_type_database_field_name(), tenant_type)
    try:
        with locks.leased(alias, scratch, purpose="record") as lease:
            migrate_schema(tenant, alias, lease, record_into=store)
            lease.complete()
    except ProvisionError as exc:
        logger.warning(
            "tenantsafe: could not record the migration state on a scratch schema; the next "
            "new tenant is migrated instead: %s",
            exc.error,
        )
    finally:
        connection: Any = connections[alias]
        connection.set_schema_to_public()
        with connection.cursor() as cursor:
            cursor.execute("DROP SCHEMA IF EXISTS %s CASCADE" % schemas.quote(scratch))
            # A failed run leaves its lease row, for a schema that is gone now.
            cursor.execute(
                f"DELETE FROM {locks.table()} WHERE schema_name = %s",  # noqa: S608
                [scratch],
            )


def migrate_schema(
    tenant: Any,
    alias: str,
    lease: locks.Lease,
    *,
    record_into: recording.RecordingStore | None = None,
) -> None:
    """Migrate ``tenant``'s schema (created if missing) under ``lease``; with ``record_into``,
    keep a recording of it there for the next schemas. Raises ProvisionError when it fails."""
    schema = tenant.schema_name
    recorded = (
        recording.record(record_into, tenant)
        if record_into is not None
        else contextlib.nullcontext()
    )
    with recorded, recorder.by_name():
        result = migrate.migrate_tenant(
            migrate_options(alias), TenantRef(schema, tenants.tenant_type(tenant)), lease=lease
        )
        if result.status == FAILED:
            raise ProvisionError(schema, result.error, result.traceback)


@functools.lru_cache(maxsize=8)
def _default_migrate_options(command_path: str) -> tuple[tuple[str, Any], ...]:
    command = get_tenant_base_migrate_command_class()()
    parser = command.create_parser("manage.py", "migrate")
    return tuple(sorted(vars(parser.parse_args([])).items()))


def migrate_options(alias: str) -> RunOptions:
    path = str(getattr(settings, "TENANT_BASE_MIGRATE_COMMAND", ""))
    options = dict(_default_migrate_options(path))
    options.update(database=alias, verbosity=0, interactive=False, skip_checks=True)
    return RunOptions(database=alias, migrate=options, verbosity=0, create_missing=True)
