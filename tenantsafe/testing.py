"""Tenants for tests: ``create_tenant`` and a ``TenantTestCase`` that keeps Django's class setup.

``create_tenant`` commits whatever transaction the caller is in (inside one it works on a
connection of its own), so a tenant it returns is a real, committed tenant that later calls,
from this process or any other sharing the database, find and reuse.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Iterator
from typing import Any, ClassVar

from django.conf import settings
from django.db import IntegrityError, connections, transaction
from django.db.models import Model
from django.test import TestCase
from django.test.utils import override_settings
from django_tenants.models import TenantMixin
from django_tenants.signals import post_schema_sync
from django_tenants.test.client import TenantClient
from django_tenants.utils import (
    get_public_schema_name,
    get_tenant_database_alias,
    get_tenant_domain_model,
    get_tenant_model,
)

from tenantsafe import conf, errors, guard, locks, plan, provisioning, recording, schemas, tenants
from tenantsafe.errors import (
    MissingTenantFields,
    ProvisionError,
    SchemaNameError,
    TenantProvisionError,
)

logger = logging.getLogger("tenantsafe.testing")

DEFAULT_SCHEMA = "test_tenant"

__all__ = [
    "TenantTestCase",
    "create_tenant",
    "default_domain",
    "default_schema_names",
]


def __getattr__(name: str) -> Any:
    # docs/testing.md named these as create_tenant's errors before they moved.
    if name in ("MissingTenantFields", "TenantProvisionError"):
        return errors.moved(__name__, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_domain(schema_name: str) -> str:
    # Hostnames allow neither underscores nor upper case (Django rejects them as
    # DisallowedHost), schema names do.
    label = re.sub(r"[^a-z0-9-]+", "-", schema_name.lower()).strip("-") or "tenant"
    return f"{label[:63]}.localhost"


def default_schema_names() -> list[str]:
    return conf.test_tenants() or [DEFAULT_SCHEMA]


def create_tenant(schema_name: str, *, domain: str | None = None, **fields: Any) -> Any:
    """The tenant with ``schema_name``, created with a migrated schema if it does not exist.

    See the docs (docs/testing.md) for the contract: idempotent, ``_skip_auto_migrate`` set,
    serialized across processes, schemas provisioned from a template of the migration.
    """
    schemas.validate(schema_name, owner="create_tenant")
    if schema_name == get_public_schema_name():
        raise SchemaNameError(
            schema_name,
            owner="create_tenant",
            reason="it is the public schema, which holds the shared apps and no tenant",
        )
    model = get_tenant_model()
    alias = get_tenant_database_alias()
    # Guarded throughout: behind a transaction pooler even the row lookups need their path.
    # The store shares recordings with the other xdist workers (each has a database of its
    # own) through files.
    with (
        guard.guarding(alias),
        recording.RecordingStore(alias, share_files=True) as store,
        _own_connection(alias),
    ):
        tenant = _ready(model, alias, schema_name, domain)
        if tenant is None:
            _wait_for_recording(model, store, schema_name, fields)
        if tenant is None:
            # The tenant's lease (what migrate_schemas_safe takes too) keeps other processes
            # out, also while migrating commits as it goes.
            with locks.leased(alias, schema_name, purpose="create_tenant") as lease:
                with transaction.atomic(using=alias):
                    tenant = _without_migrating(model, store, schema_name, domain, fields, lease)
                if tenant is None:
                    tenant = _migrating(model, store, schema_name, domain, fields, lease)
                lease.complete()
    tenant._skip_auto_migrate = True
    return tenant


@contextlib.contextmanager
def _own_connection(alias: str) -> Iterator[Any]:
    original: Any = connections[alias]
    if not original.in_atomic_block and original.get_autocommit():
        # Outside a transaction there is nothing of the caller's to disturb but its tenant
        # (a migration may close the connection, as django-tenants' save() does too).
        tenant, include_public = original.tenant, original.include_public_schema
        try:
            yield original
        finally:
            original.set_tenant(tenant, include_public=include_public)
        return
    # Inside one, commits must not touch it. Django's connections are per thread: swapping in
    # a new one for the duration leaves the caller's (its transaction, its tenant) untouched,
    # while everything we call (the ORM, migrate_tenant, the migrate command) picks up ours.
    own = connections.create_connection(alias)
    connections[alias] = own
    try:
        yield own
    finally:
        connections[alias] = original
        own.close()


def _ready(model: type[Model], alias: str, schema: str, domain: str | None) -> Any:
    """The tenant if there is nothing to do for it, else None."""
    tenant = model._default_manager.db_manager(alias).filter(schema_name=schema).first()
    if tenant is None or not _has_domain(tenant, alias, domain):
        return None
    if not schemas.exists(alias, schema):
        return None
    if not plan.is_current(alias, schema, tenants.tenant_type(tenant)):
        return None
    return tenant


def _wait_for_recording(
    model: type[Model], store: recording.RecordingStore, schema: str, fields: dict[str, Any]
) -> None:
    # Outside any transaction: while another xdist worker records the migration state, this
    # waits for its recording (holding no snapshot or lock the recorder could wait for).
    row = model._default_manager.db_manager(store.alias).filter(schema_name=schema).first()
    store.get(tenants.tenant_type(row or _unsaved(model, schema, fields)))


def _without_migrating(
    model: type[Model],
    store: recording.RecordingStore,
    schema: str,
    domain: str | None,
    fields: dict[str, Any],
    lease: locks.Lease,
) -> Any:
    """Under the lock, in one transaction: the tenant, if it needs no migration; else None."""
    alias = store.alias
    tenant = model._default_manager.db_manager(alias).filter(schema_name=schema).first()
    if tenant is None:
        missing = _missing_fields(model, fields)
        if missing:
            raise MissingTenantFields(schema, model, missing)
        if schemas.exists(alias, schema):
            return None
        tenant = _unsaved(model, schema, fields)
        if not recording.replay(store, tenant):
            return None
        tenant.save(verbosity=0, using=alias)
        _add_domain(tenant, alias, domain or default_domain(schema), primary=True)
    else:
        _ensure_domain(tenant, alias, domain)
        if schemas.exists(alias, schema):
            # Another process finished it while we waited for the lock, or only the domain
            # was missing; otherwise the schema is behind.
            current = plan.is_current(alias, schema, tenants.tenant_type(tenant), lease=lease)
            return tenant if current else None
        if not recording.replay(store, tenant):
            return None
    transaction.on_commit(functools.partial(_schema_synced, tenant), using=alias)
    return tenant


def _migrating(
    model: type[Model],
    store: recording.RecordingStore,
    schema: str,
    domain: str | None,
    fields: dict[str, Any],
    lease: locks.Lease,
) -> Any:
    """Under the lock: create or repair the tenant by migrating its schema."""
    alias = store.alias
    tenant = model._default_manager.db_manager(alias).filter(schema_name=schema).first()
    if tenant is not None:
        _ensure_domain(tenant, alias, domain)
        if schemas.exists(alias, schema):
            if not plan.is_current(alias, schema, tenants.tenant_type(tenant), lease=lease):
                logger.info("tenantsafe: schema %s is behind its migrations; migrating", schema)
                _migrate(tenant, store, lease, record=False)
            return tenant
        _migrate(tenant, store, lease, record=True)
        _schema_synced(tenant)
        return tenant
    # As django-tenants' save() does: the row first (a data migration may read it), then the
    # schema; on failure neither is kept.
    tenant = _unsaved(model, schema, fields)
    fresh = not schemas.exists(alias, schema)
    tenant.save(verbosity=0, using=alias)
    try:
        _ensure_domain(tenant, alias, domain)
        if fresh or not plan.is_current(alias, schema, tenants.tenant_type(tenant), lease=lease):
            _migrate(tenant, store, lease, record=fresh)
    except BaseException:
        with contextlib.suppress(Exception):
            connection: Any = connections[alias]
            connection.set_schema_to_public()
            tenant.delete(force_drop=fresh)
        raise
    _schema_synced(tenant)
    return tenant


def _missing_fields(model: type[Model], given: dict[str, Any]) -> list[str]:
    missing = []
    for field in model._meta.concrete_fields:
        if (
            field.name == "schema_name"
            or field.primary_key
            or field.auto_created
            or field.has_default()
            or field.null
            or field.blank
        ):
            continue
        if field.name not in given and getattr(field, "attname", None) not in given:
            missing.append(field.name)
    return missing


def _unsaved(model: type[Model], schema: str, fields: dict[str, Any]) -> Any:
    tenant = model(schema_name=schema, **fields)
    tenant._skip_auto_migrate = True  # type: ignore[attr-defined]
    return tenant


def _migrate(
    tenant: Any, store: recording.RecordingStore, lease: locks.Lease, *, record: bool
) -> None:
    try:
        provisioning.migrate_schema(
            tenant, store.alias, lease, record_into=store if record else None
        )
    except ProvisionError as exc:
        raise TenantProvisionError(tenant.schema_name, exc.error, exc.traceback) from None


def _has_domain(tenant: Any, alias: str, domain: str | None) -> bool:
    domains = get_tenant_domain_model()._default_manager.db_manager(alias).filter(tenant=tenant)
    if domain is None:
        return bool(domains.filter(is_primary=True).exists())
    return bool(domains.filter(domain=domain).exists())


def _ensure_domain(tenant: Any, alias: str, domain: str | None) -> None:
    if not _has_domain(tenant, alias, domain):
        _add_domain(tenant, alias, domain or default_domain(tenant.schema_name))


def _add_domain(tenant: Any, alias: str, name: str, *, primary: bool = False) -> None:
    # DomainMixin.save() also makes it primary when the tenant has no primary domain yet.
    model = get_tenant_domain_model()
    manager = model._default_manager.db_manager(alias)
    try:
        manager.create(tenant=tenant, domain=name, is_primary=primary)
    except IntegrityError:
        owner = manager.filter(domain=name).values_list("tenant__schema_name", flat=True).first()
        raise ValueError(
            f"create_tenant({tenant.schema_name!r}): domain {name!r} already belongs to tenant "
            f"{owner!r}; pass another one with domain=..."
        ) from None


def _schema_synced(tenant: Any) -> None:
    # What django-tenants' save() sends once it has created and migrated a schema.
    post_schema_sync.send(sender=TenantMixin, tenant=tenant.serializable_fields())


class TenantTestCase(TestCase):
    """django-tenants' TenantTestCase, keeping Django's class setup (``setUpTestData`` runs).

    The tenant comes from create_tenant, so it is created once and then reused by every class
    (and test run, with a kept database) that asks for the same schema.
    """

    tenant_schema_name: ClassVar[str | None] = None
    tenant_domain: ClassVar[str | None] = None
    tenant_fields: ClassVar[dict[str, Any]] = {}
    tenant: ClassVar[Any]

    @classmethod
    def get_tenant_schema_name(cls) -> str:
        return cls.tenant_schema_name or default_schema_names()[0]

    @classmethod
    def setUpClass(cls) -> None:
        cls.tenant = create_tenant(
            cls.get_tenant_schema_name(), domain=cls.tenant_domain, **cls.tenant_fields
        )
        connection: Any = connections[get_tenant_database_alias()]
        domain = cls.tenant.get_primary_domain().domain
        hosts = list(settings.ALLOWED_HOSTS)
        if "*" not in hosts and domain not in hosts:
            allowed = override_settings(ALLOWED_HOSTS=[*hosts, domain])
            allowed.enable()
            cls.addClassCleanup(allowed.disable)
        connection.set_tenant(cls.tenant)
        cls.addClassCleanup(connection.set_schema_to_public)
        # After the tenant is active, so setUpTestData writes into its schema.
        super().setUpClass()

    @functools.cached_property
    def tenant_client(self) -> TenantClient:
        return TenantClient(self.tenant)
